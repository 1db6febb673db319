"""The one exception root of the drivers package."""


class DriverError(Exception):
    """Base of every error raised by the drivers package."""


class DecodeError(DriverError, ValueError):
    """Bytes that are not a valid frame; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
