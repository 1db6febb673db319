"""The event portal as one object the HTTP API asks: types (searched, versions side by side),
applications beside learned traffic, the subscription tester, and definitions written to the portal's
catalog file and applied.

It reads the catalog in use and its settings through callables (a reload replaces both), what traffic
taught from ``catalog.db`` in the data directory, and live topics from :class:`RecentTopics`. Applying
a definition is a callable the composition root provides (it reloads the gateway's catalog); the
portal never sees the gateway itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from gateway.config.catalog import CatalogSettings, CatalogType
from gateway.config.problems import problems as config_problems
from gateway.errors import GatewayError
from gateway.portal.applications import (
    ApplicationView,
    Role,
    Undeclared,
    applications_json,
    reconcile,
    seen_clients,
)
from gateway.portal.define import DefinitionRefused, FieldProblem, append_definition, check_definition, restore
from gateway.portal.topics import LiveTopic, RecentTopics
from gateway.portal.types import TypeGroup, group_versions, search, type_records
from pipeline.catalog import Catalog, EventType
from pipeline.topics import compile_filter
from pipeline.traffic import read_traffic

__all__ = ["FilterMatch", "Portal", "PortalUnavailableError", "TypesView", "with_applications"]

log = logging.getLogger(__name__)
LIVE_TOPICS_SHOWN = 200


class PortalUnavailableError(GatewayError):
    """The portal cannot take definitions here (no portal file configured, or nothing to apply them)."""


@dataclass(frozen=True, slots=True)
class TypesView:
    groups: list[TypeGroup]
    matched: set[str]  # keys of the versions the search matched
    applications: list[ApplicationView]
    seen: dict[tuple[str, Role], set[str]]  # (type name, role) -> clients seen in it


@dataclass(frozen=True, slots=True)
class FilterMatch:
    """What a subscription with a filter would receive: the types of the catalog, and the topics the
    broker carried lately (newest first), each with the type it belongs to."""

    types: tuple[EventType, ...]
    topics: tuple[tuple[LiveTopic, EventType | None], ...]


class Portal:
    def __init__(
        self, *, settings: Callable[[], CatalogSettings], catalog: Callable[[], Catalog], data_dir: Path,
        topics: RecentTopics | None = None, apply: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._data_dir = data_dir
        self._topics = topics
        self._apply = apply
        self._writing = asyncio.Lock()

    @property
    def portal_file(self) -> Path | None:
        """Where definitions go; None when they cannot be made here."""
        return self._settings().portal_file if self._apply is not None else None

    def types(self, query: str = "") -> TypesView:
        """Every type whose versions ``query`` matches, versions grouped (a group is shown whole when any
        of its versions matches), with the applications and what their clients were seen doing."""
        producers, consumers = read_traffic(self._data_dir)
        catalog, settings = self._catalog(), self._settings()
        records = type_records(catalog, settings, producers, consumers)
        matched = {r.event_type.key for r in search(records, query)}
        groups = [g for g in group_versions(records) if any(v.event_type.key in matched for v in g.versions)]
        views, _ = reconcile(settings.all_applications, catalog, producers, consumers)
        return TypesView(groups, matched, views, seen_clients(catalog, producers, consumers))

    def applications(self) -> tuple[list[ApplicationView], list[Undeclared]]:
        producers, consumers = read_traffic(self._data_dir)
        return reconcile(self._settings().all_applications, self._catalog(), producers, consumers)

    def subscription(self, pattern: str, syntax: Literal["auto", "mqtt", "smf"] = "auto") -> FilterMatch:
        """Raises TopicError for a filter that is not valid in ``syntax``."""
        topic_filter = compile_filter(pattern, syntax)
        catalog = self._catalog()
        live = [t for t in (self._topics.topics() if self._topics else []) if topic_filter.matches(t.topic)]
        return FilterMatch(tuple(catalog.types_for_filter(topic_filter)),
                           tuple((t, catalog.type_for_topic(t.topic)) for t in live[:LIVE_TOPICS_SHOWN]))

    async def define(self, body: object) -> CatalogType:
        """Validate, write to the portal file, apply. Raises :class:`DefinitionRefused` (field by field)
        or :class:`PortalUnavailableError`."""
        if self._apply is None:
            raise PortalUnavailableError("this gateway applies no definitions (the portal is read-only here)")
        async with self._writing:  # one definition at a time: each is checked against the one before
            settings = self._settings()
            path = settings.portal_file
            if path is None:
                raise PortalUnavailableError("no catalog file for the portal: set [catalog] portal_file")
            decl = check_definition(body, settings)
            try:
                before = await asyncio.to_thread(append_definition, path, decl)
            except OSError as exc:
                raise PortalUnavailableError(f"cannot write {path}: {exc.strerror}") from None
            try:
                await self._apply()
            except ValidationError as exc:  # the files no longer make a catalog (edited meanwhile?)
                await asyncio.to_thread(restore, path, before)
                raise DefinitionRefused([FieldProblem("", p) for p in config_problems(exc)]) from None
            except BaseException:
                await asyncio.to_thread(restore, path, before)
                raise
        log.warning("event portal: %s %s defined in %s", decl.name, decl.version, path)
        return decl

    def asyncapi(self, document: dict[str, Any]) -> dict[str, Any]:
        """``document`` (pipeline.asyncapi) with the declared applications added."""
        producers, consumers = read_traffic(self._data_dir)
        return with_applications(document, self._settings(), self._catalog(), producers, consumers)


def with_applications(document: dict[str, Any], settings: CatalogSettings, catalog: Catalog, producers: Any,
                      consumers: Any) -> dict[str, Any]:
    """The AsyncAPI document with ``x-iotgw-applications`` (each application, its events, which were
    seen; and what was seen undeclared) and, per channel, the applications that declare producing
    (``x-iotgw-declared-producers``) and consuming (``x-iotgw-declared-consumers``) its type."""
    views, undeclared = reconcile(settings.all_applications, catalog, producers, consumers)
    document["x-iotgw-applications"] = applications_json(views, undeclared)
    by_name = {t.name for t in catalog.types}
    for channel in document.get("channels", {}).values():
        name = next((m.get("$ref", "") for m in channel.get("messages", {}).values()), "")
        message = document["components"]["messages"].get(name.rsplit("/", 1)[-1], {})
        type_name = message.get("name", "")
        if type_name not in by_name:
            continue  # a raw channel: what devices publish
        channel["x-iotgw-declared-producers"] = [v.app.name for v in views if type_name in v.app.produces]
        channel["x-iotgw-declared-consumers"] = [v.app.name for v in views if type_name in v.app.consumes]
    return document
