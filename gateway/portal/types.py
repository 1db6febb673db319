"""The event types as the portal shows them: one record per version with its fields, the producers and
consumers learned from traffic beside the applications that declare them, a search over all that,
and each type's versions side by side with what changed from one to the next. Pure: the catalog,
what traffic taught and the declarations in, records out.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.config.catalog import CatalogSettings
from pipeline.catalog import Catalog, EventType
from pipeline.topics import compile_filter
from pipeline.traffic import Consumer, Producer

__all__ = [
    "SEARCH_SCOPES",
    "Change",
    "FieldShape",
    "TypeGroup",
    "TypeRecord",
    "VersionStep",
    "group_versions",
    "search",
    "type_records",
    "types_for_filter",
]

SEARCH_SCOPES = ("name", "field", "topic", "producer", "consumer")
Scope = Literal["name", "field", "topic", "producer", "consumer"]


@dataclass(frozen=True, slots=True)
class FieldShape:
    """What a reader of a field relies on."""

    type: str
    unit: str | None
    required: bool
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class TypeRecord:
    event_type: EventType = field(repr=False)
    source: str  # "built-in", "config", or the catalog file that declares it
    fields: Mapping[str, FieldShape]
    producers: tuple[Producer, ...]
    consumers: tuple[Consumer, ...]
    declared_producers: tuple[str, ...]  # applications that declare they produce this type
    declared_consumers: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.event_type.name

    @property
    def version(self) -> str:
        return self.event_type.version

    @property
    def topic(self) -> str:
        return str(self.event_type.pattern)


def _shapes(event_type: EventType) -> dict[str, FieldShape]:
    schema = event_type.data_schema()
    required = set(schema.get("required", ()))
    out = {}
    for spec in event_type.schema_fields():
        prop = schema["properties"][spec["name"]]
        bounds = next((p for p in prop.get("anyOf", [prop]) if "minimum" in p or "maximum" in p), prop)
        kind = spec["type"]
        if spec["name"] not in required:
            kind = kind.removesuffix("|null")  # optional is shown as such, not as a null type
        out[spec["name"]] = FieldShape(kind, spec["unit"], spec["name"] in required,
                                       bounds.get("minimum"), bounds.get("maximum"), spec["description"] or "")
    return out


def _sources(settings: CatalogSettings) -> dict[tuple[str, str], str]:
    """Where each declared (name, version) comes from: the config, or its catalog file."""
    out = {(t.name, t.version): "config" for t in settings.types}
    for path in settings.catalog_files:
        for decl in _file_types(path):
            out[(decl[0], decl[1])] = str(path)
    return out


def _file_types(path: Path) -> list[tuple[str, str]]:
    import tomllib  # noqa: PLC0415  only to attribute types to files

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return []
    return [(str(t.get("name")), str(t.get("version"))) for t in data.get("types", []) if isinstance(t, dict)]


def type_records(
    catalog: Catalog, settings: CatalogSettings, producers: Iterable[Producer], consumers: Iterable[Consumer],
) -> list[TypeRecord]:
    """Every type of ``catalog`` with what it carries, who was seen and who declares it."""
    produced: dict[str, list[Producer]] = {}
    consumed: dict[str, list[Consumer]] = {}
    for p in producers:
        produced.setdefault(p.type_key, []).append(p)
    for c in consumers:
        consumed.setdefault(c.type_key, []).append(c)
    sources = _sources(settings)
    apps = settings.all_applications
    return [
        TypeRecord(
            t, "built-in" if t.builtin else sources.get((t.name, t.version), "config"), _shapes(t),
            tuple(produced.get(t.key, ())), tuple(consumed.get(t.key, ())),
            tuple(a.name for a in apps if t.name in a.produces), tuple(a.name for a in apps if t.name in a.consumes),
        )
        for t in catalog.types
    ]


# -- search -------------------------------------------------------------------------------------------


def _terms(query: str) -> list[tuple[Scope | None, str, str]]:
    """``name:temp field:accuracy "air temp" co2``: scoped and bare terms, all of which must match."""
    try:
        words = shlex.split(query)
    except ValueError:  # an unbalanced quote: take the words as they are
        words = query.split()
    terms: list[tuple[Scope | None, str, str]] = []  # (scope, lower-cased, as typed)
    for word in words:
        scope, sep, text = word.partition(":")
        if sep and scope.lower() in SEARCH_SCOPES and text:
            terms.append((scope.lower(), text.lower(), text))  # type: ignore[arg-type]  # checked just above
        else:
            terms.append((None, word.lower(), word))
    return terms


def _haystacks(record: TypeRecord) -> dict[Scope, list[str]]:
    t = record.event_type
    return {
        "name": [t.name.lower(), t.key.lower(), t.description.lower(), record.source.lower()],
        "field": [f"{name} {shape.unit or ''} {shape.description}".lower() for name, shape in record.fields.items()],
        "topic": [str(t.pattern).lower()],
        "producer": [p.client.lower() for p in record.producers] + [a.lower() for a in record.declared_producers],
        "consumer": ([c.client.lower() for c in record.consumers] + [c.filter.lower() for c in record.consumers]
                     + [a.lower() for a in record.declared_consumers]),
    }


def _matches(record: TypeRecord, scope: Scope | None, text: str, raw: str,
             published_as: Mapping[str, str | None]) -> bool:
    hay = _haystacks(record)
    scopes: Sequence[Scope] = (scope,) if scope else SEARCH_SCOPES  # type: ignore[assignment]
    for s in scopes:
        if any(text in h for h in hay[s]):
            return True
        if s == "topic" and published_as.get(raw) == record.event_type.key:
            return True  # a concrete topic: the type it is published as
    return False


def _published_as(records: Sequence[TypeRecord], topic: str) -> str | None:
    """The key of the most specific type whose pattern takes ``topic`` (as the catalog decides)."""
    found = [r.event_type for r in records if r.event_type.pattern.matches(topic)]
    return max(found, key=lambda t: t.pattern.specificity).key if found else None


def search(records: Iterable[TypeRecord], query: str) -> list[TypeRecord]:
    """The records every term of ``query`` matches (case-insensitive substrings; ``topic:`` also takes a
    concrete topic and finds the type published on it). An empty query matches everything."""
    records = list(records)
    terms = _terms(query)
    published_as = {raw: _published_as(records, raw) for scope, _, raw in terms
                    if scope in ("topic", None) and "/" in raw}
    return [r for r in records if all(_matches(r, scope, text, raw, published_as) for scope, text, raw in terms)]


# -- versions side by side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    field: str  # a data field, or "device_classes", "metric", "topic"
    kind: Literal["added", "removed", "changed"]
    before: str | None
    after: str | None


@dataclass(frozen=True, slots=True)
class VersionStep:
    """From one version of a type to the next: what changed, and whether readers of the earlier one can
    read it (a minor step: optional fields added only, which the catalog enforces)."""

    before: str
    after: str
    compatible: bool
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class TypeGroup:
    name: str
    versions: tuple[TypeRecord, ...]  # oldest first
    steps: tuple[VersionStep, ...]


def _text(shape: FieldShape) -> str:
    bits = [shape.type + ("" if shape.required else "?")]
    if shape.unit:
        bits.append(f"[{shape.unit}]")
    if shape.minimum is not None or shape.maximum is not None:
        low = "" if shape.minimum is None else f"{shape.minimum:g}"
        high = "" if shape.maximum is None else f"{shape.maximum:g}"
        bits.append(f"{low}..{high}")
    return " ".join(bits)


def _step(before: TypeRecord, after: TypeRecord) -> VersionStep:
    changes: list[Change] = []
    for name in [*before.fields, *(n for n in after.fields if n not in before.fields)]:
        old, new = before.fields.get(name), after.fields.get(name)
        if old is None and new is not None:
            changes.append(Change(name, "added", None, _text(new)))
        elif new is None and old is not None:
            changes.append(Change(name, "removed", _text(old), None))
        elif old is not None and new is not None and _text(old) != _text(new):
            changes.append(Change(name, "changed", _text(old), _text(new)))
    b, a = before.event_type, after.event_type
    for label, old_value, new_value in (("device_classes", ", ".join(b.device_classes), ", ".join(a.device_classes)),
                                        ("metric", b.metric or "", a.metric or "")):
        if old_value != new_value:
            changes.append(Change(label, "changed", old_value or None, new_value or None))
    same_major = b.major == a.major
    return VersionStep(b.version, a.version, same_major, tuple(changes))


def _version_key(record: TypeRecord) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", record.version))


def group_versions(records: Iterable[TypeRecord]) -> list[TypeGroup]:
    """The records by CloudEvents type (and variant), versions oldest first, with the step between each
    two consecutive ones. Groups keep the catalog's order."""
    groups: dict[str, list[TypeRecord]] = {}
    for record in records:
        label = record.name + (f" ({record.event_type.variant})" if record.event_type.variant else "")
        groups.setdefault(label, []).append(record)
    out = []
    for label, versions in groups.items():
        versions.sort(key=_version_key)
        out.append(TypeGroup(label, tuple(versions), tuple(_step(a, b) for a, b in itertools.pairwise(versions))))
    return out


def types_for_filter(catalog: Catalog, pattern: str, syntax: Literal["auto", "mqtt", "smf"] = "auto"
                     ) -> list[EventType]:
    """The types a subscription with this filter receives (raises TopicError for a bad filter)."""
    return catalog.types_for_filter(compile_filter(pattern, syntax))

