"""collect: raw broker messages -> drafts.

The payload contract on the ``raw`` stage (MQTT devices and in-process drivers alike) is a JSON
object: ``value`` (required), ``unit`` (string), ``ts`` (epoch seconds or RFC 3339), ``seq``
(non-negative integer). Unknown keys are ignored so devices can add fields without breaking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic_core import from_json

from pipeline.dialects import DialectSet, MappedMessage, derived_event_id
from pipeline.errors import TopicError
from pipeline.model import MAX_SEQ
from pipeline.stage import Draft, Emitter, RawMessage, StageStats
from pipeline.topics import TopicFields, TopicTemplate


class CollectStage:
    name = "collect"

    def __init__(self, template: TopicTemplate, transports: Mapping[str, str], dialects: DialectSet | None = None
                 ) -> None:
        """``transports`` maps the ids of in-process (driver) devices to their transport; ``dialects``
        read the topics outside the taxonomy."""
        self._template = template
        self._transports = transports
        self._dialects = dialects or None
        self.stats = StageStats()

    def configure(self, transports: Mapping[str, str]) -> None:
        """A reload changed the configured devices."""
        self._transports = transports

    async def process(self, batch: Sequence[RawMessage], emit: Emitter) -> list[Draft]:
        out: list[Draft] = []
        for message in batch:
            draft = self._one(message, emit)
            if draft is None:
                continue
            if isinstance(draft, list):
                out += draft
            else:
                out.append(draft)
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out

    def _reject(self, message: RawMessage, emit: Emitter, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        emit.reject(self.name, reason, detail, message.topic, message.payload)

    def _one(self, message: RawMessage, emit: Emitter) -> Draft | list[Draft] | None:
        fields = self._template.parse(message.topic)
        if fields is None or fields.stage != "raw":
            return self._foreign(message, emit)
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
            body = parse_json(message.payload)
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd integers or nesting
            self._reject(message, emit, "invalid_json", str(exc)[:200])
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
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ):
            self._reject(message, emit, "invalid_seq", "'seq' must be an integer from 0 to 2**63-1")
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
            event_id=message.event_id,
        )


    def _foreign(self, message: RawMessage, emit: Emitter) -> list[Draft] | None:
        """A topic outside the taxonomy's raw stage: a message in a foreign dialect becomes a draft per metric
        it carries (pipeline/dialects.py; only from clients: in-process drivers speak the taxonomy)."""
        mapped = None
        if self._dialects is not None and message.origin is not None:
            mapped = self._dialects.map(message.topic, message.payload)
        if mapped is None:
            self._reject(message, emit, "unknown_topic", f"does not fit {self._template.template}")
            return None
        if not isinstance(mapped, MappedMessage):
            self._reject(message, emit, mapped.reason, mapped.detail)
            return None
        configured = self._transports.get(mapped.device_id)
        if configured is not None and configured != "mqtt":
            self._reject(message, emit, "device_conflict", f"{mapped.device_id} is a {configured} device")
            return None
        seq = mapped.seq
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ):
            self._reject(message, emit, "invalid_seq", f"{mapped.dialect}: the sequence number must be an integer "
                                                       "from 0 to 2**63-1")
            return None
        device_ts = None
        if mapped.ts is not None and (device_ts := parse_timestamp(mapped.ts)) is None:
            self._reject(message, emit, "invalid_ts", f"{mapped.dialect}: the device time must be epoch seconds, "
                                                      "epoch milliseconds or RFC 3339")
            return None
        drafts = []
        for metric in mapped.metrics:
            fields = TopicFields("raw", mapped.version, mapped.site, mapped.device_class, mapped.device_id,
                                 metric.metric)
            try:
                topic = self._template.format(fields)
            except TopicError as exc:
                self._reject(message, emit, "invalid_name", f"{mapped.dialect}: {exc}")
                continue
            drafts.append(Draft(
                topic=topic, fields=fields, transport="mqtt", value=metric.value, unit=metric.unit,
                device_ts=device_ts, seq=seq, received_at=message.received_at, payload=message.payload,
                # One id per reading, the same whenever the message is replayed (the journal keeps its id).
                event_id=derived_event_id(message.event_id, metric.metric),
            ))
        return drafts


def parse_json(payload: bytes) -> Any:
    """What ``json.loads(payload)`` returns or raises, about five times faster for what devices send.

    pydantic-core's parser reads the payload first; whatever it refuses is handed to ``json.loads``, which
    decides: it accepts a few documents pydantic-core does not (a UTF-8 byte order mark, UTF-16 and UTF-32,
    lone surrogates, nesting deeper than 200) and its exception is the one reported for the rest. What
    pydantic-core accepts, ``json.loads`` accepts as the same value (NaN and infinities, duplicate keys: the
    last wins, integers up to 4300 digits; tests/test_collect_json.py).
    """
    try:
        return from_json(payload)
    except ValueError:
        return json.loads(payload)


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
_MAX_EPOCH_S = 253402300800  # year 10000


def parse_timestamp(value: object) -> datetime | None:
    """Epoch seconds (int or float) or an RFC 3339 date-time (offset required); None when neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC) if 0 <= value < _MAX_EPOCH_S else None
    if isinstance(value, float):
        return datetime.fromtimestamp(value, tz=UTC) if 0 <= value < _MAX_EPOCH_S else None  # NaN fails too
    if not isinstance(value, str) or not (match := _RFC3339.fullmatch(value)):
        return None
    date, hour_minute, second, fraction, offset = match.groups()
    second = "59" if second == "60" else second  # a leap second: the last representable instant
    fraction = (fraction or "")[:7]  # datetime keeps microseconds
    offset = "+00:00" if offset in "Zz" else offset
    try:
        return datetime.fromisoformat(f"{date}T{hour_minute}:{second}{fraction}{offset}").astimezone(UTC)
    except (ValueError, OverflowError):  # impossible dates, or an offset past year 1 or 9999
        return None
