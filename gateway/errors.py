"""The one exception root of the gateway package."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error raised by the gateway package."""


class ConfigError(GatewayError):
    """The configuration is not valid; ``problems`` holds one ``field.path: reason`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class PortInUseError(GatewayError):
    """A listener could not bind because its port is taken."""

    def __init__(self, host: str, port: int, option: str) -> None:
        super().__init__(
            f"MQTT port {port} on {host} is already in use: stop what holds it or choose another port "
            f"with {option}"
        )
        self.host = host
        self.port = port
