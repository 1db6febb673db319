"""The catalog as an AsyncAPI 3.0 document.

Seen from the gateway: one server (the embedded MQTT broker); per event type a channel whose address
is the type's topic pattern with its placeholders as channel parameters, a message whose payload is
the CloudEvents envelope with the type's ``data`` schema (JSON Schema generated from its pydantic
model), and a ``send`` operation. Reading types also get the raw channel the devices publish on,
with the raw payload contract (``value``, ``unit``, ``ts``, ``seq`` and declared extra fields) and a
``receive`` operation. What the gateway learned from traffic is attached to each channel as
``x-iotgw-producers`` and ``x-iotgw-consumers``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Final

from pipeline.catalog import PARAM_DESCRIPTIONS, Catalog, EventType, Param, TopicPattern
from pipeline.model import CLOUDEVENTS_SPEC, MAX_SEQ
from pipeline.traffic import Consumer, Producer

ASYNCAPI_VERSION: Final = "3.0.0"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SCHEMAS: Final = "#/components/schemas/"


def _id(text: str) -> str:
    return _ID_UNSAFE.sub("_", text).strip("_")


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parameters(pattern: TopicPattern) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for param in pattern.params:
        spec: dict[str, Any] = {"description": PARAM_DESCRIPTIONS.get(param.name, param.name)}
        if param.values:
            spec["enum"] = list(param.values)
        params[param.name] = spec
    return params


def _envelope(event_type: EventType, data_ref: str) -> dict[str, Any]:
    """JSON Schema of the CloudEvents 1.0 structured envelope carrying this type's data."""
    return {
        "type": "object",
        "required": ["specversion", "id", "source", "type", "time", "datacontenttype", "data"],
        "properties": {
            "specversion": {"type": "string", "const": CLOUDEVENTS_SPEC},
            "id": {"type": "string", "description": "ULID: 26 characters, time-sortable"},
            "source": {"type": "string", "format": "uri-reference", "examples": ["/iotgw/site1/dev-1"]},
            "type": {"type": "string", "const": event_type.name},
            "subject": {"type": "string", "description": "the topic the event was published on"},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"type": "string", "const": "application/json"},
            "data": {"$ref": data_ref},
        },
    }


def _raw_payload(event_type: EventType) -> dict[str, Any]:
    """The JSON object a device publishes on the raw stage (see pipeline/collect.py)."""
    value: dict[str, Any] = {"type": "number", "description": "the measurement"}
    if event_type.unit:
        value["x-unit"] = event_type.unit
    properties: dict[str, Any] = {
        "value": value,
        "unit": {"type": ["string", "null"], "description": "unit of value"},
        "ts": {"description": "device time: epoch seconds or RFC 3339 with offset",
               "oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "format": "date-time"},
                         {"type": "null"}]},
        "seq": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEQ, "description": "device sequence"},
    }
    if event_type.extra_fields:
        data = event_type.data_schema(_SCHEMAS + "{model}")["properties"]
        properties.update({name: data[name] for name in event_type.extra_fields})
    return {"type": "object", "required": ["value"], "properties": properties,
            "description": "keys not listed here are ignored"}


def producers_json(rows: Iterable[Producer]) -> list[dict[str, Any]]:
    return [{"client": p.client, "first_seen": iso_ms(p.first_seen_ms), "last_seen": iso_ms(p.last_seen_ms),
             "messages": p.messages} for p in rows]


def consumers_json(rows: Iterable[Consumer]) -> list[dict[str, Any]]:
    return [{"client": c.client, "filter": c.filter, "first_seen": iso_ms(c.first_seen_ms),
             "last_seen": iso_ms(c.last_seen_ms), "active": c.active} for c in rows]


def asyncapi_document(
    catalog: Catalog, *, host: str, port: int, site: str,
    producers: Iterable[Producer] = (), consumers: Iterable[Consumer] = (),
) -> dict[str, Any]:
    """An AsyncAPI 3.0.0 document (a JSON-ready dict) describing every type of ``catalog``."""
    traffic = traffic_by_type(catalog, producers, consumers)
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for event_type in catalog.types:
        ident = _id(event_type.key)
        data = event_type.data_schema(_SCHEMAS + "{model}")
        schemas.update(data.pop("$defs", {}))
        data_name = event_type.model.__name__
        schemas[data_name] = data
        messages[ident] = {
            "name": event_type.name,
            "title": f"{event_type.name} {event_type.version}" + (f" ({event_type.variant})" if event_type.variant
                                                                   else ""),
            "summary": event_type.description,
            "contentType": "application/json",
            "payload": _envelope(event_type, _SCHEMAS + data_name),
        }
        channel: dict[str, Any] = {
            "address": event_type.pattern.address,
            "title": str(event_type.pattern),
            "description": event_type.description,
            "servers": [{"$ref": "#/servers/embedded"}],
            "messages": {ident: {"$ref": f"#/components/messages/{ident}"}},
            "parameters": _parameters(event_type.pattern),
            "x-iotgw-version": event_type.version,
            "x-iotgw-device-classes": list(event_type.device_classes),
            "x-iotgw-producers": producers_json(traffic[event_type.key][0]),
            "x-iotgw-consumers": consumers_json(traffic[event_type.key][1]),
        }
        channels[ident] = channel
        operations[f"send.{ident}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{ident}"},
            "messages": [{"$ref": f"#/channels/{ident}/messages/{ident}"}],
            "summary": f"the gateway publishes {event_type.name} {event_type.version}",
        }
        if event_type.reading:
            raw_ident = f"raw.{ident}"
            raw = _raw_pattern(event_type.pattern, catalog)
            messages[raw_ident] = {
                "name": f"{event_type.name}.raw",
                "title": f"raw reading for {event_type.name} {event_type.version}",
                "contentType": "application/json",
                "payload": _raw_payload(event_type),
            }
            channels[raw_ident] = {
                "address": raw.address,
                "title": str(raw),
                "description": f"what devices publish; validated as {event_type.name} {event_type.version}",
                "servers": [{"$ref": "#/servers/embedded"}],
                "messages": {raw_ident: {"$ref": f"#/components/messages/{raw_ident}"}},
                "parameters": _parameters(raw),
            }
            operations[f"receive.{raw_ident}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{raw_ident}"},
                "messages": [{"$ref": f"#/channels/{raw_ident}/messages/{raw_ident}"}],
                "summary": "devices (MQTT clients and in-process drivers) publish readings",
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"iotgw event catalog, site {site}",
            "version": _package_version(),
            "description": "Event types of an iotgw edge gateway: CloudEvents 1.0 (structured JSON) on MQTT topics"
                           " of the taxonomy. A minor version adds optional fields only.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {"host": f"{host}:{port}", "protocol": "mqtt", "protocolVersion": "3.1.1",
                         "description": "the gateway's embedded MQTT broker"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def _raw_pattern(valid: TopicPattern, catalog: Catalog) -> TopicPattern:
    """The raw-stage twin of a ``valid`` pattern (the stage level of the taxonomy template)."""
    stage_index = catalog.template.template.split("/").index("{stage}")
    levels: list[str | Param] = list(valid.levels)
    levels[stage_index] = "raw"
    return TopicPattern(tuple(levels))


def _package_version() -> str:
    try:
        return metadata.version("iotgw")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0.0.0"


def traffic_by_type(
    catalog: Catalog, producers: Iterable[Producer], consumers: Iterable[Consumer],
) -> Mapping[str, tuple[list[Producer], list[Consumer]]]:
    """Learned producers and consumers grouped by the catalog's type keys."""
    out: dict[str, tuple[list[Producer], list[Consumer]]] = {t.key: ([], []) for t in catalog.types}
    for p in producers:
        if p.type_key in out:
            out[p.type_key][0].append(p)
    for c in consumers:
        if c.type_key in out:
            out[c.type_key][1].append(c)
    return out
