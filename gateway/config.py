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
from pipeline.rules import RateRule, Selector, ThresholdRule, ZScoreRule
from pipeline.store import StoreLimits
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


class StorageSettings(_Model):
    data_dir: Path = Path("iotgw-data")
    raw_retention_days: float = Field(default=7, gt=0, description="raw readings")
    rollup_1m_retention_days: float = Field(default=90, gt=0, description="1-minute rollups (and closed alerts)")
    rollup_1h_retention_days: float = Field(default=730, gt=0, description="1-hour rollups")
    max_bytes: int = Field(default=1024**3, ge=1024 * 1024, description="disk budget of the store (WAL aside)")
    maintenance_interval_s: float = Field(default=60.0, gt=0, description="retention and budget pass period")

    def store_limits(self) -> StoreLimits:
        return StoreLimits(self.raw_retention_days, self.rollup_1m_retention_days, self.rollup_1h_retention_days,
                           self.max_bytes)


class Range(_Model):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


DEFAULT_RANGES: dict[str, Range] = {
    "temperature": Range(min=-60, max=150),
    "humidity": Range(min=0, max=100),
    "battery": Range(min=0, max=100),
    "pm2_5": Range(min=0, max=1000),
    "pm10": Range(min=0, max=2000),
    "co2": Range(min=0, max=40000),
    "pressure": Range(min=300, max=1200),
}


class AnalyzeSettings(_Model):
    windows: list[str] = Field(default_factory=lambda: ["1m", "1h"], min_length=1,
                               description="tumbling windows, aligned to wall-clock boundaries")
    grace_s: float = Field(default=5.0, ge=0, description="how long a window waits for late readings")

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        from gateway.query import parse_duration

        seconds = []
        for text in value:
            duration = parse_duration(text).total_seconds()
            if duration < 1 or duration != int(duration):
                raise ValueError(f"{text!r}: a window must be a whole number of seconds")
            seconds.append(duration)
        if len(set(seconds)) != len(seconds):
            raise ValueError("windows must differ")
        return value

    @property
    def windows_s(self) -> list[float]:
        from gateway.query import parse_duration

        return [parse_duration(text).total_seconds() for text in self.windows]


class PipelineSettings(_Model):
    queue_size: int = Field(default=1000, ge=1, le=1_000_000, description="messages")
    batch_size: int = Field(default=500, ge=1, le=50_000)
    max_latency_s: float = Field(default=0.5, ge=0, le=60, description="how long a short batch waits to fill")
    ranges: dict[str, Range] = Field(default_factory=lambda: dict(DEFAULT_RANGES))
    analyze: AnalyzeSettings = AnalyzeSettings()


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


class _Rule(_Model):
    name: str = Field(min_length=1, max_length=128)
    device_id: str = Field(default="*", min_length=1, description="wildcards: * ? [abc]")
    device_class: str = Field(default="*", min_length=1)
    metric: str = Field(default="*", min_length=1)
    severity: str = Field(default="warning", min_length=1)

    def _selector(self) -> Selector:
        return Selector(self.device_id, self.device_class, self.metric)


class ThresholdRuleSettings(_Rule):
    kind: Literal["threshold"]
    high: float | None = None
    low: float | None = None
    clear_below: float | None = Field(default=None, description="default: high")
    clear_above: float | None = Field(default=None, description="default: low")
    for_s: float = Field(default=0.0, ge=0, description="how long the value must stay over the limit")

    @model_validator(mode="after")
    def _limits(self) -> ThresholdRuleSettings:
        if self.high is None and self.low is None:
            raise ValueError("needs high, low or both")
        if self.high is not None and self.clear_below is not None and self.clear_below > self.high:
            raise ValueError("clear_below must not exceed high")
        if self.low is not None and self.clear_above is not None and self.clear_above < self.low:
            raise ValueError("clear_above must not be under low")
        if self.high is not None and self.low is not None:
            top = self.high if self.clear_below is None else self.clear_below
            bottom = self.low if self.clear_above is None else self.clear_above
            if bottom >= top:
                raise ValueError("low (clear_above) must be under high (clear_below)")
        if (self.high is None and self.clear_below is not None) or (self.low is None and self.clear_above is not None):
            raise ValueError("clear_below needs high, clear_above needs low")
        return self

    def to_rule(self) -> ThresholdRule:
        return ThresholdRule(self.name, self._selector(), self.high, self.low, self.clear_below, self.clear_above,
                             self.for_s, self.severity)


class RateRuleSettings(_Rule):
    kind: Literal["rate"]
    max_rate: float = Field(gt=0, description="absolute change per `per`")
    per: Literal["s", "min"] = "min"
    window_s: float = Field(default=60.0, gt=0)
    clear_rate: float | None = Field(default=None, ge=0, description="default: max_rate")

    @model_validator(mode="after")
    def _clear(self) -> RateRuleSettings:
        if self.clear_rate is not None and self.clear_rate > self.max_rate:
            raise ValueError("clear_rate must not exceed max_rate")
        return self

    def to_rule(self) -> RateRule:
        return RateRule(self.name, self._selector(), self.max_rate, self.per, self.window_s, self.clear_rate,
                        self.severity)


class ZScoreRuleSettings(_Rule):
    kind: Literal["zscore"]
    k: float = Field(default=3.0, gt=0)
    window: int = Field(default=30, ge=2, le=100_000, description="readings")
    clear_k: float | None = Field(default=None, gt=0, description="default: k")

    @model_validator(mode="after")
    def _clear(self) -> ZScoreRuleSettings:
        if self.clear_k is not None and self.clear_k > self.k:
            raise ValueError("clear_k must not exceed k")
        return self

    def to_rule(self) -> ZScoreRule:
        return ZScoreRule(self.name, self._selector(), self.k, self.window, self.clear_k, self.severity)


RuleSettings = Annotated[ThresholdRuleSettings | RateRuleSettings | ZScoreRuleSettings, Field(discriminator="kind")]
RULE_KINDS = ("threshold", "rate", "zscore")


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
    rules: list[RuleSettings] = []

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
        rule_names = [r.name for r in self.rules]
        if len(rule_names) != len(set(rule_names)):
            raise ValueError("rule names must be unique")
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
        elif isinstance(previous, int) and item in (*TRANSPORTS, *FORWARD_TYPES, *RULE_KINDS):
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
            if error["loc"][:1] == ("rules",):
                key, allowed = "kind", RULE_KINDS
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
