"""define: drafts -> readings validated against their catalog event type.

Each draft's type comes from the :class:`~pipeline.catalog.Catalog` (by topic version, device class
and metric; see :meth:`~pipeline.catalog.Catalog.reading_type`). A draft no type covers is rejected
as ``unknown_event_type``; one its type refuses as ``invalid_event``, with pydantic's errors as the
detail. Each reading gets its event id here and is published on the ``valid`` stage as a CloudEvent
whose ``type`` is the event type's name.

This is the hot path: what depends only on the topic (the type, its compiled validators and
serializer, the valid topic, the event source) is worked out once per topic and memoised, and a batch is
validated one topic at a time, column by column: one pydantic call checks every reading of the topic
against the type (the readings' ``value`` column as ``list[<value's type and constraints>]``, and so on).
Only when that call finds a problem are that topic's readings validated one by one, for each reading's
own error. The result is a :class:`~pipeline.readings.ReadingBatch` (columns per topic, readings made
as objects only when asked for), and the valid events are raised deferred: they are made only if
somebody consumes their topic (gateway/publish.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, partial
from itertools import repeat
from typing import Annotated, Any, Final

from pydantic import BaseModel, ValidationError, create_model
from pydantic_core import to_jsonable_python

from pipeline.catalog import Catalog, EventType
from pipeline.collect import parse_json
from pipeline.model import CLOUDEVENTS_SPEC, Quality, Reading, cloudevent, new_event_id, to_ms
from pipeline.readings import SHARED, ReadingBatch, Run, ms_columns
from pipeline.stage import Draft, Emitter, StageStats
from pipeline.topics import TopicFields, TopicTemplate

_ROUTE_CACHE_SIZE: Final = 4096
_NO_DEVICE_TIME: Final = (Quality.DEVICE_TIME_MISSING,)


@dataclass(frozen=True, slots=True)
class _Route:
    """What a raw topic's drafts share: their type (None: unknown, with the problem) and the rest."""

    event_type: EventType | None
    problem: str
    validate: Callable[[Any], Any]  # one reading (its own errors)
    columns: Callable[[Any], Any] | None  # the batch's readings of this type at once; None: one by one only
    serialize: Callable[..., Any]
    valid_topic: str | None
    source: str
    unit: str | None  # the declared unit, for readings that carry none
    fields: TopicFields
    shared_ok: bool  # the topic's own fields (site, device, class, metric) pass the type: checked once


@dataclass(frozen=True, slots=True)
class _Columns:
    """A type's validators for many readings at once: ``shared`` checks what a topic fixes (site, device,
    class, metric) once per topic; ``varying`` checks every other field as a list of what the model
    takes (the same type and constraints), for a whole batch in one call."""

    shared: Callable[[Any], Any]
    varying: Callable[[Any], Any]


def columns_validator(model: type[BaseModel]) -> _Columns | None:
    """None for a model with Python validators of its own (those run per reading)."""
    decorators = model.__pydantic_decorators__
    if (decorators.validators or decorators.field_validators or decorators.root_validators
            or decorators.model_validators):
        return None
    shared: dict[str, Any] = {}
    varying: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        if name in SHARED:
            shared[name] = (annotation, ...)
        else:
            varying[name] = (list[annotation], ...)
    config = model.model_config
    one: type[BaseModel] = create_model(f"{model.__name__}Shared", __config__=config, **shared)
    many: type[BaseModel] = create_model(f"{model.__name__}Columns", __config__=config, **varying)
    return _Columns(one.__pydantic_validator__.validate_python, many.__pydantic_validator__.validate_python)


def _quality(draft: Draft) -> tuple[Quality, ...]:
    flags = tuple(Quality(flag) for flag in draft.quality)
    return flags if draft.device_ts or flags else (Quality.DEVICE_TIME_MISSING,)


class ValidEvents:
    """A run's valid events, made when published (see :class:`~pipeline.stage.Deferred`)."""

    __slots__ = ("route", "run", "topic", "type_name")

    def __init__(self, topic: str, run: Run, route: _Route, type_name: str) -> None:
        self.topic = topic
        self.run = run
        self.route = route
        self.type_name = type_name

    @property
    def count(self) -> int:
        return len(self.run)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Each reading's CloudEvent, made straight from the run's columns (define validated them): the
        same dicts, to the byte once encoded, as the reading's model would serialize in JSON mode (its field
        order; times, quality flags and declared extra fields as JSON values, made in one call a run)."""
        route, name, topic, run = self.route, self.type_name, self.topic, self.run
        names = _data_fields(run.model)
        extras = run.extras or {}
        if len(names) != len(_BASE_FIELDS) + len(extras) or any(n not in extras for n in names[len(_BASE_FIELDS):]):
            return [(topic, _valid_event(reading, route, name)) for reading in run.readings()]  # columns lacking
        jsonable = to_jsonable_python({"device_ts": run.device_ts, "received_at": run.received_at, **extras})
        size = len(run)
        columns = (
            run.ids, repeat(run.site, size), repeat(run.device_id, size), repeat(run.device_class, size),
            run.transports, repeat(run.metric, size), run.values, run.units, jsonable["device_ts"],
            jsonable["received_at"], run.seqs, _flags(run.quality), *(jsonable[n] for n in names[len(_BASE_FIELDS):]),
        )
        source = route.source
        events = []
        for data, device_ts, received_at in zip(map(dict, map(partial(zip, names), zip(*columns, strict=True))),
                                                run.device_ts, run.received_at, strict=True):
            ts = device_ts or received_at
            events.append((topic, {
                "specversion": CLOUDEVENTS_SPEC,
                "id": data["id"],
                "source": source,
                "type": name,
                "subject": topic,
                # A UTC time (what collect always makes): the text made for ``data``; else as cloudevent() writes it
                "time": (data["device_ts"] or data["received_at"]) if ts.tzinfo is UTC else _utc_text(ts),
                "datacontenttype": "application/json",
                "data": data,
            }))
        return events


class DefineStage:
    name = "define"

    def __init__(self, template: TopicTemplate, *, publish_valid: bool = True, catalog: Catalog | None = None) -> None:
        """Without a ``catalog``: the built-in (lenient) one, where any numeric metric is a reading."""
        self._template = template
        self._publish_valid = publish_valid
        self.catalog = catalog or Catalog(template)
        self._routes: dict[str, _Route] = {}
        self._columns: dict[type[BaseModel], _Columns | None] = {}
        self.stats = StageStats()

    def set_catalog(self, catalog: Catalog) -> None:
        """A reload changed the catalog: every topic's type is worked out again."""
        self.catalog = catalog
        self._routes.clear()
        self._columns.clear()

    def _route(self, draft: Draft) -> _Route:
        fields = draft.fields
        found = self.catalog.reading_type(fields)
        event_type, problem = (found, "") if isinstance(found, EventType) else (None, found)
        model: type[BaseModel] = event_type.model if event_type else Reading
        if model not in self._columns:
            self._columns[model] = columns_validator(model)
        columns = self._columns[model]
        shared_ok = True
        if columns is not None:
            try:
                columns.shared({name: getattr(fields, name) for name in SHARED})
            except ValidationError:
                shared_ok = False  # every reading of the topic fails: each is validated alone, for its errors
        route = _Route(
            event_type, problem, model.__pydantic_validator__.validate_python,
            columns.varying if columns is not None else None,
            model.__pydantic_serializer__.to_python, self._template.with_stage(draft.topic, "valid"),
            f"/iotgw/{fields.site}/{fields.device_id}", event_type.unit if event_type else None, fields, shared_ok,
        )
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[draft.topic] = route
        return route

    async def process(self, batch: Sequence[Draft], emit: Emitter) -> ReadingBatch:
        ids = _ids(batch)
        topics: dict[str, list[int]] = {}
        for i, draft in enumerate(batch):
            positions = topics.get(draft.topic)
            if positions is None:
                topics[draft.topic] = [i]
            else:
                positions.append(i)
        # Topics by event type: each type's readings are validated in one call.
        routes = self._routes
        by_type: dict[EventType, list[tuple[_Route, list[int]]]] = {}
        alone: list[tuple[_Route, EventType, list[int]]] = []
        rejects: list[tuple[int, str, str]] = []  # (position, reason, detail): reported in arrival order
        for topic, positions in topics.items():
            route = routes.get(topic) or self._route(batch[positions[0]])
            event_type = route.event_type
            if event_type is None:
                rejects.extend((i, "unknown_event_type", route.problem) for i in positions)
            elif route.columns is None or not route.shared_ok:
                alone.append((route, event_type, positions))
            else:
                by_type.setdefault(event_type, []).append((route, positions))
        runs: list[tuple[_Route, Run]] = []
        for event_type, group in by_type.items():
            made = self._columnar(event_type, group, batch, ids)
            if made is None:
                alone.extend((route, event_type, positions) for route, positions in group)
            else:
                runs.extend(made)
        for route, event_type, positions in alone:
            run = self._one_by_one(route, event_type, positions, [batch[i] for i in positions], ids, rejects)
            if len(run):
                runs.append((route, run))
        self._emit(batch, runs, rejects, emit)
        out = ReadingBatch([run for _, run in runs])
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out

    def _emit(self, batch: Sequence[Draft], runs: list[tuple[_Route, Run]], rejects: list[tuple[int, str, str]],
              emit: Emitter) -> None:
        """The valid events (deferred: made if wanted), and the rejects in arrival order."""
        if self._publish_valid:
            for route, run in runs:
                if route.valid_topic is not None and route.event_type is not None:
                    emit.defer(ValidEvents(route.valid_topic, run, route, route.event_type.name))
        rejects.sort(key=lambda r: r[0])
        for i, reason, detail in rejects:
            draft = batch[i]
            self.stats.rejected[reason] += 1
            emit.reject(self.name, reason, detail, draft.topic, draft.payload)

    @staticmethod
    def _columnar(event_type: EventType, group: list[tuple[_Route, list[int]]], batch: Sequence[Draft],
                  ids: list[str]) -> list[tuple[_Route, Run]] | None:
        """The batch's readings of one type validated at once, as one run per topic; None when some
        reading fails (then each is validated alone, for its own error)."""
        order = [i for _, positions in group for i in positions]
        drafts = [batch[i] for i in order]
        unit = event_type.unit
        data: dict[str, Any] = {
            "id": [ids[i] for i in order],
            "transport": [d.transport for d in drafts],
            "value": [d.value for d in drafts],
            "unit": [d.unit for d in drafts] if unit is None else
                    [unit if d.unit is None else d.unit for d in drafts],
            "device_ts": [d.device_ts for d in drafts],
            "received_at": [d.received_at for d in drafts],
            "seq": [d.seq for d in drafts],
            "quality": [_quality(d) if d.quality else (() if d.device_ts else _NO_DEVICE_TIME) for d in drafts],
        }
        extras = event_type.extra_fields
        if extras:
            for name in extras:
                data[name] = []
            for d in drafts:
                found = _extra_fields(d.payload, extras)
                for name in extras:
                    data[name].append(found.get(name))
        columns = group[0][0].columns
        assert columns is not None
        try:
            valid = columns(data)
        except ValidationError:
            return None
        runs: list[tuple[_Route, Run]] = []
        model: Any = event_type.model
        # The times in milliseconds (what the store writes and analyze windows by), for the whole batch at once
        # and here, in the front half of the pipeline, not on the store's thread.
        ts_ms, received_ms = ms_columns(valid.device_ts, valid.received_at)
        if len(group) == 1:  # one topic of this type in the batch: its run takes the columns as they are
            route, positions = group[0]
            f = route.fields
            return [(route, Run(
                model, f.site, f.device_id, f.device_class, f.metric, positions, valid.id, valid.transport,
                valid.value, valid.unit, valid.device_ts, valid.received_at, valid.seq, valid.quality,
                {name: getattr(valid, name) for name in extras} if extras else None,
                _ts_ms=ts_ms, _received_ms=received_ms,
            ))]
        # each topic's part of each column (the columns looked up once, not once a topic)
        ids, transports, values, units = valid.id, valid.transport, valid.value, valid.unit
        device_ts, received_at, seqs, quality = valid.device_ts, valid.received_at, valid.seq, valid.quality
        start = 0
        for route, positions in group:
            stop = start + len(positions)
            f = route.fields
            runs.append((route, Run(
                model, f.site, f.device_id, f.device_class, f.metric, positions, ids[start:stop],
                transports[start:stop], values[start:stop], units[start:stop], device_ts[start:stop],
                received_at[start:stop], seqs[start:stop], quality[start:stop],
                {name: getattr(valid, name)[start:stop] for name in extras} if extras else None,
                _ts_ms=ts_ms[start:stop], _received_ms=received_ms[start:stop],
            )))
            start = stop
        return runs

    @staticmethod
    def _one_by_one(route: _Route, event_type: EventType, positions: list[int], drafts: list[Draft],  # noqa: PLR0917
                    ids: list[str], rejects: list[tuple[int, str, str]]) -> Run:
        """Each reading validated by itself: the good ones kept, each bad one rejected with its errors."""
        fields = route.fields
        good: list[int] = []
        readings: list[Reading] = []
        for i, draft in zip(positions, drafts, strict=True):
            data = {
                "id": ids[i],
                "site": fields.site,
                "device_id": fields.device_id,
                "device_class": fields.device_class,
                "transport": draft.transport,
                "metric": fields.metric,
                "value": draft.value,
                "unit": route.unit if draft.unit is None else draft.unit,
                "device_ts": draft.device_ts,
                "received_at": draft.received_at,
                "seq": draft.seq,
                "quality": _quality(draft) if draft.quality else (() if draft.device_ts else _NO_DEVICE_TIME),
            }
            if event_type.extra_fields:
                data.update(_extra_fields(draft.payload, event_type.extra_fields))
            try:
                readings.append(route.validate(data))
            except ValidationError as exc:
                detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                rejects.append((i, "invalid_event", f"{event_type.key}: {detail}"))
                continue
            good.append(i)
        run = ReadingBatch.of(readings).runs
        if not run:
            return Run(event_type.model, fields.site, fields.device_id, fields.device_class, fields.metric,  # type: ignore[arg-type]
                       [], [], [], [], [], [], [], [], [])
        [one] = run  # one topic: one model, one device, one metric
        one.positions = good
        if event_type.extra_fields:
            one.extras = {name: [getattr(r, name) for r in readings] for name in event_type.extra_fields}
        return one


def _ids(batch: Sequence[Draft]) -> list[str]:
    """Each draft's event id; those without one get one here, in arrival order (so they increase)."""
    ids = [draft.event_id for draft in batch]
    if "" in ids:
        for i, draft in enumerate(batch):
            if not ids[i]:
                ids[i] = new_event_id(to_ms(draft.received_at))
    return ids


def _extra_fields(payload: bytes, names: tuple[str, ...]) -> dict[str, Any]:
    """The declared extra fields present in the raw JSON object (collect has parsed it once already)."""
    try:
        body = parse_json(payload)
    except (ValueError, RecursionError):
        return {}
    return {name: body[name] for name in names if name in body} if isinstance(body, dict) else {}


_BASE_FIELDS: Final = tuple(Reading.model_fields)  # id, site, ... quality: what every run has as columns


@cache
def _data_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """A reading model's fields in the order its serializer writes them: :class:`Reading`'s, then declared
    extras (a declared type redefines ``value`` and ``unit`` in place)."""
    names = tuple(model.model_fields)
    return names if names[:len(_BASE_FIELDS)] == _BASE_FIELDS else ()  # () never matches: the model path


def _flags(quality: list[tuple[Quality, ...]]) -> list[list[str]]:
    """Quality flags as JSON values: each reading's own list. The same few sets come again and again, and an
    enum's value is a Python property (to_jsonable_python calls it for every flag): each set is read once."""
    texts: dict[tuple[Quality, ...], tuple[str, ...]] = {}
    out = []
    for flags in quality:
        text = texts.get(flags)
        if text is None:
            text = texts[flags] = tuple(flag.value for flag in flags)
        out.append(list(text))
    return out


def _utc_text(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")  # pipeline.model.cloudevent's


def _valid_event(reading: Reading, route: _Route, type_: str) -> dict[str, Any]:
    """The reading as a CloudEvent; the same as :func:`~pipeline.model.cloudevent` builds, but a UTC time
    (what collect always makes) reuses the text the serializer already wrote for ``data``."""
    data: dict[str, Any] = route.serialize(reading, mode="json")
    ts = reading.device_ts or reading.received_at
    topic = route.valid_topic
    assert topic is not None
    if ts.tzinfo is not UTC:
        return cloudevent(event_id=reading.id, source=route.source, type_=type_, subject=topic, time=ts, data=data)
    return {
        "specversion": CLOUDEVENTS_SPEC,
        "id": reading.id,
        "source": route.source,
        "type": type_,
        "subject": topic,
        "time": data["device_ts"] or data["received_at"],
        "datacontenttype": "application/json",
        "data": data,
    }
