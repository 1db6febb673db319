"""Foreign MQTT dialects mapped into the governed taxonomy: pure rules, no I/O.

Devices on a site's broker rarely speak the gateway's taxonomy (one topic per metric, ``{"value": ...}``).
Zigbee2MQTT publishes one JSON object per device on ``zigbee2mqtt/<name>``, Tasmota a sensor report on
``tele/<topic>/SENSOR``, a Shelly Gen2 device ``NotifyStatus`` frames on ``<id>/events/rpc``. A
:class:`Dialect` says how such messages become readings:

- a **topic pattern** whose levels are literals, ``+`` (any level, ignored) or named fields
  (``{device_id}``, ``{device_class}``, ``{site}``, ``{version}``, ``{metric}``);
- **metric rules**: a JSON path to a value (members, ``*`` for any member, its name captured as ``{0}``,
  ``{1}``, ...), the metric it becomes (a name that may use the captures; without captures, several
  values found by one rule in one message are told apart by their captures, ``temperature_ds18b20-1``),
  and a unit: fixed, read from the message (``unit_path``: Tasmota's ``TempUnit``) or from the
  dialect's ``units`` table by metric name;
- optionally the device's time (``ts``: epoch seconds, epoch milliseconds or RFC 3339), a sequence
  number (``seq``), conditions on the payload (``match``: Shelly's ``method`` must be ``NotifyStatus``)
  and device ids to ignore.

One message may carry many metrics: :meth:`DialectSet.map` returns one :class:`MappedMetric` per value
found, or a :class:`Unmapped` with the reason (counted and rejected like any bad input by collect).
Values are passed on as found (the clean stage refuses what is not a number); JSON booleans become 1 and
0, and a rule's ``values`` table turns strings into numbers (``ON`` -> 1). A wildcard only picks numbers
and booleans: the strings and objects beside them (a Zigbee2MQTT ``action``, Shelly's ``aenergy``) are not
readings.

Presets for the dialects the issue names are built by :func:`preset` (``zigbee2mqtt``, ``tasmota``,
``shelly``) and :func:`multi_metric` (plain multi-metric JSON at device level on the gateway's own
taxonomy: ``telemetry/raw/1.0/site/class/dev`` with ``{"temperature": 21.5, "humidity": 40}``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pipeline.errors import TopicError
from pipeline.topics import TopicFilter, TopicTemplate
from pipeline.units import lookup

__all__ = [
    "PRESETS",
    "Dialect",
    "DialectSet",
    "MappedMessage",
    "MappedMetric",
    "MetricRule",
    "Unmapped",
    "derived_event_id",
    "multi_metric",
    "own_topic_filters",
    "parse_path",
    "preset",
]

Path = tuple[str, ...]
TsUnit = Literal["s", "ms", "auto"]
FIELDS: Final = ("device_id", "device_class", "site", "version", "metric")
WILDCARD: Final = "*"
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.\-]+")
_CAPTURE: Final = re.compile(r"\{(\d+)\}")
_MS_THRESHOLD: Final = 100_000_000_000  # epoch numbers above this are milliseconds (year 5138 in seconds)
_CACHE_SIZE: Final = 4096


_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def derived_event_id(event_id: str, part: str) -> str:
    """The id of one reading of a multi-metric message: the message's ULID time (its first 10 characters,
    so ids still sort by time) and 80 bits of a hash of the message's id and ``part``; the same whenever
    the message is replayed from the journal with its id."""
    bits = int.from_bytes(hashlib.blake2b(f"{event_id}/{part}".encode(), digest_size=10).digest(), "big")
    tail = "".join(_CROCKFORD[(bits >> shift) & 31] for shift in range(75, -1, -5))
    return event_id[:10] + tail


def parse_path(path: str | Sequence[str]) -> Path:
    """``"params.*.apower"`` or ``["SDS0X1", "PM2.5"]`` (for member names with dots) -> a tuple of
    members; ``""`` or ``[]`` is the payload itself."""
    if isinstance(path, str):
        return tuple(path.split(".")) if path else ()
    return tuple(path)


def level_name(text: str) -> str:
    """A captured member name as part of a metric name: lower case, anything but letters, digits,
    ``_ . -`` replaced by ``_`` (``switch:0`` -> ``switch_0``)."""
    return _UNSAFE.sub("_", text).strip("_").lower()


@dataclass(frozen=True, slots=True)
class MetricRule:
    """Where a metric is in the payload, and what it becomes."""

    path: Path
    metric: str = ""  # may use {0}, {1}, ... (the members ``*`` matched); "": the last member's name
    unit: str | None = None
    unit_path: Path | None = None  # the unit is read from the message here (falls back to ``unit``)
    values: Mapping[str, float] = field(default_factory=dict)  # strings that stand for numbers

    @property
    def wildcards(self) -> int:
        return self.path.count(WILDCARD)

    def name(self, captures: Sequence[str]) -> str:
        if not self.metric:
            return level_name(captures[-1] if self.path[-1] == WILDCARD else self.path[-1])
        return _CAPTURE.sub(lambda m: level_name(captures[int(m.group(1))]), self.metric)


@dataclass(frozen=True, slots=True)
class Dialect:
    """One foreign dialect: see the module docstring."""

    name: str
    topic: str
    metrics: tuple[MetricRule, ...] = ()
    device_class: str = "mqtt"  # when the topic has no {device_class}
    units: Mapping[str, str] = field(default_factory=dict)  # metric name -> unit, where a rule gives none
    units_path: Path | None = None  # an object in the payload: metric name -> unit (the multi-metric preset)
    exclude: frozenset[str] = frozenset()  # metric names never taken (a Zigbee2MQTT last_seen)
    ts: Path | None = None
    ts_unit: TsUnit = "auto"
    seq: Path | None = None
    match: tuple[tuple[Path, frozenset[str]], ...] = ()  # the value at each path must be one of these
    ignore_devices: frozenset[str] = frozenset()
    _levels: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        levels = tuple(self.topic.split("/"))
        named = [level[1:-1] for level in levels if level.startswith("{")]
        for level in levels:
            if level.startswith("{") and (not level.endswith("}") or level[1:-1] not in FIELDS):
                raise TopicError(f"dialect {self.name}: topic level {level!r} is not one of "
                                 + ", ".join("{" + f + "}" for f in FIELDS))
            if level in ("#", "") or ("+" in level and level != "+") or "#" in level:
                raise TopicError(f"dialect {self.name}: topic level {level!r}: use literals, '+' or fields")
        if len(named) != len(set(named)):
            raise TopicError(f"dialect {self.name}: a field is used twice in {self.topic!r}")
        if "device_id" not in named:
            raise TopicError(f"dialect {self.name}: the topic needs a {{device_id}} level")
        if "metric" not in named and not self.metrics and self.units_path is None:
            raise TopicError(f"dialect {self.name}: needs metric rules, or a {{metric}} level in the topic")
        object.__setattr__(self, "_levels", levels)

    @property
    def filter(self) -> str:
        """The MQTT filter of its topics (what to subscribe to)."""
        return "/".join("+" if level.startswith("{") else level for level in self._levels)

    def fields(self, levels: Sequence[str]) -> dict[str, str] | None:
        """The named fields of a topic (split at ``/``), or None when it is not one of ours."""
        mine = self._levels
        if len(levels) != len(mine):
            return None
        found: dict[str, str] = {}
        for pattern, level in zip(mine, levels, strict=True):
            if pattern.startswith("{"):
                found[pattern[1:-1]] = level
            elif pattern not in ("+", level):
                return None
        return found


@dataclass(frozen=True, slots=True)
class MappedMetric:
    metric: str
    value: object
    unit: str | None


@dataclass(frozen=True, slots=True)
class MappedMessage:
    """What one foreign message carries: the device, its metrics, and (raw) time and sequence number."""

    dialect: str
    device_id: str
    device_class: str
    site: str
    version: str
    metrics: tuple[MappedMetric, ...]
    ts: object = None  # epoch seconds (ms already divided) or a string; None when absent
    seq: object = None


@dataclass(frozen=True, slots=True)
class Unmapped:
    """Why a message of a dialect's topic gave no reading: ``invalid_json``, ``not_an_object``,
    ``unmapped`` (the payload is not one the dialect reads, a Shelly ``NotifyEvent`` say),
    ``no_metrics`` (none of its rules found a value), ``ignored_device``."""

    reason: str
    detail: str


def _get(body: Any, path: Path) -> Any:
    for member in path:
        if not isinstance(body, dict) or member not in body:
            return None
        body = body[member]
    return body


def _walk(body: Any, path: Path, captures: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (captures, value) the path reaches."""
    if not path:
        yield captures, body
        return
    if not isinstance(body, dict):
        return
    head, rest = path[0], path[1:]
    if head == WILDCARD:
        for key, value in body.items():
            yield from _walk(value, rest, (*captures, key))
    elif head in body:
        yield from _walk(body[head], rest, captures)


def _number(value: Any, rule: MetricRule, wild: bool) -> tuple[bool, object]:
    """(take it, as what): booleans as 1/0, strings through the rule's values; a wildcard takes only those
    and numbers, an explicit path takes anything (clean refuses what is not a number, with the reason)."""
    if isinstance(value, bool):
        return True, int(value)
    if isinstance(value, int | float):
        return True, value
    if isinstance(value, str) and value in rule.values:
        return True, rule.values[value]
    if wild or isinstance(value, dict | list) or value is None:
        return False, None
    return True, value


def _unit(text: object) -> str | None:
    if not isinstance(text, str) or not text:
        return None
    known = lookup(text)
    return known.symbol if known is not None else text


class DialectSet:
    """The configured dialects, in order (the first whose topic pattern fits a topic maps it)."""

    def __init__(self, dialects: Iterable[Dialect], *, site: str, version: str, reserved: Sequence[str] = ()) -> None:
        """``reserved``: filters of topics no dialect may read (:func:`own_topic_filters`)."""
        self.dialects = tuple(dialects)
        self._reserved = tuple(TopicFilter(f, "mqtt") for f in reserved)
        names = [d.name for d in self.dialects]
        if len(names) != len(set(names)):
            raise ValueError("dialect names must be unique")
        self._site = site
        self._version = version
        self._cache: dict[str, tuple[Dialect, dict[str, str]] | None] = {}
        self.filters = tuple(TopicFilter(d.filter, "mqtt") for d in self.dialects)

    def __bool__(self) -> bool:
        return bool(self.dialects)

    def wants(self, topic: str) -> bool:
        """Does a dialect read this topic (should the message be journaled for the pipeline)?"""
        return self.match(topic) is not None

    def match(self, topic: str) -> tuple[Dialect, dict[str, str]] | None:
        cache = self._cache
        if topic in cache:
            return cache[topic]
        found = None
        if self.dialects:
            levels = topic.split("/")
            for dialect in self.dialects:
                fields = dialect.fields(levels)
                if fields is not None:
                    found = (dialect, fields)
                    break
            if found is not None and any(f.matches(topic) for f in self._reserved):
                found = None
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[topic] = found
        return found

    def map(self, topic: str, payload: bytes) -> MappedMessage | Unmapped | None:
        """None: no dialect reads this topic."""
        matched = self.match(topic)
        if matched is None:
            return None
        dialect, fields = matched
        device_id = fields["device_id"]
        if device_id in dialect.ignore_devices:
            return Unmapped("ignored_device", f"{dialect.name}: {device_id!r} is not a device")
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            if "metric" in fields:  # a bare value on a per-metric topic ("21.5" as text)
                return self._bare(dialect, fields, payload)
            return Unmapped("invalid_json", str(exc)[:200])
        if "metric" in fields and not isinstance(body, dict):
            return self._bare(dialect, fields, payload)
        if not isinstance(body, dict):
            return Unmapped("not_an_object", f"payload is a JSON {type(body).__name__}")
        for path, accepted in dialect.match:
            value = _get(body, path)
            if not isinstance(value, str) or value not in accepted:
                return Unmapped("unmapped", f"{dialect.name}: {'.'.join(path)} is {value!r}, not one of "
                                            f"{sorted(accepted)}")
        metrics = self._metrics(dialect, fields, body)
        if not metrics:
            return Unmapped("no_metrics", f"{dialect.name}: no metric found in the payload")
        ts = _get(body, dialect.ts) if dialect.ts is not None else None
        if isinstance(ts, int | float) and not isinstance(ts, bool) and (
            dialect.ts_unit == "ms" or (dialect.ts_unit == "auto" and ts > _MS_THRESHOLD)
        ):
            ts = ts / 1000
        return MappedMessage(
            dialect.name, device_id, fields.get("device_class", dialect.device_class),
            fields.get("site", self._site), fields.get("version", self._version), tuple(metrics), ts,
            _get(body, dialect.seq) if dialect.seq is not None else None,
        )

    def _bare(self, dialect: Dialect, fields: dict[str, str], payload: bytes) -> MappedMessage | Unmapped:
        text = payload.decode("utf-8", "replace").strip()
        try:
            value: object = float(text)
        except ValueError:
            value = text  # clean says non_numeric
        if isinstance(value, float) and text.lstrip("+-").isdigit():
            value = int(text)
        metric = fields["metric"]
        return MappedMessage(
            dialect.name, fields["device_id"], fields.get("device_class", dialect.device_class),
            fields.get("site", self._site), fields.get("version", self._version),
            (MappedMetric(metric, value, _unit(dialect.units.get(metric))),),
        )

    @staticmethod
    def _metrics(dialect: Dialect, fields: dict[str, str], body: dict[str, Any]) -> list[MappedMetric]:
        out: list[MappedMetric] = []
        seen: set[str] = set()
        units_table = _get(body, dialect.units_path) if dialect.units_path is not None else None
        if not isinstance(units_table, dict):
            units_table = {}
        excluded = dialect.exclude
        topic_metric = fields.get("metric")
        for rule in dialect.metrics:
            wild = rule.wildcards > 0
            taken = [(c, value) for c, v in _walk(body, rule.path, ()) for ok, value in [_number(v, rule, wild)] if ok]
            # Without captures in its name, a rule that found several values names them apart.
            suffix = len(taken) > 1 and wild and _CAPTURE.search(rule.metric) is None
            for captures, value in taken:
                name = rule.name(captures)
                if topic_metric is not None and not rule.metric:
                    name = topic_metric
                if suffix:
                    name = "_".join([name, *(level_name(c) for c in captures)])
                if not name or name in excluded or name in seen:
                    continue
                seen.add(name)
                unit = None
                if rule.unit_path is not None:
                    unit = _unit(_get(body, rule.unit_path))
                if unit is None:
                    unit = _unit(rule.unit or units_table.get(name) or dialect.units.get(name))
                out.append(MappedMetric(name, value, unit))
        return out


# --- presets ----------------------------------------------------------------------------------------------

# Zigbee2MQTT (https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html): one JSON object per
# device on <base_topic>/<friendly_name>; the keys are the device's "exposes" (units from its device pages).
# ``voltage`` has no unit here: battery devices report millivolts, plugs volts.
_Z2M_UNITS: Final = {
    "temperature": "°C", "local_temperature": "°C", "device_temperature": "°C", "humidity": "%",
    "soil_moisture": "%", "pressure": "hPa", "battery": "%", "linkquality": "lqi", "illuminance": "lx",
    "illuminance_lux": "lx", "co2": "ppm", "pm25": "µg/m³", "pm10": "µg/m³", "power": "W", "energy": "kWh",
    "current": "A",
}
_Z2M_EXCLUDE: Final = frozenset({"last_seen", "elapsed", "update_available"})

# Tasmota (https://tasmota.github.io/docs/): tele/<topic>/SENSOR, one member per sensor (named after it:
# AM2301, BME280, DS18B20-1, ...) holding its values, plus ENERGY on power-monitoring plugs. Its ``Time``
# is local time without an offset, so it is not taken as the device's time (the receive time is used).
_TASMOTA_RULES: Final = (
    MetricRule(("*", "Temperature"), "temperature", "°C", ("TempUnit",)),
    MetricRule(("*", "Humidity"), "humidity", "%"),
    MetricRule(("*", "DewPoint"), "dew_point", "°C", ("TempUnit",)),
    MetricRule(("*", "Pressure"), "pressure", "hPa", ("PressureUnit",)),
    MetricRule(("*", "SeaPressure"), "sea_pressure", "hPa", ("PressureUnit",)),
    MetricRule(("*", "Illuminance"), "illuminance", "lx"),
    MetricRule(("*", "CarbonDioxide"), "co2", "ppm"),
    MetricRule(("*", "PM2.5"), "pm2_5", "µg/m³"),
    MetricRule(("*", "PM10"), "pm10", "µg/m³"),
    MetricRule(("ENERGY", "Power"), "power", "W"),
    MetricRule(("ENERGY", "ApparentPower"), "apparent_power", "VA"),
    MetricRule(("ENERGY", "ReactivePower"), "reactive_power", "var"),
    MetricRule(("ENERGY", "Factor"), "power_factor"),
    MetricRule(("ENERGY", "Voltage"), "voltage", "V"),
    MetricRule(("ENERGY", "Current"), "current", "A"),
    MetricRule(("ENERGY", "Total"), "energy_total", "kWh"),
    MetricRule(("ENERGY", "Today"), "energy_today", "kWh"),
)

# Shelly Gen2 (https://shelly-api-docs.shelly.cloud/gen2/General/Notifications): JSON-RPC notification
# frames on <id>/events/rpc; NotifyStatus (and NotifyFullStatus) carry the changed part of each component's
# status under "type:id" (switch:0, temperature:0, ...). Metric names keep the component: switch_0_power.
_SHELLY_RULES: Final = (
    MetricRule(("params", "*", "apower"), "{0}_power", "W"),
    MetricRule(("params", "*", "voltage"), "{0}_voltage", "V"),
    MetricRule(("params", "*", "current"), "{0}_current", "A"),
    MetricRule(("params", "*", "freq"), "{0}_frequency", "Hz"),
    MetricRule(("params", "*", "pf"), "{0}_power_factor"),
    MetricRule(("params", "*", "aenergy", "total"), "{0}_energy", "Wh"),
    MetricRule(("params", "*", "temperature", "tC"), "{0}_temperature", "°C"),
    MetricRule(("params", "*", "output"), "{0}_output"),
    MetricRule(("params", "*", "tC"), "{0}", "°C"),
    MetricRule(("params", "*", "rh"), "{0}", "%"),
    MetricRule(("params", "*", "lux"), "{0}", "lx"),
    MetricRule(("params", "*", "battery", "percent"), "{0}_battery", "%"),
    MetricRule(("params", "*", "battery", "V"), "{0}_battery_voltage", "V"),
    MetricRule(("params", "wifi", "rssi"), "wifi_rssi", "dBm"),
)


def _preset_zigbee2mqtt() -> Dialect:
    return Dialect(
        "zigbee2mqtt", "zigbee2mqtt/{device_id}", (MetricRule(("*",), "{0}"),), device_class="zigbee",
        units=_Z2M_UNITS, exclude=_Z2M_EXCLUDE, ts=("last_seen",), ignore_devices=frozenset({"bridge"}),
    )


def _preset_tasmota() -> Dialect:
    return Dialect("tasmota", "tele/{device_id}/SENSOR", _TASMOTA_RULES, device_class="tasmota")


def _preset_shelly() -> Dialect:
    return Dialect(
        "shelly", "{device_id}/events/rpc", _SHELLY_RULES, device_class="shelly", ts=("params", "ts"), ts_unit="s",
        match=((("method",), frozenset({"NotifyStatus", "NotifyFullStatus"})),),
    )


PRESETS: Final = {"zigbee2mqtt": _preset_zigbee2mqtt, "tasmota": _preset_tasmota, "shelly": _preset_shelly}


def preset(name: str) -> Dialect:
    """A shipped dialect by name (``zigbee2mqtt``, ``tasmota``, ``shelly``); KeyError for others."""
    return PRESETS[name]()


def multi_metric(template: TopicTemplate, name: str = "multi") -> Dialect:
    """Plain multi-metric JSON on the gateway's own taxonomy, one level up from the metric: the raw
    stage's topic without its ``{metric}`` level (``telemetry/raw/{version}/{site}/{device_class}/{device_id}``),
    each number (or boolean) of the object a metric; ``ts`` and ``seq`` as on the raw stage, and an optional
    ``units`` object (metric -> unit). Needs a template whose last level is ``{metric}``."""
    levels = template.template.split("/")
    if levels[-1] != "{metric}":
        raise TopicError(f"the multi-metric dialect needs a topic template ending in {{metric}}: {template.template}")
    topic = "/".join("raw" if level == "{stage}" else level for level in levels[:-1])
    return Dialect(
        name, topic, (MetricRule((WILDCARD,), "{0}"),), units_path=("units",),
        exclude=frozenset({"ts", "seq"}), ts=("ts",), ts_unit="s", seq=("seq",),
    )



def own_topic_filters(template: TopicTemplate, *also: str) -> tuple[str, ...]:
    """What the gateway itself publishes (its pipeline's stages, alerts, commands and their outcomes, its
    status, Home Assistant's discovery): no dialect reads these, or the gateway would read its own output
    (on an external broker it receives what it publishes whenever a dialect's filter covers it)."""
    return (*(template.stage_filter(s).pattern for s in ("valid", "rejected", "agg")),
            "alert/#", "cmd/#", "cmdack/#", "status/+/+", "homeassistant/#", *also)
