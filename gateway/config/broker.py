"""``[broker]``: the embedded MQTT broker's listeners, TLS, sessions, packet limits and access rules."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.external import ExternalBrokerSettings
from gateway.config.http import is_loopback
from gateway.errors import ConfigError
from gateway.settings import Model

Access = Literal["read", "write", "readwrite", "deny"]


class AclRule(Model):
    """One ``[[broker.acl]]`` rule; see gateway/broker/auth.py for how rules are matched."""

    topic: str = Field(min_length=1, description="a topic filter (+ #); %c is the client id, %u the username")
    access: Access = "readwrite"
    user: str | None = Field(default=None, description="this username only; absent: every client")

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        levels = value.split("/")
        for i, level in enumerate(levels):
            if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
                raise ValueError("'+' must be a whole level and '#' the whole last level")
        return value


class BrokerTls(Model):
    cert_file: Path
    key_file: Path
    ca_file: Path | None = Field(default=None, description="CA that signs client certificates")
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca(self) -> BrokerTls:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return self


class BrokerListener(Model):
    """A listener beside the plain TCP one on [broker] host/port."""

    type: Literal["tcp", "tls", "ws", "wss"]
    host: str | None = Field(default=None, description="default: [broker] host")
    port: int = Field(ge=0, le=65535)
    tls: BrokerTls | None = Field(default=None, description="default: [broker.tls]")


class BrokerSettings(Model):
    # embedded: the gateway's own broker (amqtt) on host/port; external: the site's broker ([broker.external]),
    # which the gateway attaches to as a client (gateway/broker/external.py).
    mode: Literal["embedded", "external"] = "embedded"
    external: ExternalBrokerSettings | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=0, le=65535)
    # MQTT 3.1.1 sessions (gateway/broker/sessions.py): messages a client's session may hold, queued and
    # in flight together; what happens to a message that finds it full; PUBLISHes sent unacknowledged.
    max_queued_messages: int = Field(default=1000, ge=1, le=1_000_000)
    queue_full: Literal["drop_oldest", "drop_new"] = "drop_oldest"
    max_inflight: int = Field(default=20, ge=1, le=65535)
    # The largest MQTT packet a client may send (whole packet, header included); bigger ones close
    # the connection (gateway/broker/firewall.py).
    max_packet_bytes: int = Field(default=262_144, ge=64, le=268_435_455)
    connect_timeout_s: float = Field(default=10.0, gt=0, description="a connection must send its whole CONNECT "
                                     "within this (TLS and WebSocket handshakes included)")
    # A client that sends packets answered by the broker (PINGREQ, QoS 1/2 PUBLISH) and does not read the
    # answers: its next packet is read only once the broker's write buffer for it is below this; closed
    # (counted in the offences as write_stalled) if it stays above for write_stall_timeout_s.
    max_write_buffer_bytes: int = Field(default=1_048_576, ge=1024)
    write_stall_timeout_s: float = Field(default=60.0, gt=0)
    # Bounds (gateway/broker/core.py); each one hit is counted in the broker's status (`limits`).
    max_connections: int = Field(default=1000, ge=1, description="open connections, all listeners together; "
                                 "more are closed at once")
    max_connections_per_address: int = Field(default=100, ge=1, description="open connections from one address")
    max_logins_per_address: int = Field(default=2, ge=1, description="logins from one address waiting for the "
                                        "password hash at once; more are refused (CONNACK 3) until one is done")
    max_filters_per_client: int = Field(default=1000, ge=1, description="subscriptions of one client; more get "
                                        "return code 0x80")
    max_persistent_sessions: int = Field(default=1000, ge=1, description="CleanSession 0 sessions kept; a new one "
                                         "beyond is refused (CONNACK 3)")
    session_expiry_s: float = Field(default=7 * 86400, gt=0, description="a persistent session whose client stays "
                                    "away this long ends, with what it holds")
    max_queued_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="topics and payloads waiting in "
                                  "all sessions together (memory and sessions.sqlite3); then the sessions holding "
                                  "the most lose their oldest messages. Default: 64 MiB, or 1/16 of [storage] "
                                  "max_bytes if that is less")
    max_retained_messages: int = Field(default=10_000, ge=0, description="topics with a retained message")
    max_retained_bytes: int = Field(default=16 * 1024 * 1024, ge=0, description="topics and payloads of the "
                                    "retained messages together. Default: 16 MiB, or 1/64 of [storage] max_bytes "
                                    "if that is less")
    allow_anonymous: bool | Literal["loopback"] | None = Field(
        default=None,
        description='clients without a username; "loopback": only from this machine; unset: as Mosquitto 2 '
                    "(without password_file and with every listener on loopback, local clients; see anonymous_access)",
    )
    password_file: Path | None = Field(default=None, description="user:hash lines, managed by `iotgw passwd`")
    acl: list[AclRule] = Field(default_factory=list, description="first matching rule decides")
    acl_default: Access | None = Field(
        default=None, description="when no rule matches: readwrite without [[broker.acl]] rules, deny with them"
    )
    tls: BrokerTls | None = None
    listeners: list[BrokerListener] = Field(default_factory=list)

    def disk_share(self) -> int:
        """What sessions.sqlite3 may hold at most (queued and retained messages): taken out of the disk
        budget ``[storage] max_bytes``, the store keeps to the rest."""
        return self.max_queued_bytes + self.max_retained_bytes

    @model_validator(mode="after")
    def _mode(self) -> BrokerSettings:
        if self.mode == "external" and self.external is None:
            raise ValueError('mode = "external" needs [broker.external] (url, and credentials or TLS as needed)')
        if self.mode == "embedded" and self.external is not None:
            raise ValueError('[broker.external] is read only with mode = "external"')
        return self

    @model_validator(mode="after")
    def _listener_tls(self) -> BrokerSettings:
        for i, listener in enumerate(self.listeners):
            if listener.type in ("tls", "wss") and listener.tls is None and self.tls is None:
                raise ValueError(f"listeners[{i}]: type {listener.type} needs [broker.tls] or its own tls")
        return self

    @property
    def server_host(self) -> str:
        """Where clients reach the broker the gateway uses (the site's, in external mode)."""
        return self.external.host if self.mode == "external" and self.external is not None else self.host

    def exposed_listener(self) -> str | None:
        """The first setting that binds a non-loopback address (``broker.host = "0.0.0.0"``), or None."""
        if not is_loopback(self.host):
            return f"broker.host = {self.host!r}"
        for i, listener in enumerate(self.listeners):
            if listener.host is not None and not is_loopback(listener.host):
                return f"broker.listeners[{i}].host = {listener.host!r}"
        return None

    def anonymous_access(self) -> bool | Literal["loopback"]:
        """Who may connect without a username. ``allow_anonymous`` unset follows Mosquitto 2: without a
        password file, and with every listener on loopback, clients from this machine may (``"loopback"``);
        with a password file they may not. Raises ConfigError when nobody could log in: no password file
        with ``allow_anonymous = false``, or (unset) with a listener on any other address."""
        fix = "create it with `iotgw passwd FILE USER`, or set broker.allow_anonymous = true"
        if self.password_file is not None:
            return False if self.allow_anonymous is None else self.allow_anonymous
        if self.allow_anonymous is False:
            raise ConfigError([f"broker.password_file: required when broker.allow_anonymous is false; {fix}"])
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        if (exposed := self.exposed_listener()) is not None:
            raise ConfigError([
                f"broker.password_file: required when a listener binds a non-loopback address ({exposed}); {fix}"
                ' (or "loopback")'
            ])
        return "loopback"
