"""The gateway's typed configuration: every default lives here, and nowhere else.

A TOML file is parsed into :class:`GatewayConfig`. Problems come back as one line each,
``field.path: reason``, through :class:`ConfigError`.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import string
import struct
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from pipeline.catalog import CatalogError, check_declarations, check_name
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


def _read_secret_file(value: object) -> object:
    if not isinstance(value, str | Path):
        return value  # let the type check name the problem
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read {value} ({reason})") from None
    return SecretStr(text.rstrip("\r\n"))


def _read_secret_env(value: object) -> object:
    if not isinstance(value, str):
        return value
    if value not in os.environ:
        raise ValueError(f"environment variable {value} is not set")
    return SecretStr(os.environ[value])


# The secrets convention: a field ``x: SecretStr | None`` of a :class:`_WithSecrets` model may be given
# instead as ``x_file = "path"`` (the file's text, without its final newline) or ``x_env = "VARIABLE"``.
SecretFile = Annotated[SecretStr, BeforeValidator(_read_secret_file)]
SecretEnv = Annotated[SecretStr, BeforeValidator(_read_secret_env)]


class _WithSecrets(_Model):
    """Folds ``x_file`` / ``x_env`` into ``x`` (read at load time; at most one of the three)."""

    @model_validator(mode="after")
    def _fold_secrets(self) -> _WithSecrets:
        fields = type(self).model_fields
        for name in fields:
            for source in (f"{name}_file", f"{name}_env"):
                value = getattr(self, source, None) if source in fields else None
                if value is None:
                    continue
                if getattr(self, name) is not None:
                    raise ValueError(f"give only one of {name}, {name}_file, {name}_env")
                self.__dict__[name] = value  # frozen model: set once, during validation
        return self


Access = Literal["read", "write", "readwrite", "deny"]


class AclRule(_Model):
    """One ``[[broker.acl]]`` rule; see gateway/auth.py for how rules are matched."""

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


class BrokerTls(_Model):
    cert_file: Path
    key_file: Path
    ca_file: Path | None = Field(default=None, description="CA that signs client certificates")
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca(self) -> BrokerTls:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return self


class BrokerListener(_Model):
    """A listener beside the plain TCP one on [broker] host/port."""

    type: Literal["tcp", "tls", "ws", "wss"]
    host: str | None = Field(default=None, description="default: [broker] host")
    port: int = Field(ge=0, le=65535)
    tls: BrokerTls | None = Field(default=None, description="default: [broker.tls]")


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

    @model_validator(mode="after")
    def _listener_tls(self) -> BrokerSettings:
        for i, listener in enumerate(self.listeners):
            if listener.type in ("tls", "wss") and listener.tls is None and self.tls is None:
                raise ValueError(f"listeners[{i}]: type {listener.type} needs [broker.tls] or its own tls")
        return self

    def exposed_listener(self) -> str | None:
        """The first setting that binds a non-loopback address (``broker.host = "0.0.0.0"``), or None."""
        from gateway.api_auth import is_loopback

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
    clean: CleanSettings = CleanSettings()
    analyze: AnalyzeSettings = AnalyzeSettings()
    stall_s: float = Field(default=120.0, gt=0, description="a batch inside the stages longer is unhealthy")


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
    protocol: Literal["bthome", "ruuvi", "atc", "gatt"]
    bindkey: str | None = Field(default=None, description="32 hex digits for encrypted BTHome")
    # protocol = "gatt": a connectable sensor, one characteristic read or subscribed through BleakClient
    characteristic: str | None = Field(default=None, description="gatt: the characteristic's UUID")
    mode: Literal["poll", "notify"] = "poll"
    poll_interval_s: float = Field(default=30.0, gt=0, le=86_400)
    metric: Level | None = Field(default=None, description="gatt: the metric its value is")
    unit: str | None = None
    value_format: str = Field(default="<h", description="gatt: struct format of the value, e.g. <h, <H, <i, <f")
    scale: float = Field(default=1.0, description="gatt: value = raw * scale + offset")
    offset: float = 0.0

    @field_validator("address")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.upper()
        if not _MAC.fullmatch(value):
            raise ValueError("must be a MAC address like A4:C1:38:00:00:01")
        return value

    @field_validator("characteristic")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if re.fullmatch(r"[0-9a-f]{4}", value):
            value = f"0000{value}-0000-1000-8000-00805f9b34fb"
        if not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", value):
            raise ValueError("must be a UUID, 128-bit (0000xxxx-0000-1000-8000-00805f9b34fb) or 16-bit (2a6e)")
        return value

    @field_validator("value_format")
    @classmethod
    def _struct(cls, value: str) -> str:
        try:
            size = len(struct.unpack(value, bytes(struct.calcsize(value))))
        except struct.error as exc:
            raise ValueError(f"not a struct format: {exc}") from None
        if size != 1 or value[-1] in "sp?":
            raise ValueError("must hold exactly one number, e.g. <h, <H, <i, <f")
        return value

    @model_validator(mode="after")
    def _gatt(self) -> BleDevice:
        if self.protocol == "gatt":
            missing = [name for name in ("characteristic", "metric") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)}: required with protocol gatt")
        elif self.characteristic is not None or self.metric is not None:
            raise ValueError("characteristic, metric: only protocol gatt takes them")
        return self

    @field_validator("bindkey")
    @classmethod
    def _key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("protocol", "bthome") != "bthome":
            raise ValueError(f"only protocol bthome takes a bindkey, not {info.data['protocol']}")
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


class MqttForward(_Forward, _WithSecrets):
    type: Literal["mqtt"]
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    password_env: SecretEnv | None = None
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


InfluxTag = Literal["site", "gateway", "device_class", "device_id", "unit", "transport", "metric"]
INFLUX_DEFAULT_TAGS: tuple[InfluxTag, ...] = ("site", "gateway", "device_class", "device_id", "unit")
INFLUX_NAME_FIELDS = ("site", "device_class", "device_id", "metric")  # placeholders of measurement/field


def _name_template(value: str) -> str:
    """A measurement or field name: text with placeholders from INFLUX_NAME_FIELDS."""
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(value) if name is not None or spec or conv]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    unknown = [n for n in names if n not in INFLUX_NAME_FIELDS]
    if unknown:
        choices = ", ".join("{" + name + "}" for name in INFLUX_NAME_FIELDS)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}: use {choices}")
    if value.startswith("#"):
        raise ValueError("must not start with '#' (line protocol reads the line as a comment)")
    return value


NameTemplate = Annotated[str, Field(min_length=1), AfterValidator(_name_template)]


class InfluxForward(_Forward):
    """An InfluxDB v2 write API (InfluxDB 2.x/3.x, or anything speaking it: VictoriaMetrics, ...)."""

    type: Literal["influxdb"]
    url: str = Field(min_length=1, description="http(s)://host:port of the v2 write API")
    topics: list[str] = Field(default_factory=list, description="default: valid readings (and agg with aggregates)")
    batch_size: int = Field(default=5000, ge=1, le=50_000, description="lines per write (InfluxDB: ~5,000)")
    org: str = ""
    bucket: str = Field(default="iotgw", min_length=1)
    token: SecretStr | None = None
    token_file: Path | None = Field(default=None, description="a file holding the token (its first line)")
    token_env: str | None = Field(default=None, min_length=1, description="an environment variable holding it")
    gzip: bool = True
    precision: Literal["s", "ms", "us", "ns"] = Field(
        default="ms", description="of the timestamps written: ms is what device clocks resolve and what "
        "VictoriaMetrics keeps; two readings of one series within one unit overwrite each other (use us then)",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    measurement: NameTemplate = "{device_class}"
    field: NameTemplate = "{metric}"
    tags: list[InfluxTag] = Field(default_factory=lambda: list(INFLUX_DEFAULT_TAGS))
    aggregates: bool = Field(default=False, description="also write agg events (fields mean, min, max, count)")
    agg_measurement: NameTemplate = "{metric}_agg"

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?", value):
            raise ValueError("must be an http:// or https:// URL, for example http://influxdb:8086")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> InfluxForward:
        if self.subscribe:
            raise ValueError("subscribe: an InfluxDB destination receives nothing (leave it out)")
        given = [k for k in ("token", "token_file", "token_env") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of token, token_file, token_env (got {', '.join(given)})")
        return self

    def token_value(self) -> str | None:
        """The token, read from where the config says (ConfigError when the file or variable is absent)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            try:
                lines = self.token_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError([f"forward {self.name}.token_file: cannot read ({exc.strerror})"]) from None
            return lines[0].strip() if lines else ""
        if self.token_env is not None:
            if self.token_env not in os.environ:
                raise ConfigError([f"forward {self.name}.token_env: {self.token_env} is not set"])
            return os.environ[self.token_env]
        return None


ForwardSettings = MqttForward | NatsForward | KafkaForward | InfluxForward
Forward = Annotated[ForwardSettings, Field(discriminator="type")]
FORWARD_TYPES = ("mqtt", "nats", "kafka", "influxdb")


def forward_topics(forward: ForwardSettings, template: TopicTemplate) -> list[str]:
    """The topic filters a destination forwards: its own, or its type's default (InfluxDB: the valid
    readings of the topic taxonomy, and its aggregates when enabled)."""
    if forward.topics or not isinstance(forward, InfluxForward):
        return list(forward.topics)
    stages = ("valid", "agg") if forward.aggregates else ("valid",)
    return [template.stage_filter(stage).pattern for stage in stages]


class LoggingSettings(_Model):
    format: Literal["text", "json"] = Field(default="text", description="text for journald, or JSON lines")


class HttpSettings(_Model):
    """The HTTP API and dashboard (gateway/api.py), served in the gateway's event loop.

    Off unless enabled here or by ``--http-port`` (``iotgw demo`` turns it on). On a non-loopback
    address every request except ``/healthz`` needs ``Authorization: Bearer <token>``; the token
    comes from ``token``, else the file ``token_file``, else the environment variable ``token_env``.
    """

    enabled: bool = False
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535, description="0: any free port")
    token: SecretStr | None = None
    token_file: Path | None = None
    token_env: str | None = Field(default=None, min_length=1)
    require_token: bool = Field(default=False, description="also on loopback")

    @model_validator(mode="after")
    def _token_where_needed(self) -> HttpSettings:
        if self.enabled and self.needs_token and self.resolve_token() is None:
            raise ValueError(
                f"host {self.host!r} is not a loopback address (or require_token is set): "
                "configure a bearer token (token, token_file or token_env)"
            )
        return self

    @property
    def needs_token(self) -> bool:
        from gateway.api_auth import is_loopback

        return self.require_token or not is_loopback(self.host)

    def resolve_token(self) -> SecretStr | None:
        """The configured token: ``token``, else ``token_file``'s first line, else ``$token_env``."""
        from gateway.api_auth import read_token

        return read_token(self.token, self.token_file, self.token_env)


class BleSettings(_Model):
    backend: Literal["bleak", "simulated"] = "bleak"
    scanning: Literal["passive", "active"] = Field(
        default="passive", description="passive falls back to active where BlueZ refuses it"
    )
    adapter: str | None = Field(default=None, description="e.g. hci0; default: BlueZ's first adapter")
    watchdog_s: float = Field(
        default=60.0, ge=0, description="restart the scanner after this long without any advertisement; 0: off"
    )


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


class CatalogValue(_Model):
    """The measurement itself (the reading's ``value``): its unit and valid range."""

    unit: str | None = Field(default=None, description="declared unit; a reading without one gets it")
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


class CatalogField(_Model):
    """An extra field of a declared reading, read from the device's raw JSON object."""

    type: Literal["number", "integer", "string", "boolean", "datetime"]
    unit: str | None = None
    description: str = ""
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None


class CatalogType(_Model):
    """A declared event type: readings of one metric from the given device classes."""

    name: str = Field(description="CloudEvents type ending in .v<MAJOR>, e.g. com.example.temperature.v1")
    version: str = Field(description="MAJOR.MINOR: the topic's version level")
    metric: Level
    device_classes: list[Level] = Field(min_length=1)
    description: str = ""
    value: CatalogValue = CatalogValue()
    fields: dict[Level, CatalogField] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _named(self) -> CatalogType:
        problem = check_name(self.name, self.version)
        if problem is not None:
            raise ValueError(problem)
        return self


class _CatalogFile(_Model):
    types: list[CatalogType] = Field(default_factory=list)


class CatalogSettings(_Model):
    """``[catalog]``: declared event types, in this file and in catalog files (TOML, ``[[types]]``)."""

    strict: bool = Field(default=False, description="reject readings of metrics no declared type covers")
    files: list[Path] = Field(default_factory=list, description="relative paths start at the working directory")
    types: list[CatalogType] = Field(default_factory=list)
    flush_interval_s: float = Field(default=5.0, ge=0.5, le=3600,
                                    description="how often learned producers/consumers are written to disk")
    _file_types: list[CatalogType] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _load(self) -> CatalogSettings:
        loaded: list[CatalogType] = []
        for path in self.files:
            loaded += _load_catalog_file(path)
        self._file_types = loaded
        try:
            check_declarations(self.all_types)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def all_types(self) -> list[CatalogType]:
        """The types declared here, then those of the catalog files."""
        return [*self.types, *self._file_types]


def _load_catalog_file(path: Path) -> list[CatalogType]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    try:
        return _CatalogFile.model_validate(data).types
    except ValidationError as exc:
        raise ValueError(f"{path}: " + "; ".join(_problems(exc))) from None


class GatewayConfig(_Model):
    site: Level = "site1"
    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    pipeline: PipelineSettings = PipelineSettings()
    topics: TopicSettings = TopicSettings()
    ble: BleSettings = BleSettings()
    logging: LoggingSettings = LoggingSettings()
    http: HttpSettings = HttpSettings()
    gateway_id: Level | None = Field(default=None, description="default: SITE-HOSTNAME")
    devices: list[Device] = []
    forward: list[Forward] = []
    rules: list[RuleSettings] = []
    catalog: CatalogSettings = CatalogSettings()

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

    def with_overrides(
        self, *, data_dir: Path | None = None, mqtt_port: int | None = None, http_port: int | None = None
    ) -> GatewayConfig:
        """The command line's flags win over the file (``--http-port`` also turns the HTTP API on)."""
        config = self
        if http_port is not None:
            http = config.http.model_dump() | {"enabled": True, "port": http_port}
            try:
                settings = HttpSettings.model_validate(http)
            except ValidationError as exc:
                raise ConfigError([f"http{'' if p.startswith('(') else '.'}{p}".replace("http(root)", "http")
                                   for p in _problems(exc)]) from None
            config = config.model_copy(update={"http": settings})
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
