"""The small read-only interfaces the HTTP API shows, each with the implementation this branch has.

The API (gateway/api.py) depends only on these protocols, so a richer source replaces the default
without touching the API:

- :class:`CatalogView`: the event types the gateway knows (``types()``) and an AsyncAPI 3.0
  document of them (``asyncapi()``). Default: :class:`StaticCatalog`, the types this gateway
  publishes (pipeline/model.py), with the devices and destinations of its config as producers and
  consumers. A catalog that learns producers and consumers from traffic implements the same two calls.
- :class:`AlertView`: ``active()`` and ``recent(limit)`` alerts, newest first. Default:
  :class:`AlertLog`, the alerts the gateway itself raises (``outbox_dropped``); an alert stays active
  until one alert interval passes without the condition.
- :class:`SignalView`: ``rssi(device_id)`` in dBm where a radio reported one. Default:
  :class:`NoSignal` (None); the API then falls back to the latest value of an ``rssi`` metric.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline.asyncapi import asyncapi_document as catalog_asyncapi
from pipeline.asyncapi import traffic_by_type
from pipeline.model import (
    AGGREGATE_TYPE,
    ALERT_TYPE,
    COMMAND_ACK_TYPE,
    READING_TYPE,
    REJECT_TYPE,
    Reading,
    utc_from_ms,
)
from pipeline.store import StoreError, StoreReader
from pipeline.topics import TopicFields, TopicTemplate, compile_filter
from pipeline.traffic import read_traffic


@dataclass(frozen=True, slots=True)
class EventType:
    type: str  # CloudEvents type, e.g. io.iotgw.telemetry.reading.v1
    description: str
    topic: str  # the topic pattern it is published on, {placeholders} for variable levels
    schema: dict[str, Any]  # JSON Schema of the event's ``data``
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()


@dataclass(slots=True)
class Alert:
    id: str
    name: str  # e.g. outbox_dropped
    subject: str  # what it is about: a destination, a device
    severity: str
    raised_at: datetime
    detail: dict[str, Any] = field(default_factory=dict)
    cleared_at: datetime | None = None


class CatalogView(Protocol):
    def types(self) -> list[EventType]: ...

    def asyncapi(self) -> dict[str, Any]: ...


class AlertView(Protocol):
    def active(self) -> list[Alert]: ...

    def recent(self, limit: int) -> list[Alert]: ...


class SignalView(Protocol):
    def rssi(self, device_id: str) -> float | None: ...


class NoSignal:
    def rssi(self, device_id: str) -> float | None:
        return None


class AlertLog:
    """Alerts raised by the gateway: ``raise_`` again while active updates the alert; ``clear_others``
    clears every active alert of a name whose subject was not raised this round."""

    def __init__(self, keep: int = 200) -> None:
        self._active: dict[tuple[str, str], Alert] = {}
        self._recent: deque[Alert] = deque(maxlen=keep)

    def raise_(self, alert_id: str, name: str, subject: str, *, detail: dict[str, Any], severity: str = "warning",
               now: datetime | None = None) -> Alert:
        now = datetime.now(UTC) if now is None else now
        alert = self._active.get((name, subject))
        if alert is None:
            alert = self._active[(name, subject)] = Alert(alert_id, name, subject, severity, now, dict(detail))
            self._recent.appendleft(alert)
        else:
            alert.detail.update(detail)
        return alert

    def clear_others(self, name: str, still: set[str], now: datetime | None = None) -> None:
        now = datetime.now(UTC) if now is None else now
        for key in [k for k in self._active if k[0] == name and k[1] not in still]:
            self._active.pop(key).cleared_at = now

    def active(self) -> list[Alert]:
        return sorted(self._active.values(), key=lambda a: a.raised_at, reverse=True)

    def recent(self, limit: int) -> list[Alert]:
        return list(self._recent)[:limit]


def _data_schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


_NUM, _STR, _INT = {"type": "number"}, {"type": "string"}, {"type": "integer"}


class StaticCatalog:
    """The event types this gateway publishes, from pipeline/model.py and its config."""

    def __init__(self, template: TopicTemplate, *, site: str, version: str, gateway_id: str,
                 devices: list[str], destinations: dict[str, list[str]]) -> None:
        """``destinations``: forward name -> its topic filters (they are the consumers)."""
        self._template = template
        self._site, self._version, self._gateway_id = site, version, gateway_id
        self._devices = tuple(devices)
        self._destinations = {name: [compile_filter(f) for f in filters] for name, filters in destinations.items()}

    def _topic(self, stage: str) -> tuple[str, str]:
        """(pattern with {placeholders}, one concrete example topic) of a telemetry stage."""
        fields = TopicFields(stage=stage, version=self._version, site=self._site, device_class="{device_class}",
                             device_id="{device_id}", metric="{metric}")
        example = TopicFields(stage=stage, version=self._version, site=self._site, device_class="c",
                              device_id="d", metric="m")
        return self._template.format(fields), self._template.format(example)

    def _consumers(self, example: str) -> tuple[str, ...]:
        return tuple(f"forward:{name}" for name, filters in self._destinations.items()
                     if any(f.matches(example) for f in filters))

    def types(self) -> list[EventType]:
        gateway = f"gateway:{self._gateway_id}"
        devices = tuple(f"device:{d}" for d in self._devices) or ("device:*",)
        out: list[EventType] = []
        for stage, type_, description, schema, producers in (
            ("valid", READING_TYPE, "One validated reading of one device's metric.",
             Reading.model_json_schema(), devices),
            ("agg", AGGREGATE_TYPE, "Running mean/min/max of a series over the aggregation interval.",
             _data_schema({"device_id": _STR, "metric": _STR, "count": _INT, "mean": _NUM, "min": _NUM,
                           "max": _NUM}, ["device_id", "metric"]), (gateway,)),
            ("rejected", REJECT_TYPE, "A message the pipeline or a driver refused, with the reason.",
             _data_schema({"stage": _STR, "reason": _STR, "detail": _STR, "topic": _STR},
                          ["stage", "reason"]), (gateway,)),
        ):
            pattern, example = self._topic(stage)
            out.append(EventType(type_, description, pattern, schema, producers, self._consumers(example)))
        alert = f"alert/raised/1.0/{self._site}/gateway/{self._gateway_id}/{{alert}}"
        out.append(EventType(
            ALERT_TYPE, "An alert the gateway raised (outbox_dropped: a full outbox dropped its oldest events).",
            alert, _data_schema({"alert": _STR, "destination": _STR, "dropped": _INT, "policy": _STR}, ["alert"]),
            (gateway,), self._consumers(alert.replace("{alert}", "outbox_dropped")),
        ))
        ack = f"cmdack/{self._site}/{{device_id}}/{{command}}"
        out.append(EventType(
            COMMAND_ACK_TYPE, "The outcome of a downlink command.", ack,
            _data_schema({"device_id": _STR, "command": _STR, "status": _STR, "via": _STR,
                          "command_event_id": _STR}, ["device_id", "command", "status"]),
            (gateway,), self._consumers(ack.replace("{device_id}", "d").replace("{command}", "c")),
        ))
        return out

    def asyncapi(self) -> dict[str, Any]:
        return asyncapi_document(self.types(), title=f"iotgw {self._gateway_id}", site=self._site)


def asyncapi_document(types: list[EventType], *, title: str, site: str) -> dict[str, Any]:
    """An AsyncAPI 3.0 document: a channel per event type, the gateway sends on each."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for t in types:
        key = t.type.replace(".", "_")
        messages[key] = {
            "name": t.type, "title": t.type, "summary": t.description, "contentType": "application/cloudevents+json",
            "payload": {"type": "object", "required": ["specversion", "id", "source", "type", "time", "data"],
                        "properties": {"specversion": {"const": "1.0"}, "id": _STR, "source": _STR,
                                       "type": {"const": t.type}, "subject": _STR, "time": _STR, "data": t.schema}},
        }
        params = {name: {"description": f"the {name} level"} for name in _placeholders(t.topic)}
        channels[key] = {"address": t.topic, "messages": {key: {"$ref": f"#/components/messages/{key}"}},
                         **({"parameters": params} if params else {})}
        operations[f"send_{key}"] = {"action": "send", "channel": {"$ref": f"#/channels/{key}"},
                                     "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}]}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": title, "version": "1.0.0", "description": f"Events of iotgw at site {site}."},
        "defaultContentType": "application/cloudevents+json",
        "channels": channels, "operations": operations, "components": {"messages": messages},
    }


def _placeholders(topic: str) -> list[str]:
    return [level[1:-1] for level in topic.split("/") if level.startswith("{") and level.endswith("}")]


class LearnedCatalog:
    """The event catalog (pipeline/catalog.py) with the producers and consumers the gateway learned
    from traffic (pipeline/traffic.py, written to ``catalog.db`` every few seconds)."""

    def __init__(self, gateway: CatalogSource) -> None:
        self._gw = gateway

    def _traffic(self) -> tuple[list[Any], list[Any]]:
        return read_traffic(self._gw.config.storage.data_dir)

    def types(self) -> list[EventType]:
        catalog = self._gw.catalog
        producers, consumers = self._traffic()
        traffic = traffic_by_type(catalog, producers, consumers)
        return [
            EventType(
                t.name + (f" ({t.variant})" if t.variant else ""), t.description, str(t.pattern),
                t.model.model_json_schema(),
                tuple(p.client for p in traffic[t.key][0]),
                tuple(f"{c.client} ({c.filter})" for c in traffic[t.key][1]),
            )
            for t in catalog.types
        ]

    def asyncapi(self) -> dict[str, Any]:
        producers, consumers = self._traffic()
        config = self._gw.config
        return catalog_asyncapi(self._gw.catalog, host=config.broker.host, port=self._gw.broker.port,
                                site=config.site, producers=producers, consumers=consumers)


class StoredAlerts:
    """The alert rules' alerts (the store's ``alerts`` table) and the gateway's own (an :class:`AlertLog`)."""

    def __init__(self, data_dir: Path, own: AlertLog) -> None:
        self._data_dir = data_dir
        self._own = own

    def _rows(self, *, active: bool | None, limit: int) -> list[Alert]:
        try:
            with StoreReader(self._data_dir) as store:
                rows = store.alerts(active=active, limit=limit)
        except StoreError:
            return []
        return [
            Alert(
                r.event_id, r.rule, f"{r.device_id}/{r.metric}", r.severity, utc_from_ms(r.raised_at_ms),
                {"kind": r.kind, "device_class": r.device_class, "value": r.value, "message": r.message,
                 **({"clear_value": r.clear_value, "clear_message": r.clear_message} if r.cleared_at_ms else {})},
                utc_from_ms(r.cleared_at_ms) if r.cleared_at_ms is not None else None,
            )
            for r in rows
        ]

    def active(self) -> list[Alert]:
        both = self._rows(active=True, limit=1000) + self._own.active()
        return sorted(both, key=lambda a: a.raised_at, reverse=True)

    def recent(self, limit: int) -> list[Alert]:
        both = self._rows(active=None, limit=limit) + self._own.recent(limit)
        return sorted(both, key=lambda a: a.raised_at, reverse=True)[:limit]


class DriverSignal:
    """RSSI as the BLE driver last heard it, per device id."""

    def __init__(self, drivers: Callable[[], Iterable[object]]) -> None:
        self._drivers = drivers

    def rssi(self, device_id: str) -> float | None:
        for driver in self._drivers():
            found = getattr(getattr(driver, "stats", None), "rssi", None)
            if isinstance(found, dict) and device_id in found:
                return float(found[device_id])
        return None


class CatalogSource(Protocol):
    """What :class:`LearnedCatalog` reads from the gateway."""

    @property
    def catalog(self) -> Any: ...
    @property
    def config(self) -> Any: ...
    @property
    def broker(self) -> Any: ...
