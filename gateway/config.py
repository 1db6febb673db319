"""The gateway's typed configuration: every default lives here, and nowhere else.

A TOML file is parsed into :class:`GatewayConfig`. Problems come back as one line each,
``field.path: reason``, through :class:`ConfigError`.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from pipeline.errors import TopicError
from pipeline.topics import DEFAULT_TEMPLATE, DEFAULT_VERSION, TopicTemplate, compile_filter

BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400)
_MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
_LEVEL = re.compile(r"^[A-Za-z0-9_.\-]+$")
_LEVEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _level(value: str) -> str:
    """A value that becomes one topic level: letters, digits, '_', '-', '.'."""
    if not _LEVEL.fullmatch(value):
        raise ValueError("must be letters, digits, '_', '-' or '.' (it becomes a topic level)")
    return value


Level = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_level)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=0, le=65535)
    # MQTT 3.1.1 sessions (gateway/sessions.py): messages a client's session may hold, queued and
    # in flight together; what happens to a message that finds it full; PUBLISHes sent unacknowledged.
    max_queued_messages: int = Field(default=1000, ge=1, le=1_000_000)
    queue_full: Literal["drop_oldest", "drop_new"] = "drop_oldest"
    max_inflight: int = Field(default=20, ge=1, le=65535)
    # The largest MQTT packet a client may send (whole packet, header included); bigger ones close
    # the connection (gateway/firewall.py).
    max_packet_bytes: int = Field(default=262_144, ge=64, le=268_435_455)
    connect_timeout_s: float = Field(default=10.0, gt=0)  # a connection must send CONNECT within this


class StorageSettings(_Model):
    data_dir: Path = Path("iotgw-data")


class MetricRules(_Model):
    """How the clean stage treats one metric, whichever device sends it (pipeline/clean.py)."""

    min: float | None = None
    max: float | None = None
    max_rate_per_s: float | None = Field(
        default=None, gt=0, description="spike filter: a faster step from the last kept value is dropped"
    )
    stuck_after_s: float | None = Field(default=None, gt=0, description="the same value for longer is 'stuck'")
    deadband: float | None = Field(default=None, gt=0, description="report on change: smaller changes are dropped")
    deadband_max_interval_s: float = Field(default=300.0, gt=0, description="a heartbeat passes the deadband")

    @model_validator(mode="after")
    def _ordered(self) -> MetricRules:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


DEFAULT_METRIC_RULES: dict[str, MetricRules] = {
    "temperature": MetricRules(min=-60, max=150),
    "humidity": MetricRules(min=0, max=100),
    "battery": MetricRules(min=0, max=100),
    "pm2_5": MetricRules(min=0, max=1000),
    "pm10": MetricRules(min=0, max=2000),
    "co2": MetricRules(min=0, max=40000),
    "pressure": MetricRules(min=300, max=1200),
}


def _known_unit(value: str) -> str:
    from pipeline.units import UNITS

    if value not in UNITS:
        raise ValueError(f"unknown unit {value!r}; known: {', '.join(sorted({u.symbol for u in UNITS.values()}))}")
    return value


class CleanSettings(_Model):
    metrics: dict[str, MetricRules] = Field(
        default_factory=lambda: dict(DEFAULT_METRIC_RULES),
        description="rules by metric name; naming [pipeline.clean.metrics] replaces the built-in ones",
    )
    units: dict[Level, dict[str, Annotated[str, AfterValidator(_known_unit)]]] = Field(
        default_factory=dict, description="device class -> metric -> unit to normalise to"
    )
    clock_policy: Literal["correct", "reject"] = "correct"
    max_clock_ahead_s: float = Field(default=60.0, gt=0)
    max_clock_behind_s: float = Field(default=86_400.0, gt=0)
    duplicate_window_s: float = Field(default=600.0, ge=0, description="a repeated sequence number is a duplicate")


class PipelineSettings(_Model):
    queue_size: int = Field(default=1000, ge=1, le=1_000_000, description="messages")
    batch_size: int = Field(default=500, ge=1, le=50_000)
    max_latency_s: float = Field(default=0.5, ge=0, le=60, description="how long a short batch waits to fill")
    clean: CleanSettings = CleanSettings()
    agg_interval_s: float = Field(default=10.0, gt=0)


class TopicSettings(_Model):
    template: str = DEFAULT_TEMPLATE
    version: str = DEFAULT_VERSION

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            TopicTemplate(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+", value):
            raise ValueError("must be MAJOR.MINOR, for example 1.0")
        return value


class _Device(_Model):
    id: Level
    device_class: Level | None = None


class SerialDevice(_Device):
    transport: Literal["serial"]
    port: str = Field(min_length=1, description="prefer a stable /dev/serial/by-id/... path")
    protocol: Literal["sds011", "pms5003", "nmea", "jsonlines", "kv"]
    baudrate: int = 9600

    @field_validator("baudrate")
    @classmethod
    def _baud(cls, value: int) -> int:
        if value not in BAUDRATES:
            raise ValueError(f"must be one of {', '.join(map(str, BAUDRATES))}")
        return value


class BleDevice(_Device):
    transport: Literal["ble"]
    address: str
    protocol: Literal["bthome"]
    bindkey: str | None = Field(default=None, description="32 hex digits for encrypted BTHome")

    @field_validator("address")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.upper()
        if not _MAC.fullmatch(value):
            raise ValueError("must be a MAC address like A4:C1:38:00:00:01")
        return value

    @field_validator("bindkey")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
            raise ValueError("must be 32 hexadecimal digits (a 128-bit key)")
        return value


class MqttDevice(_Device):
    transport: Literal["mqtt"]


Device = Annotated[SerialDevice | BleDevice | MqttDevice, Field(discriminator="transport")]
TRANSPORTS = ("serial", "ble", "mqtt")
DEFAULT_DEVICE_CLASS = {"serial": "particulate", "ble": "environment", "mqtt": "generic"}


class _Forward(_Model):
    name: Level
    url: str = Field(min_length=1)
    topics: list[str] = Field(min_length=1, description="filters, MQTT (+ #) or Solace/NATS (* >) syntax")
    subscribe: list[str] = Field(default_factory=list, description="backbone filters: downlink and mesh")
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    when_full: Literal["drop_oldest", "refuse"] = "drop_oldest"
    batch_size: int = Field(default=500, ge=1, le=10_000)
    replay: Literal["in_order", "fresh_first"] = Field(
        default="in_order", description="after an outage: strict order, or backlog and live data in turn"
    )

    @field_validator("topics", "subscribe")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                compile_filter(pattern)
            except TopicError as exc:
                raise ValueError(f"{pattern!r}: {exc}") from None
        return value


class TlsSettings(_Model):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class RewriteRule(_Model):
    from_: str = Field(alias="from", min_length=1)
    to: str


class MqttForward(_Forward):
    type: Literal["mqtt"]
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsSettings | None = None
    topic_prefix: str = ""
    rewrite: list[RewriteRule] = Field(default_factory=list)


class NatsForward(_Forward):
    type: Literal["nats"]
    stream: str | None = None
    create_stream: bool = False


class KafkaForward(_Forward):
    type: Literal["kafka"]
    kafka_topic: str = "iotgw.{stage}"


ForwardSettings = MqttForward | NatsForward | KafkaForward
Forward = Annotated[ForwardSettings, Field(discriminator="type")]
FORWARD_TYPES = ("mqtt", "nats", "kafka")


class BleSettings(_Model):
    backend: Literal["bleak", "simulated"] = "bleak"


class GatewayConfig(_Model):
    site: Level = "site1"
    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    pipeline: PipelineSettings = PipelineSettings()
    topics: TopicSettings = TopicSettings()
    ble: BleSettings = BleSettings()
    gateway_id: Level | None = Field(default=None, description="default: SITE-HOSTNAME")
    devices: list[Device] = []
    forward: list[Forward] = []

    @model_validator(mode="after")
    def _unique_devices(self) -> GatewayConfig:
        seen: set[str] = set()
        for device in self.devices:
            if device.id in seen:
                raise ValueError(f"device id {device.id!r} is configured twice")
            seen.add(device.id)
        names = [f.name for f in self.forward]
        if len(names) != len(set(names)):
            raise ValueError("forward names must be unique")
        return self

    @property
    def effective_gateway_id(self) -> str:
        return self.gateway_id or f"{self.site}-{_LEVEL_UNSAFE.sub('-', socket.gethostname())}"

    def device_class(self, device: SerialDevice | BleDevice | MqttDevice) -> str:
        return device.device_class or DEFAULT_DEVICE_CLASS[device.transport]

    def with_overrides(self, *, data_dir: Path | None = None, mqtt_port: int | None = None) -> GatewayConfig:
        """The command line's flags win over the file."""
        config = self
        if data_dir is not None:
            config = config.model_copy(update={"storage": config.storage.model_copy(update={"data_dir": data_dir})})
        if mqtt_port is not None:
            config = config.model_copy(update={"broker": config.broker.model_copy(update={"port": mqtt_port})})
        return config


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    previous: int | str | None = None
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(previous, int) and item in (*TRANSPORTS, *FORWARD_TYPES):
            pass  # the discriminated union's tag: not a field the user wrote
        else:
            parts.append(("." if parts else "") + item)
        previous = item
    return "".join(parts) or "(root)"


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        reason = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            reason = "unknown field"
        elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            forward = error["loc"][:1] == ("forward",)
            key, allowed = ("type", FORWARD_TYPES) if forward else ("transport", TRANSPORTS)
            missing = error["type"] == "union_tag_not_found"
            choices = ", ".join(allowed)
            reason = f"missing {key} (one of {choices})" if missing else f"must be one of {choices}"
        lines.append(f"{_format_loc(tuple(error['loc']))}: {reason}")
    return lines


def parse_config(data: dict[str, Any]) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc)) from None


def load_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    return parse_config(data)
