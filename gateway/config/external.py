"""``[broker.external]``: the site's own MQTT broker, which the gateway attaches to as a client when
``[broker] mode = "external"`` (gateway/broker/external.py), instead of embedding one."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator

from gateway.forward.mqtt.settings import TlsSettings
from gateway.settings import Level, SecretEnv, SecretFile, WithSecrets


class ExternalBrokerSettings(WithSecrets):
    url: str = Field(description="mqtt://host:1883, or mqtts://host:8883 for TLS")
    # 5 adds a Receive Maximum (max_inflight: how many deliveries the broker may send ahead of our PUBACKs; under
    # 3.1.1 the broker's own limit holds, 20 for Mosquitto) and a session expiry (session_expiry_s).
    protocol: Literal["auto", "5", "3.1.1"] = Field(default="3.1.1", description="auto: MQTT 5, else 3.1.1")
    client_id: str | None = Field(default=None,
                                  description="default: iotgw-{gateway_id}; names the persistent session")
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    password_env: SecretEnv | None = None
    tls: TlsSettings | None = None
    shared_group: Level | None = Field(
        default=None, description="subscribe as $share/<group>/...: gateways with the same group share the load")
    subscribe: list[str] = Field(default_factory=list, description="more filters to read (besides the raw stage "
                                                                   "and the dialects' topics)")
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    session_expiry_s: int = Field(default=7 * 86_400, ge=0, description="MQTT 5: how long the broker keeps our "
                                                                        "session (and queues for it) while we are away")
    max_inflight: int = Field(default=1000, ge=1, le=65535,
                              description="deliveries not yet handed to the pipeline (the bounded hand-off; with "
                                          "MQTT 5 also the Receive Maximum the broker is told)")
    max_packet_bytes: int = Field(
        default=262_144, ge=1024, le=268_435_455,
        description="MQTT 3.1.1: a message larger than this is skipped (acknowledged and counted), never buffered")
    publish_qos: Literal[0, 1] = Field(default=0, description="QoS of the events the gateway publishes back")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not url.hostname:
            raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
        try:
            url.port  # noqa: B018  (raises for a port that is not a number)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("subscribe")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for pattern in value:
            levels = pattern.split("/")
            if not pattern or any(("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
                                  for i, lv in enumerate(levels)):
                raise ValueError(f"{pattern!r}: an MQTT filter ('+' a whole level, '#' the whole last level)")
        return value

    @property
    def tls_on(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl") or (self.tls is not None and self.tls.ca_file is not None)

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlparse(self.url).port or (8883 if self.tls_on else 1883)
