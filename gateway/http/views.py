"""The small read-only interfaces the HTTP API shows, and the implementations the gateway gives it.

The API (gateway/http/api.py) depends only on these protocols, so a richer source replaces one
without touching the API:

- :class:`CatalogView`: the event types the gateway knows (``types()``) and an AsyncAPI 3.0
  document of them (``asyncapi()``). The gateway's: :class:`LearnedCatalog`, the event catalog
  (pipeline/catalog.py) with the producers and consumers learned from traffic.
- :class:`AlertView`: ``active()`` and ``recent(limit)`` alerts, newest first. The gateway's:
  :class:`StoredAlerts`, the alert rules' alerts from the store and the gateway's own
  (gateway/alerts.py).
- :class:`SignalView`: ``rssi(device_id)`` in dBm where a radio reported one. The gateway's: its
  devices (gateway/devices.py); :class:`NoSignal` (None) otherwise, and the API then falls back to
  the latest value of an ``rssi`` metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.alerts import Alert
from pipeline.asyncapi import asyncapi_document, traffic_by_type
from pipeline.catalog import Catalog
from pipeline.model import (
    utc_from_ms,
)
from pipeline.store import StoreError, StoreReader
from pipeline.traffic import read_traffic


@dataclass(frozen=True, slots=True)
class EventType:
    type: str  # CloudEvents type, e.g. io.iotgw.telemetry.reading.v1
    description: str
    topic: str  # the topic pattern it is published on, {placeholders} for variable levels
    schema: dict[str, Any]  # JSON Schema of the event's ``data``
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()


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


class LearnedCatalog:
    """The event catalog (pipeline/catalog.py) with the producers and consumers the gateway learned
    from traffic (pipeline/traffic.py, written to ``catalog.db`` in ``data_dir`` every few seconds)."""

    def __init__(self, data_dir: Path, catalog: Callable[[], Catalog], *, site: str, host: str,
                 port: Callable[[], int]) -> None:
        """``catalog()``: the catalog in use (a reload may replace it); ``port()``: the broker's port."""
        self._data_dir = data_dir
        self._catalog = catalog
        self._site = site
        self._host = host
        self._port = port

    def _traffic(self) -> tuple[list[Any], list[Any]]:

        return read_traffic(self._data_dir)

    def types(self) -> list[EventType]:
        catalog = self._catalog()
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
        return asyncapi_document(self._catalog(), host=self._host, port=self._port(), site=self._site,
                                 producers=producers, consumers=consumers)


class StoredAlerts:
    """The alert rules' alerts (the store's ``alerts`` table) and the gateway's own (``own``)."""

    def __init__(self, data_dir: Path, own: AlertView) -> None:
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
