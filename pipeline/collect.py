"""collect: raw broker messages -> drafts.

The payload contract on the ``raw`` stage (MQTT devices and in-process drivers alike) is a JSON
object: ``value`` (required), ``unit`` (string), ``ts`` (epoch seconds or RFC 3339), ``seq``
(non-negative integer). Unknown keys are ignored so devices can add fields without breaking.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime

from pipeline.stage import Draft, Emitter, RawMessage, StageStats
from pipeline.topics import TopicTemplate


class CollectStage:
    name = "collect"

    def __init__(self, template: TopicTemplate, transports: Mapping[str, str]) -> None:
        """``transports`` maps the ids of in-process (driver) devices to their transport."""
        self._template = template
        self._transports = transports
        self.stats = StageStats()

    async def process(self, batch: list[RawMessage], emit: Emitter) -> list[Draft]:
        out: list[Draft] = []
        for message in batch:
            draft = self._one(message, emit)
            if draft is not None:
                out.append(draft)
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out

    def _reject(self, message: RawMessage, emit: Emitter, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        emit.reject(self.name, reason, detail, message.topic, message.payload)

    def _one(self, message: RawMessage, emit: Emitter) -> Draft | None:
        fields = self._template.parse(message.topic)
        if fields is None or fields.stage != "raw":
            self._reject(message, emit, "unknown_topic", f"does not fit {self._template.template}")
            return None
        configured = self._transports.get(fields.device_id)
        if message.origin is None:
            if configured is None:
                self._reject(message, emit, "unknown_device", "in-process publish for an unconfigured device")
                return None
            transport = configured
        elif configured is not None and configured != "mqtt":
            self._reject(message, emit, "device_conflict", f"{fields.device_id} is a {configured} device")
            return None
        else:
            transport = "mqtt"
        try:
            body = json.loads(message.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._reject(message, emit, "invalid_json", str(exc))
            return None
        if not isinstance(body, dict):
            self._reject(message, emit, "not_an_object", f"payload is a JSON {type(body).__name__}")
            return None
        if "value" not in body:
            self._reject(message, emit, "missing_value", "the object has no 'value'")
            return None
        unit = body.get("unit")
        if unit is not None and not isinstance(unit, str):
            self._reject(message, emit, "invalid_unit", "'unit' must be a string")
            return None
        seq = body.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
            self._reject(message, emit, "invalid_seq", "'seq' must be a non-negative integer")
            return None
        device_ts = None
        if "ts" in body and body["ts"] is not None:
            device_ts = parse_timestamp(body["ts"])
            if device_ts is None:
                self._reject(message, emit, "invalid_ts", "'ts' must be epoch seconds or RFC 3339")
                return None
        return Draft(
            topic=message.topic,
            fields=fields,
            transport=transport,
            value=body["value"],
            unit=unit,
            device_ts=device_ts,
            seq=seq,
            received_at=message.received_at,
            payload=message.payload,
        )


def parse_timestamp(value: object) -> datetime | None:
    """Epoch seconds (int or float) or an RFC 3339 string with an offset; None when neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 <= value < 253402300800:  # year 10000
            return None
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:  # RFC 3339 requires an offset
            return None
        return parsed.astimezone(UTC)
    return None
