"""define: drafts -> readings validated against their catalog event type.

Each draft's type comes from the :class:`~pipeline.catalog.Catalog` (by topic version, device class
and metric; see :meth:`~pipeline.catalog.Catalog.reading_type`). A draft no type covers is rejected
as ``unknown_event_type``; one its type refuses as ``invalid_event``, with pydantic's errors as the
detail. Each reading gets its event id here and is published on the ``valid`` stage as a CloudEvent
whose ``type`` is the event type's name.

This is the hot path: what depends only on the topic (the type, its compiled validator and
serializer, the valid topic, the event source) is worked out once per topic and memoised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from pipeline.catalog import Catalog, EventType
from pipeline.model import CLOUDEVENTS_SPEC, Quality, Reading, cloudevent, new_event_id, to_ms
from pipeline.stage import Draft, Emitter, StageStats
from pipeline.topics import TopicTemplate

_ROUTE_CACHE_SIZE: Final = 4096
_NO_DEVICE_TIME: Final = (Quality.DEVICE_TIME_MISSING,)


@dataclass(frozen=True, slots=True)
class _Route:
    """What a raw topic's drafts share: their type (None: unknown, with the problem) and the rest."""

    event_type: EventType | None
    problem: str
    validate: Callable[[Any], Any]
    serialize: Callable[..., Any]
    valid_topic: str | None
    source: str
    unit: str | None  # the declared unit, for readings that carry none


def _quality(draft: Draft) -> tuple[Quality, ...]:
    flags = tuple(Quality(flag) for flag in draft.quality)
    return flags if draft.device_ts or flags else (Quality.DEVICE_TIME_MISSING,)


class DefineStage:
    name = "define"

    def __init__(self, template: TopicTemplate, *, publish_valid: bool = True, catalog: Catalog | None = None) -> None:
        """Without a ``catalog``: the built-in (lenient) one, where any numeric metric is a reading."""
        self._template = template
        self._publish_valid = publish_valid
        self.catalog = catalog or Catalog(template)
        self._routes: dict[str, _Route] = {}
        self.stats = StageStats()

    def set_catalog(self, catalog: Catalog) -> None:
        """A reload changed the catalog: every topic's type is worked out again."""
        self.catalog = catalog
        self._routes.clear()

    def _route(self, draft: Draft) -> _Route:
        fields = draft.fields
        found = self.catalog.reading_type(fields)
        event_type, problem = (found, "") if isinstance(found, EventType) else (None, found)
        model: type[BaseModel] = event_type.model if event_type else Reading
        route = _Route(
            event_type, problem, model.__pydantic_validator__.validate_python,
            model.__pydantic_serializer__.to_python, self._template.with_stage(draft.topic, "valid"),
            f"/iotgw/{fields.site}/{fields.device_id}", event_type.unit if event_type else None,
        )
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[draft.topic] = route
        return route

    def _reject(self, emit: Emitter, draft: Draft, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        emit.reject(self.name, reason, detail, draft.topic, draft.payload)

    async def process(self, batch: list[Draft], emit: Emitter) -> list[Reading]:
        out: list[Reading] = []
        routes = self._routes
        publish = emit.publish if self._publish_valid else None
        for draft in batch:
            route = routes.get(draft.topic) or self._route(draft)
            event_type = route.event_type
            if event_type is None:
                self._reject(emit, draft, "unknown_event_type", route.problem)
                continue
            fields = draft.fields
            data = {
                "id": draft.event_id or new_event_id(to_ms(draft.received_at)),
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
                reading: Reading = route.validate(data)
            except ValidationError as exc:
                detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                self._reject(emit, draft, "invalid_event", f"{event_type.key}: {detail}")
                continue
            out.append(reading)
            if publish is not None and route.valid_topic is not None:
                publish(route.valid_topic, _valid_event(reading, route, event_type.name))
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out


def _extra_fields(payload: bytes, names: tuple[str, ...]) -> dict[str, Any]:
    """The declared extra fields present in the raw JSON object (collect has parsed it once already)."""
    try:
        body = from_json(payload)  # pydantic-core's parser: about 10x json.loads here
    except ValueError:
        try:
            body = json.loads(payload)  # what collect accepted and from_json does not (a UTF-8 BOM)
        except (ValueError, RecursionError):
            return {}
    return {name: body[name] for name in names if name in body} if isinstance(body, dict) else {}


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
