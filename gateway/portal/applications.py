"""Applications as declared (``[[catalog.applications]]``, ``[[applications]]`` in catalog files) beside
what the gateway learned from traffic, with the differences flagged: an event an application declares
but was never seen doing (by any of its clients, for any version of the type), and a producer or
consumer seen but that no application declares. Devices and the gateway itself (``driver:``,
``gateway:``) produce without being applications, so they are never flagged. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config.catalog import CatalogApplication
from pipeline.catalog import Catalog
from pipeline.traffic import Consumer, Producer

__all__ = ["INFRASTRUCTURE", "AppEvent", "ApplicationView", "Undeclared", "applications_json", "reconcile",
           "seen_clients"]

Role = Literal["produces", "consumes"]
INFRASTRUCTURE = ("driver:", "gateway:")


@dataclass(frozen=True, slots=True)
class AppEvent:
    """One event type an application declares, and whether its clients were seen doing it."""

    type: str
    role: Role
    seen_by: tuple[str, ...]  # its clients that were seen producing / consuming the type

    @property
    def seen(self) -> bool:
        return bool(self.seen_by)


@dataclass(frozen=True, slots=True)
class ApplicationView:
    app: CatalogApplication
    events: tuple[AppEvent, ...]

    @property
    def never_seen(self) -> tuple[AppEvent, ...]:
        return tuple(e for e in self.events if not e.seen)


@dataclass(frozen=True, slots=True)
class Undeclared:
    """A client seen producing or consuming a type that no application declares for it."""

    client: str
    role: Role
    type: str
    application: str | None  # the application the client belongs to, if any (which does not declare this)


def seen_clients(catalog: Catalog, producers: Iterable[Producer], consumers: Iterable[Consumer]
          ) -> dict[tuple[str, Role], set[str]]:
    """(type name, role) -> the clients seen in that role for any version of the type."""
    names = {t.key: t.name for t in catalog.types}
    out: dict[tuple[str, Role], set[str]] = {}
    for p in producers:
        if p.type_key in names:
            out.setdefault((names[p.type_key], "produces"), set()).add(p.client)
    for c in consumers:
        if c.type_key in names:
            out.setdefault((names[c.type_key], "consumes"), set()).add(c.client)
    return out


def reconcile(
    apps: Sequence[CatalogApplication], catalog: Catalog, producers: Iterable[Producer], consumers: Iterable[Consumer],
) -> tuple[list[ApplicationView], list[Undeclared]]:
    seen = seen_clients(catalog, producers, consumers)
    views = []
    for app in apps:
        events = [AppEvent(name, role, tuple(sorted(seen.get((name, role), set()) & set(app.clients))))
                  for role in ("produces", "consumes") for name in getattr(app, role)]
        views.append(ApplicationView(app, tuple(events)))
    owner = {client: app for app in apps for client in app.clients}
    undeclared = []
    for (name, role), clients in sorted(seen.items()):
        for client in sorted(clients):
            if client.startswith(INFRASTRUCTURE):
                continue
            belongs = owner.get(client)
            if belongs is None or name not in getattr(belongs, role):
                undeclared.append(Undeclared(client, role, name, belongs.name if belongs else None))
    return views, undeclared


def applications_json(views: Iterable[ApplicationView], undeclared: Iterable[Undeclared]) -> dict[str, Any]:
    """What the AsyncAPI document carries as ``x-iotgw-applications`` (and the API answers)."""
    return {
        "applications": [
            {"name": v.app.name, "description": v.app.description, "owner": v.app.owner,
             "clients": list(v.app.clients),
             "events": [{"type": e.type, "role": e.role, "seen": e.seen, "seen_by": list(e.seen_by)}
                        for e in v.events]}
            for v in views
        ],
        "undeclared": [{"client": u.client, "role": u.role, "type": u.type, "application": u.application}
                       for u in undeclared],
    }
