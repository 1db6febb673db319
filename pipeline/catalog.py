"""The event catalog: every event type the gateway publishes or accepts, with its schema.

An :class:`EventType` has a name (the CloudEvents ``type``, ending in ``.v{MAJOR}``), a version
``MAJOR.MINOR`` (the taxonomy's version level), a :class:`TopicPattern` over the topic taxonomy, a
pydantic model for its ``data`` (fields with types and units), the device classes that produce it
and a description.

Built-in types cover what the gateway publishes itself: readings on ``valid``, aggregates on
``agg``, rejects on ``rejected``, command acks, alerts raised and cleared by rules, and the gateway's
own ``outbox_dropped`` alert. Declared types (config ``[[catalog.types]]`` and catalog files) are
readings of one metric from one or more device classes, with the unit and range of ``value`` and
extra fields read from the device's raw JSON object.

Which type validates a raw reading (see :meth:`Catalog.reading_type`):

* a declared type whose version, device class and metric match the topic's;
* a metric that some declared type covers for that device class, but not at the topic's version:
  unknown (``unknown_event_type``), so a device cannot skip validation by changing the version;
* anything else: the built-in reading type, unless the catalog is strict, where it is unknown.

Versioning rule, checked when the catalog is built: a minor version (``1.1``) of a type keeps every
field of the previous minor (same type, unit and requiredness, same value unit and metric) and adds
optional fields only, so a consumer of the major reads every minor.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, create_model
from pydantic.config import JsonDict

from pipeline.errors import PipelineError
from pipeline.model import AGGREGATE_TYPE, ALERT_TYPE, COMMAND_ACK_TYPE, READING_TYPE, REJECT_TYPE, Reading
from pipeline.topics import DEFAULT_VERSION, TopicFields, TopicFilter, TopicTemplate

__all__ = [
    "ALERT_CLEARED_TYPE",
    "FIELD_TYPES",
    "Catalog",
    "CatalogError",
    "EventType",
    "FieldDecl",
    "Param",
    "TopicPattern",
    "TypeDecl",
    "ValueDecl",
    "check_name",
]

ALERT_CLEARED_TYPE: Final = "io.iotgw.alert.cleared.v1"
BUILTIN_PREFIX: Final = "io.iotgw."
FieldType = Literal["number", "integer", "string", "boolean", "datetime"]
FIELD_TYPES: Final[Mapping[str, Any]] = {
    "number": float, "integer": int, "string": str, "boolean": bool, "datetime": AwareDatetime,
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.v(\d+)$")
_VERSION = re.compile(r"^(\d+)\.(\d+)$")
_MODEL_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9]+")
_TOPIC_CACHE_SIZE: Final = 4096


class CatalogError(PipelineError):
    """The catalog's declarations are inconsistent (a bad name, a minor version that breaks its major...)."""


# --------------------------------------------------------------------------
# Declarations (what config and catalog files provide; see gateway/config/catalog.py)
# --------------------------------------------------------------------------


class FieldDecl(Protocol):
    @property
    def type(self) -> FieldType: ...
    @property
    def unit(self) -> str | None: ...
    @property
    def description(self) -> str: ...
    @property
    def required(self) -> bool: ...
    @property
    def minimum(self) -> float | None: ...
    @property
    def maximum(self) -> float | None: ...


class ValueDecl(Protocol):
    @property
    def unit(self) -> str | None: ...
    @property
    def minimum(self) -> float | None: ...
    @property
    def maximum(self) -> float | None: ...
    @property
    def description(self) -> str: ...


class TypeDecl(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def metric(self) -> str: ...
    @property
    def device_classes(self) -> Sequence[str]: ...
    @property
    def description(self) -> str: ...
    @property
    def value(self) -> ValueDecl: ...
    @property
    def fields(self) -> Mapping[str, FieldDecl]: ...


def check_name(name: str, version: str) -> str | None:
    """Why ``name``/``version`` cannot name a declared type, or None."""
    version_match = _VERSION.fullmatch(version)
    if version_match is None:
        return f"version {version!r} must be MAJOR.MINOR, for example 1.0"
    name_match = _NAME.fullmatch(name)
    if name_match is None:
        return f"name {name!r} must be dot-separated words ending in .v<MAJOR>, for example com.example.temperature.v1"
    if name.startswith(BUILTIN_PREFIX):
        return f"name {name!r}: the prefix {BUILTIN_PREFIX!r} is reserved for built-in types"
    if int(name_match.group(2)) != int(version_match.group(1)):
        return f"name {name!r} ends in .v{name_match.group(2)} but version {version} has major {version_match.group(1)}"
    return None


# --------------------------------------------------------------------------
# Topic patterns
# --------------------------------------------------------------------------

PARAM_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "stage": "pipeline stage",
    "version": "MAJOR.MINOR version of the event type",
    "site": "the gateway's site (config `site`)",
    "device_class": "class of the producing device (config `devices[].device_class`)",
    "device_id": "id of the producing device",
    "metric": "measured quantity, e.g. temperature",
    "gateway_id": "the gateway's id (config `gateway_id`)",
    "command": "command name",
}


@dataclass(frozen=True, slots=True)
class Param:
    """A placeholder level of a topic pattern; ``values`` restricts it (empty: any non-empty level)."""

    name: str
    values: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "{" + self.name + ("=" + "|".join(self.values) if self.values else "") + "}"


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """Levels that are literal text or :class:`Param` placeholders, e.g.
    ``telemetry/valid/1.0/{site}/environment/{device_id}/temperature``.

    Rendered with ``str()``; a restricted placeholder shows its values: ``{device_class=a|b}``.
    """

    levels: tuple[str | Param, ...]
    _filter: TopicFilter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mqtt = "/".join("+" if isinstance(level, Param) and len(level.values) != 1 else
                        (level.values[0] if isinstance(level, Param) else level) for level in self.levels)
        object.__setattr__(self, "_filter", TopicFilter(mqtt, "mqtt"))

    @classmethod
    def parse(cls, pattern: str, fixed: Mapping[str, str | Sequence[str]] | None = None) -> TopicPattern:
        """``a/{b}/c``: ``{name}`` levels are placeholders; ``fixed`` restricts some to given values."""
        fixed = fixed or {}
        levels: list[str | Param] = []
        for level in pattern.split("/"):
            if level.startswith("{") and level.endswith("}"):
                name = level[1:-1]
                value = fixed.get(name)
                if isinstance(value, str):
                    levels.append(value)
                else:
                    levels.append(Param(name, tuple(value) if value else ()))
            else:
                levels.append(level)
        return cls(tuple(levels))

    def __str__(self) -> str:
        return "/".join(str(level) for level in self.levels)

    @property
    def address(self) -> str:
        """The AsyncAPI channel address: placeholders as ``{name}``."""
        return "/".join("{" + level.name + "}" if isinstance(level, Param) else level for level in self.levels)

    @property
    def params(self) -> tuple[Param, ...]:
        return tuple(level for level in self.levels if isinstance(level, Param))

    @property
    def specificity(self) -> int:
        """How many levels are fixed: of two overlapping patterns, the more specific one wins."""
        return sum(2 if isinstance(level, str) else 1 if level.values else 0 for level in self.levels)

    def matches(self, topic: str) -> bool:
        if not self._filter.matches(topic):
            return False
        levels = topic.split("/")
        for level, value in zip(self.levels, levels, strict=True):
            if isinstance(level, Param) and (not value or (level.values and value not in level.values)):
                return False
        return True

    def overlaps(self, topic_filter: TopicFilter) -> bool:
        """True if some topic of this pattern matches ``topic_filter`` (a subscription).

        A witness topic is built from the pattern, taking the filter's literal level where the pattern
        has a placeholder, and both are asked whether they match it.
        """
        single, multi = ("+", "#") if topic_filter.syntax == "mqtt" else ("*", ">")
        filter_levels = topic_filter.pattern.split("/")
        witness: list[str] = []
        for i, level in enumerate(self.levels):
            if isinstance(level, str):
                witness.append(level)
                continue
            wanted = filter_levels[i] if i < len(filter_levels) else multi
            prefix_wildcard = topic_filter.syntax == "smf" and wanted.endswith("*")
            if wanted not in (single, multi) and not prefix_wildcard:
                witness.append(wanted)  # a literal level of the filter: the pattern must accept it
                continue
            prefix = wanted[:-1] if prefix_wildcard else ""
            witness.append(next((v for v in level.values if v.startswith(prefix)), prefix + "x"))
        topic = "/".join(witness)
        return self.matches(topic) and topic_filter.matches(topic)


def telemetry_pattern(template: TopicTemplate, stage: str, fixed: Mapping[str, str | Sequence[str]]) -> TopicPattern:
    return TopicPattern.parse(template.template, {"stage": stage, **fixed})


# --------------------------------------------------------------------------
# Built-in data models
# --------------------------------------------------------------------------


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class AggregateData(_Data):
    """Running aggregate of one series since the gateway started."""

    device_id: str
    metric: str
    unit: str | None = Field(description="unit of mean, min and max (the readings' unit)")
    count: int = Field(ge=1, description="readings aggregated")
    mean: float
    min: float
    max: float
    from_: datetime | None = Field(alias="from", description="time of the first reading")
    to: datetime | None = Field(description="time of the last reading")


class RejectedData(_Data):
    """A message a stage dropped, with the reason; the original payload is kept."""

    stage: str = Field(description="collect, clean, define, store, analyze or driver")
    reason: str = Field(description="e.g. invalid_json, out_of_range, unknown_event_type, invalid_event")
    detail: str
    topic: str = Field(description="the topic the message came on")
    payload: str
    payload_encoding: Literal["utf-8", "base64"]


class CommandAckData(_Data):
    """The outcome of a downlink command."""

    device_id: str
    command: str
    status: str = Field(description="delivered, no_subscriber, device_offline or an argument error")
    via: str = Field(description="the forward destination the command came from")
    command_event_id: str


class AlertData(_Data):
    """An alert raised or cleared by a rule (threshold, rate of change, z-score, device inactivity)."""

    rule: str = Field(description="name of the rule in config")
    kind: Literal["threshold", "rate", "zscore", "inactivity"]
    device_id: str
    metric: str
    severity: str
    value: float = Field(description="the value that raised or cleared the alert, in the metric's unit")
    message: str
    raised_at: AwareDatetime = Field(description="when the alert was raised (RFC 3339)")


class OutboxDroppedData(_Data):
    """The gateway dropped the oldest events of a full outbox (policy drop_oldest)."""

    alert: Literal["outbox_dropped"]
    destination: str = Field(description="the forward destination whose outbox was full")
    dropped: int = Field(ge=1, json_schema_extra={"x-unit": "events"})
    policy: str


# --------------------------------------------------------------------------
# Event types
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class EventType:
    name: str
    version: str
    pattern: TopicPattern
    model: type[BaseModel]
    description: str
    device_classes: tuple[str, ...] = ()  # () = any device class, or produced by the gateway itself
    metric: str | None = None  # readings: the metric the type covers; None = any
    reading: bool = False  # validated on ingest from the raw stage
    builtin: bool = True
    variant: str = ""  # tells apart two shapes of one CloudEvents type (the gateway's own alerts)
    extra_fields: tuple[str, ...] = ()  # data fields read from the device's raw JSON object
    unit: str | None = None  # the declared unit of ``value`` (readings)

    @property
    def key(self) -> str:
        """Unique within a catalog: ``name@version`` (``#variant``)."""
        return f"{self.name}@{self.version}" + (f"#{self.variant}" if self.variant else "")

    @property
    def major(self) -> int:
        return int(self.version.split(".", 1)[0])

    def data_schema(self, ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
        return self.model.model_json_schema(mode="serialization", ref_template=ref_template)

    def schema_fields(self) -> list[dict[str, Any]]:
        """The data fields: name, JSON type, unit, required, description."""
        schema = self.data_schema()
        required = set(schema.get("required", ()))
        out = []
        for name, prop in schema.get("properties", {}).items():
            out.append({
                "name": name, "type": _json_type(prop), "unit": prop.get("x-unit"), "required": name in required,
                "description": prop.get("description", ""),
            })
        return out


def _json_type(prop: Mapping[str, Any]) -> str:
    if "const" in prop:
        return f"const {prop['const']!r}"
    if "enum" in prop:
        return "|".join(map(str, prop["enum"]))
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return "|".join(_json_type(p) for p in prop["anyOf"])
    kind = str(prop.get("type", "any"))
    if kind == "array" and isinstance(prop.get("items"), Mapping):
        return f"array of {_json_type(prop['items'])}"
    return kind + (f" ({prop['format']})" if "format" in prop else "")


def builtin_types(template: TopicTemplate, *, lenient_readings: bool) -> list[EventType]:
    """The types the gateway publishes itself. Telemetry topics carry the raw message's version level,
    so their patterns keep ``{version}``."""
    types = [
        EventType(AGGREGATE_TYPE, DEFAULT_VERSION, telemetry_pattern(template, "agg", {}), AggregateData,
                  "running count/mean/min/max of a series, published at most once per agg_interval_s"),
        EventType(REJECT_TYPE, DEFAULT_VERSION, telemetry_pattern(template, "rejected", {}), RejectedData,
                  "a message a stage dropped, with the reason and the original payload"),
        EventType(ALERT_TYPE, DEFAULT_VERSION, TopicPattern.parse("alert/raised/1.0/{site}/{device_class}/{device_id}/"
                                                                  "{metric}"), AlertData,
                  "an alert raised by a rule (threshold with hysteresis, rate of change, z-score)"),
        EventType(ALERT_CLEARED_TYPE, DEFAULT_VERSION, TopicPattern.parse("alert/cleared/1.0/{site}/{device_class}/"
                                                                          "{device_id}/{metric}"), AlertData,
                  "an alert cleared by its rule"),
        EventType(ALERT_TYPE, DEFAULT_VERSION,
                  TopicPattern.parse("alert/raised/1.0/{site}/gateway/{gateway_id}/outbox_dropped"),
                  OutboxDroppedData, "the gateway dropped the oldest events of a full forward outbox",
                  variant="outbox_dropped"),
        EventType(COMMAND_ACK_TYPE, DEFAULT_VERSION, TopicPattern.parse("cmdack/{site}/{device_id}/{command}"),
                  CommandAckData, "the outcome of a downlink command (cmd/{site}/{device_id}/{command})"),
    ]
    if lenient_readings:
        types.insert(0, EventType(
            READING_TYPE, DEFAULT_VERSION, telemetry_pattern(template, "valid", {}), Reading,
            "one validated measurement of any numeric metric (the catalog is not strict)", reading=True,
        ))
    return types


def declared_type(decl: TypeDecl, template: TopicTemplate) -> EventType:
    """An :class:`EventType` for a declared reading (checked by :func:`check_declarations`): the built-in
    reading's fields, ``value`` with its unit and range, and the extra fields."""
    value = decl.value
    extra: JsonDict = {"x-unit": value.unit} if value.unit else {}
    definitions: dict[str, Any] = {
        "value": (float, Field(ge=value.minimum, le=value.maximum, description=value.description or None,
                               json_schema_extra=extra or None)),
    }
    if value.unit is not None:
        unit_type: Any = Literal[value.unit]  # a one-value Literal built from config
        definitions["unit"] = (unit_type, Field(default=value.unit, description="the declared unit of value"))
    for name, spec in decl.fields.items():
        annotation = FIELD_TYPES[spec.type]
        schema_extra: JsonDict | None = {"x-unit": spec.unit} if spec.unit else None
        constraints: dict[str, Any] = {}
        if spec.type in ("number", "integer"):
            constraints = {"ge": spec.minimum, "le": spec.maximum}
        if spec.required:
            definitions[name] = (annotation, Field(description=spec.description or None,
                                                   json_schema_extra=schema_extra, **constraints))
        else:
            definitions[name] = (annotation | None, Field(default=None, description=spec.description or None,
                                                          json_schema_extra=schema_extra, **constraints))
    model_name = _MODEL_NAME_UNSAFE.sub("_", f"{decl.name}_{decl.version}").strip("_")
    model: type[BaseModel] = create_model(model_name, __base__=Reading, __doc__=decl.description or None,
                                          **definitions)
    return EventType(
        decl.name, decl.version,
        telemetry_pattern(template, "valid", {"version": decl.version, "metric": decl.metric,
                                              "device_class": _one_or_many(decl.device_classes)}),
        model, decl.description, device_classes=tuple(decl.device_classes), metric=decl.metric, reading=True,
        builtin=False, extra_fields=tuple(decl.fields), unit=value.unit,
    )


def _one_or_many(values: Sequence[str]) -> str | Sequence[str]:
    return values[0] if len(values) == 1 else tuple(values)


def check_minor(previous: TypeDecl, current: TypeDecl) -> str | None:
    """Why ``current`` (a later minor of ``previous``'s major) breaks its readers, or None."""
    if current.metric != previous.metric:
        return f"metric {current.metric!r} differs from {previous.version}'s {previous.metric!r}"
    if current.value.unit != previous.value.unit:
        return f"field 'value': unit {current.value.unit!r} differs from {previous.version}'s {previous.value.unit!r}"
    dropped = sorted(set(previous.device_classes) - set(current.device_classes))
    if dropped:
        return f"device class {dropped[0]!r} of {previous.version} is missing"
    for name, old in previous.fields.items():
        new = current.fields.get(name)
        if new is None:
            return f"field {name!r} of {previous.version} is missing (a minor version only adds fields)"
        if new.type != old.type:
            return f"field {name!r}: type {new.type!r} differs from {previous.version}'s {old.type!r}"
        if new.unit != old.unit:
            return f"field {name!r}: unit {new.unit!r} differs from {previous.version}'s {old.unit!r}"
        if new.required != old.required:
            return f"field {name!r}: required={new.required} differs from {previous.version}'s required={old.required}"
    for name, new in current.fields.items():
        if name not in previous.fields and new.required:
            return (f"field {name!r} is new and required; a minor version adds optional fields only"
                    f" (required = false), or declare a new major version")
    return None


def check_declarations(decls: Iterable[TypeDecl]) -> None:
    """Names, versions, duplicates, overlaps and the minor-version rule.

    Raises:
        CatalogError: naming the type, version and field.
    """
    by_name: dict[str, list[TypeDecl]] = {}
    covered: dict[tuple[str, str, str], str] = {}
    for decl in decls:
        problem = check_name(decl.name, decl.version)
        clash = sorted(set(decl.fields) & set(Reading.model_fields))
        if clash:
            problem = f"field {clash[0]!r} is a reading field already (declare `value` for the measurement itself)"
        if problem is not None:
            raise CatalogError(f"event type {decl.name} {decl.version}: {problem}")
        same = by_name.setdefault(decl.name, [])
        if any(d.version == decl.version for d in same):
            raise CatalogError(f"event type {decl.name} {decl.version} is declared twice")
        same.append(decl)
        for device_class in decl.device_classes:
            where = (decl.version, device_class, decl.metric)
            other = covered.setdefault(where, decl.name)
            if other != decl.name:
                raise CatalogError(
                    f"event type {decl.name} {decl.version}: metric {decl.metric!r} of device class "
                    f"{device_class!r} at version {decl.version} is already covered by {other}"
                )
    for name, versions in by_name.items():
        versions.sort(key=lambda d: tuple(int(p) for p in d.version.split(".")))
        for previous, current in itertools.pairwise(versions):
            if previous.version.split(".")[0] != current.version.split(".")[0]:
                continue  # a new major may change anything (and gets a new name: .vN)
            problem = check_minor(previous, current)
            if problem is not None:
                raise CatalogError(f"event type {name} {current.version}: {problem}")


# --------------------------------------------------------------------------
# The catalog
# --------------------------------------------------------------------------


class Catalog:
    """Built-in and declared event types; finds the type of a raw reading or of any topic."""

    def __init__(
        self, template: TopicTemplate, declared: Sequence[TypeDecl] = (), *, strict: bool = False
    ) -> None:
        check_declarations(declared)
        self.template = template
        self.strict = strict
        own = [declared_type(d, template) for d in declared]
        self.types: tuple[EventType, ...] = (*builtin_types(template, lenient_readings=not strict), *own)
        self._lenient = next((t for t in self.types if t.reading and t.builtin), None)
        self._declared: dict[tuple[str, str, str], EventType] = {}
        self._versions: dict[tuple[str, str], list[str]] = {}
        for event_type in own:
            assert event_type.metric is not None  # declared types are readings of one metric
            for device_class in event_type.device_classes:
                self._declared[(event_type.version, device_class, event_type.metric)] = event_type
                self._versions.setdefault((device_class, event_type.metric), []).append(event_type.version)
        # most specific first: a topic belongs to the first type whose pattern matches it
        self._by_specificity = sorted(self.types, key=lambda t: -t.pattern.specificity)
        self._topic_cache: dict[str, EventType | None] = {}

    def get(self, key: str) -> EventType | None:
        return next((t for t in self.types if t.key == key), None)

    def reading_type(self, fields: TopicFields) -> EventType | str:
        """The type that validates a raw reading on these topic fields, or why there is none."""
        found = self._declared.get((fields.version, fields.device_class, fields.metric))
        if found is not None:
            return found
        versions = self._versions.get((fields.device_class, fields.metric))
        if versions:
            return (f"version {fields.version} of metric {fields.metric!r} for device class {fields.device_class!r}"
                    f" is not declared (declared: {', '.join(sorted(versions))})")
        if self._lenient is not None:
            return self._lenient
        return (f"metric {fields.metric!r} is not declared for device class {fields.device_class!r}"
                " (the catalog is strict)")

    def type_for_topic(self, topic: str) -> EventType | None:
        """The most specific type whose pattern matches ``topic`` (memoised, bounded)."""
        cache = self._topic_cache
        if topic in cache:
            return cache[topic]
        found = next((t for t in self._by_specificity if t.pattern.matches(topic)), None)
        if len(cache) >= _TOPIC_CACHE_SIZE:
            cache.clear()
        cache[topic] = found
        return found

    def types_for_filter(self, topic_filter: TopicFilter) -> list[EventType]:
        """Every type some of whose topics a subscription with this filter receives."""
        return [t for t in self.types if t.pattern.overlaps(topic_filter)]
