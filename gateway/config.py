"""The gateway's typed configuration: every default lives here, and nowhere else.

A TOML file is parsed into :class:`GatewayConfig`. Problems come back as one line each,
``field.path: reason``, through :class:`ConfigError`.
"""

from __future__ import annotations

import itertools
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
    ValidationInfo,
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


class StorageSettings(_Model):
    data_dir: Path = Path("iotgw-data")


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


class PipelineSettings(_Model):
    queue_size: int = Field(default=1000, ge=1, le=1_000_000, description="messages")
    batch_size: int = Field(default=500, ge=1, le=50_000)
    max_latency_s: float = Field(default=0.5, ge=0, le=60, description="how long a short batch waits to fill")
    ranges: dict[str, Range] = Field(default_factory=lambda: dict(DEFAULT_RANGES))
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


class ModbusRegister(_Model):
    """One value of a Modbus device: ``[[devices.registers]]``."""

    name: Level = Field(description="the metric")
    address: int = Field(ge=0, le=65535)
    kind: Literal["holding", "input"] = "holding"
    type: Literal["uint16", "int16", "uint32", "int32", "float32"] = "uint16"
    word_order: Literal["big", "little"] = Field(default="big", description="of 32-bit values: high word first")
    scale: float = Field(default=1.0, allow_inf_nan=False, description="value = raw * scale")
    unit: str | None = None

    @property
    def end(self) -> int:
        """One past its last register."""
        return self.address + (1 if self.type in ("uint16", "int16") else 2)


MODBUS_ONLY = ("unit_id", "poll_interval_s", "timeout_s")


class SerialDevice(_Device):
    transport: Literal["serial"]
    port: str = Field(min_length=1, description="prefer a stable /dev/serial/by-id/... path")
    protocol: Literal["sds011", "pms5003", "nmea", "jsonlines", "kv", "modbus"]
    baudrate: int = 9600
    max_clock_skew_s: float = Field(default=5.0, gt=0, description="device clock vs gateway: counted as clock_skew")
    # Modbus RTU (protocol = "modbus") only:
    unit_id: int = Field(default=1, ge=1, le=247)
    poll_interval_s: float = Field(default=5.0, gt=0, le=86400)
    timeout_s: float = Field(default=1.0, gt=0, le=60, description="for each reply")
    registers: list[ModbusRegister] = Field(default_factory=list, validate_default=True)

    @field_validator("baudrate")
    @classmethod
    def _baud(cls, value: int) -> int:
        if value not in BAUDRATES:
            raise ValueError(f"must be one of {', '.join(map(str, BAUDRATES))}")
        return value

    @field_validator(*MODBUS_ONLY)
    @classmethod
    def _modbus_only(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("protocol", "modbus") != "modbus":
            raise ValueError('only for protocol = "modbus"')
        return value

    @field_validator("registers")
    @classmethod
    def _registers(cls, value: list[ModbusRegister], info: ValidationInfo) -> list[ModbusRegister]:
        protocol = info.data.get("protocol")
        if protocol is None:
            return value  # the protocol itself is wrong: that error is enough
        if protocol != "modbus":
            if value:
                raise ValueError('only for protocol = "modbus"')
            return value
        if not value:
            raise ValueError("a modbus device needs at least one [[devices.registers]]")
        problems: list[str] = []
        names: dict[str, int] = {}
        for i, reg in enumerate(value):
            if reg.name in names:
                problems.append(f"[{i}].name {reg.name!r} is also registers[{names[reg.name]}]")
            names.setdefault(reg.name, i)
            if reg.end > 65536:
                problems.append(f"[{i}] runs past address 65535")
        for kind in ("holding", "input"):
            regs = sorted(((r.address, r.end, i) for i, r in enumerate(value) if r.kind == kind))
            for (_, end_a, a), (start_b, _, b) in itertools.pairwise(regs):
                if start_b < end_a:
                    problems.append(f"[{b}] ({kind} {value[b].address}) overlaps registers[{a}] ({value[a].name})")
        if problems:
            raise ValueError("; ".join(problems))
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
