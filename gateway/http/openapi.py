"""The OpenAPI 3.1 description of gateway/http/api.py, its schemas generated from gateway/http/models.py."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.config.catalog import CatalogType
from gateway.http import models as m
from gateway.http.models import API
from gateway.query import AGGREGATES

_PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, description: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


_FORMAT = _param("format", "json (default) or csv", {"type": "string", "enum": ["json", "csv"]})
_TIME = {"type": "string", "description": "RFC 3339 with an offset, -15m / -2h / -7d relative to now, or now"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_PROBLEM: {"schema": _ref("Problem")}}}


def _ok(schema: dict[str, Any], *, csv: bool = False, description: str = "OK") -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    return {"description": description, "content": content}


def _get(summary: str, ok: dict[str, Any], params: list[dict[str, Any]] | None = None, *,
         secured: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok, **(extra or {})}
    if params:
        responses["400"] = _problem("A parameter is not valid; `parameter` names it")
    if secured:
        responses["401"] = _problem("No or wrong bearer token (only when the gateway requires one)")
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if not secured:
        op["security"] = []
    return {"get": op}


@cache
def _schemas() -> dict[str, Any]:
    _, top = models_json_schema([*((model, "serialization") for model in m.RESPONSE_MODELS),
                                 (CatalogType, "validation")],  # the portal's definitions, as catalog files hold them
                                ref_template="#/components/schemas/{model}")
    defs: dict[str, Any] = top["$defs"]
    return defs


def _portal_paths(secured: bool) -> dict[str, Any]:
    unsafe = {
        "403": _problem("A page of another origin, or a Host this API does not serve (421)"),
        "409": _problem("This gateway takes no definitions (no [catalog] portal_file)"),
        "415": _problem("The body is not application/json"),
        "422": {"description": "The catalog refuses the definition; `errors` names each field at fault",
                "content": {_PROBLEM: {"schema": _ref("ValidationProblem")}}},
        "400": _problem("The body is not JSON"),
    }
    if secured:
        unsafe["401"] = _problem("No or wrong bearer token (only when the gateway requires one)")
    types = _get("Event types with their versions side by side, what changed between them, learned and declared "
                 "producers and consumers; searched by name, field, topic or producer",
                 _ok(_ref("PortalTypes")),
                 [_param("q", "search terms, all of which must match; scoped as name:, field:, topic: (a pattern or "
                                "a concrete topic), producer:, consumer:", {"type": "string", "maxLength": 500})],
                 secured=secured)
    types["post"] = {
        "summary": "Define an event type, or a new version of one: checked as catalog files are, written to the "
                   "portal's catalog file, applied",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CatalogType")}}},
        "responses": {"201": {"description": "Defined and applied",
                              "content": {"application/json": {"schema": _ref("Defined")}}}, **unsafe},
    }
    return {
        f"{API}/portal/types": types,
        f"{API}/portal/applications": _get("Declared applications with the events they produce and consume, each "
                                           "marked seen or not, and what was seen but declared by none",
                                           _ok(_ref("Applications")), secured=secured),
        f"{API}/portal/subscriptions": _get(
            "Subscription tester: the event types and the live topics a filter matches",
            _ok(_ref("SubscriptionTest")),
            [_param("filter", "a topic filter, MQTT (+ #) or Solace/NATS (* >) syntax",
                    {"type": "string", "minLength": 1}, required=True),
             _param("syntax", "how to read it (auto: by its wildcards)", {"type": "string",
                                                                            "enum": ["auto", "mqtt", "smf"]})],
            secured=secured),
    }


def openapi_document(*, secured: bool, portal: bool = True) -> dict[str, Any]:
    """The document; ``secured``: whether this gateway requires a bearer token (then declared globally);
    ``portal``: whether it serves the event portal's endpoints."""
    array = {"type": "array"}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "iotgw HTTP API", "version": "1.0.0",
                 "description": "Devices, stored series, alerts, the event catalog and pipeline health of one "
                                "iotgw gateway. Errors are RFC 9457 problem objects."},
        "paths": {
            "/healthz": _get("Alive: the event loop answers", _ok(_ref("Health")), secured=False),
            "/readyz": _get("Ready: broker, pipeline and store up; 503 with the reason otherwise",
                            _ok(_ref("Health")),
                            extra={"503": {"description": "Not ready",
                                           "content": {"application/json": {"schema": _ref("Health")}}}},
                            secured=secured),
            "/metrics": _get("Prometheus text exposition of the pipeline statistics",
                             {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                             secured=secured),
            f"{API}/devices": _get("Devices seen, with last seen, transport, metrics, RSSI and battery where known",
                                   _ok({**array, "items": _ref("Device")}, csv=True), [_FORMAT], secured=secured),
            f"{API}/latest": _get("The newest value of every series",
                                  _ok({**array, "items": _ref("LatestValue")}, csv=True),
                                  [_param("device", "only this device", {"type": "string"}), _FORMAT],
                                  secured=secured),
            f"{API}/series": _get(
                "One series: raw points, or aggregated per bucket",
                _ok(_ref("Series"), csv=True),
                [
                    _param("device", "device id", {"type": "string", "minLength": 1}, required=True),
                    _param("metric", "metric name", {"type": "string", "minLength": 1}, required=True),
                    _param("from", "start of the range (inclusive)", _TIME),
                    _param("to", "end of the range (inclusive); default: now", _TIME),
                    _param("bucket", "bucket size (e.g. 10s, 1m, 1h) or auto (about `points` buckets); "
                                     "absent: raw points", {"type": "string"}),
                    _param("agg", "aggregate per bucket", {"type": "string", "enum": list(AGGREGATES)}),
                    _param("points", "bucket=auto aims at this many buckets",
                           {"type": "integer", "minimum": 1, "maximum": 5000}),
                    _FORMAT,
                ],
                secured=secured, extra={"404": _problem("No such series")},
            ),
            f"{API}/alerts": _get("Active and recent alerts, newest first", _ok(_ref("Alerts")),
                                  [_param("limit", "how many recent alerts",
                                          {"type": "integer", "minimum": 1, "maximum": 1000})], secured=secured),
            f"{API}/catalog": _get("Event types with topics, data schemas, producers and consumers",
                                   _ok(_ref("Catalog")), secured=secured),
            f"{API}/catalog/asyncapi.json": _get("The event catalog as an AsyncAPI 3.0 document",
                                                 _ok({"type": "object"}), secured=secured),
            f"{API}/stats": _get("Pipeline statistics: per-stage counts, rejects by reason, queue depth, outbox "
                                 "depth and age per destination, backbone connection state",
                                 _ok(_ref("GatewayStatus")), secured=secured),
        },
        "components": {"schemas": _schemas()},
    }
    if portal:
        doc["paths"].update(_portal_paths(secured))
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
