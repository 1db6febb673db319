"""The event portal's part of the HTTP API (gateway/portal/ does the work): types searched and grouped
by version with their changes, applications beside learned traffic, the subscription tester, and
definitions from the form.

Defining changes the gateway, so besides the API's token (off loopback) and its Host/Origin checks
(gateway/http/guard.py) it takes only a JSON body: a page of another site can make a browser send a
form or text, never JSON without asking first (CORS), which this API never allows.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from gateway.http import models as m
from gateway.http.answers import HttpError, bad, json_response
from gateway.portal import DefinitionRefused, Portal, PortalUnavailableError
from gateway.portal.applications import INFRASTRUCTURE, ApplicationView
from gateway.portal.types import FieldShape, TypeGroup, TypeRecord
from gateway.query import iso_ms
from pipeline.errors import TopicError
from pipeline.topics import compile_filter

__all__ = ["PortalRoutes"]


def compile_syntax(pattern: str, syntax: str) -> Literal["mqtt", "smf"]:
    """The syntax a filter is read in (``auto`` decides by its wildcards)."""
    return compile_filter(pattern, syntax).syntax  # type: ignore[arg-type]  # validated by the caller


def _field_out(name: str, shape: FieldShape) -> m.DataField:
    return m.DataField(name=name, type=shape.type, unit=shape.unit, required=shape.required, minimum=shape.minimum,
                       maximum=shape.maximum, description=shape.description)


def _declared(apps: list[ApplicationView], client: str, type_name: str, role: str) -> bool | None:
    if client.startswith(INFRASTRUCTURE):
        return None
    return any(client in v.app.clients and type_name in getattr(v.app, role) for v in apps)


def _version_out(r: TypeRecord, matched: set[str], apps: list[ApplicationView],
                 seen: dict[tuple[str, Any], set[str]]) -> m.TypeVersion:
    t = r.event_type
    return m.TypeVersion(
        key=t.key, type=t.name, version=t.version, variant=t.variant, description=t.description, topic=r.topic,
        source=r.source, builtin=t.builtin, device_classes=list(t.device_classes), metric=t.metric,
        extra_fields=list(t.extra_fields),
        matched=t.key in matched, fields=[_field_out(n, s) for n, s in r.fields.items()],
        producers=[m.LearnedProducer(client=p.client, messages=p.messages, last_seen=iso_ms(p.last_seen_ms),
                                     declared=_declared(apps, p.client, t.name, "produces")) for p in r.producers],
        consumers=[m.LearnedConsumer(client=c.client, filter=c.filter, active=c.active,
                                     last_seen=iso_ms(c.last_seen_ms),
                                     declared=_declared(apps, c.client, t.name, "consumes")) for c in r.consumers],
        declared_producers=[m.DeclaredBy(application=a.app.name, seen=bool(
            seen.get((t.name, "produces"), set()) & set(a.app.clients))) for a in apps if t.name in a.app.produces],
        declared_consumers=[m.DeclaredBy(application=a.app.name, seen=bool(
            seen.get((t.name, "consumes"), set()) & set(a.app.clients))) for a in apps if t.name in a.app.consumes],
    )


def _group_out(g: TypeGroup, matched: set[str], apps: list[ApplicationView],
               seen: dict[tuple[str, Any], set[str]]) -> m.TypeGroupOut:
    return m.TypeGroupOut(
        name=g.name, versions=[_version_out(v, matched, apps, seen) for v in g.versions],
        steps=[m.VersionStepOut(before=step.before, after=step.after, compatible=step.compatible,
                                changes=[m.FieldChange(field=c.field, kind=c.kind, before=c.before, after=c.after)
                                         for c in step.changes]) for step in g.steps],
    )


class PortalRoutes:
    """The handlers, around one :class:`Portal`."""

    def __init__(self, portal: Portal) -> None:
        self._portal = portal

    def add_to(self, app: web.Application, prefix: str) -> None:
        app.router.add_get(f"{prefix}/types", self.types)
        app.router.add_post(f"{prefix}/types", self.define)
        app.router.add_get(f"{prefix}/applications", self.applications)
        app.router.add_get(f"{prefix}/subscriptions", self.subscriptions)


    async def types(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "")
        if len(query) > 500:
            raise bad("q", "at most 500 characters")
        view = self._portal.types(query)
        path = self._portal.portal_file
        return json_response(m.PortalTypes(
            query=query, portal_file=str(path) if path else None,
            types=[_group_out(g, view.matched, view.applications, view.seen) for g in view.groups],
        ))

    async def applications(self, request: web.Request) -> web.Response:
        views, undeclared = self._portal.applications()
        return json_response(m.Applications(
            applications=[m.ApplicationOut(
                name=v.app.name, description=v.app.description, owner=v.app.owner, clients=list(v.app.clients),
                events=[m.AppEventOut(type=e.type, role=e.role, seen=e.seen, seen_by=list(e.seen_by))
                        for e in v.events]) for v in views],
            undeclared=[m.UndeclaredOut(client=u.client, role=u.role, type=u.type, application=u.application)
                        for u in undeclared],
        ))

    async def subscriptions(self, request: web.Request) -> web.Response:
        portal = self._portal
        pattern = request.query.get("filter", "")
        syntax = request.query.get("syntax", "auto")
        if not pattern:
            raise bad("filter", "required: a topic filter, MQTT (+ #) or Solace/NATS (* >) syntax")
        if syntax not in ("auto", "mqtt", "smf"):
            raise bad("syntax", f"must be auto, mqtt or smf, not {syntax!r}")
        try:
            found = portal.subscription(pattern, syntax)  # type: ignore[arg-type]  # checked just above
            resolved = compile_syntax(pattern, syntax)
        except TopicError as exc:
            raise bad("filter", str(exc)) from None
        return json_response(m.SubscriptionTest(
            filter=pattern, syntax=resolved,
            types=[m.FilterType(key=t.key, type=t.name, version=t.version, topic=str(t.pattern)) for t in found.types],
            topics=[m.LiveTopicOut(topic=live.topic, type=t.key if t else None, last_seen=iso_ms(live.last_seen_ms),
                                   messages=live.messages) for live, t in found.topics],
        ))

    async def define(self, request: web.Request) -> web.Response:
        """A new event type or version from the portal's form: JSON only (a form of another site cannot
        send JSON without the browser asking first, which this API never allows)."""
        portal = self._portal
        if request.content_type != "application/json":
            raise HttpError(415, "Unsupported Media Type", "a definition is a JSON object (Content-Type: "
                            f"application/json), not {request.content_type}")
        try:
            body = await request.json()
        except ValueError as exc:
            raise HttpError(400, "Bad Request", f"the body is not JSON: {exc}") from None
        try:
            decl = await portal.define(body)
        except DefinitionRefused as exc:
            problem = m.ValidationProblem(
                title="Definition refused", status=422, detail=str(exc),
                errors=[m.FieldError(field=p.field, message=p.message) for p in exc.problems])
            return web.Response(status=422, text=problem.model_dump_json(), content_type="application/problem+json")
        except PortalUnavailableError as exc:
            raise HttpError(409, "Conflict", str(exc)) from None
        path = portal.portal_file
        return web.Response(status=201, content_type="application/json", text=m.Defined(
            key=f"{decl.name}@{decl.version}", type=decl.name, version=decl.version, file=str(path)).model_dump_json())
