"""The valid events define raises are made straight from a run's columns (pipeline/define.py ``ValidEvents``):
they must encode to exactly the bytes the reading's model makes (``Reading.to_cloudevent``, ``model_dump`` in JSON
mode), whatever the readings hold."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.publish import dumps
from pipeline.catalog import Catalog
from pipeline.define import DefineStage
from pipeline.model import MAX_SEQ, Reading, cloudevent
from pipeline.stage import Draft, Emitter
from pipeline.topics import TopicTemplate

TEMPLATE = TopicTemplate()
RECEIVED = datetime(2024, 5, 1, 12, 0, 30, 123456, tzinfo=UTC)
DEVICE_TS = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
SPLIT = "com.example.split.v1"

# A declared type with an extra field of every kind, required and optional.
TYPES: list[dict[str, Any]] = [{
    "name": SPLIT, "version": "1.0", "metric": "power", "device_classes": ["meter"],
    "value": {"unit": "W", "minimum": -1e9, "maximum": 1e9},
    "fields": {
        "phase": {"type": "integer", "minimum": 1, "maximum": 3},
        "label": {"type": "string", "required": False},
        "on": {"type": "boolean", "required": False},
        "since": {"type": "datetime", "required": False},
        "volts": {"type": "number", "required": False},
    },
}]


def draft(value: object = 21.5, *, device: str = "dev-1", metric: str = "temperature", device_class: str = "air",
          unit: str | None = "°C", device_ts: datetime | None = DEVICE_TS, received_at: datetime = RECEIVED,
          seq: int | None = 1, quality: tuple[str, ...] = (), body: dict[str, Any] | None = None) -> Draft:
    topic = f"telemetry/raw/1.0/site1/{device_class}/{device}/{metric}"
    fields = TEMPLATE.parse(topic)
    assert fields is not None
    payload = json.dumps(body if body is not None else {"value": value}, ensure_ascii=False).encode()
    return Draft(topic=topic, fields=fields, transport="mqtt", value=value, unit=unit, device_ts=device_ts, seq=seq,
                 received_at=received_at, payload=payload, quality=quality)


def meter(value: float = 230.0, **body: Any) -> Draft:
    return draft(value, metric="power", device_class="meter", unit=None, body={"value": value, **body})


BUILT_IN = {
    "plain": [draft()],
    "no device time": [draft(device_ts=None), draft(3.0, device_ts=None, seq=None)],
    "quality flags": [draft(quality=("clock_corrected",)), draft(device_ts=None, quality=("gateway_time",))],
    "no unit, big and no seq": [draft(unit=None, seq=MAX_SEQ), draft(unit=None, seq=None), draft(seq=0)],
    "negative, integer and tiny values": [draft(-40.25), draft(7), draft(1e-7), draft(-1.5e300), draft(0)],
    "other time zones": [draft(device_ts=datetime(2024, 5, 1, 14, 0, 0, 500, tzinfo=PLUS_TWO)),
                         draft(device_ts=None, received_at=datetime(2024, 5, 1, 14, 0, tzinfo=PLUS_TWO))],
    "several devices and metrics": [draft(device="a"), draft(device="b", metric="humidity", unit="%"),
                                    draft(2.0, device="a"), draft(device="ü-ñ", unit="µg/m³")],
    "one invalid: the rest one by one": [draft(), draft(float("nan")), draft(2.0)],
}
DECLARED = {
    "extras present and absent": [meter(phase=1, label="L1 ⚡", on=True, since="2024-05-01T12:00:00+02:00",
                                        volts=229.5),
                                  meter(231.0, phase=3), meter(-5.0, phase=2, on=False, volts=7)],
    "extras with the readings' variety": [
        dataclasses.replace(meter(phase=2, since="2024-05-01T10:00:00.25Z"), device_ts=None, seq=None),
        dataclasses.replace(meter(phase=1), quality=("clock_corrected",), unit="W"),
    ],
    "extras one by one": [meter(phase=1, label="x"), meter(phase=9), meter(phase=2, volts=1e-7)],
}


async def valid_events(catalog: Catalog, drafts: list[Draft]) -> tuple[list[Reading], list[tuple[str, bytes]]]:
    emit = Emitter()
    readings = list(await DefineStage(TEMPLATE, catalog=catalog).process(drafts, emit))
    return readings, [(topic, dumps(event)) for topic, event in emit.events]


def model_bytes(reading: Reading, topic: str, type_: str) -> bytes:
    return dumps(cloudevent(event_id=reading.id, source=f"/iotgw/{reading.site}/{reading.device_id}", type_=type_,
                            subject=topic, time=reading.ts, data=reading.model_dump(mode="json")))


def by_id(events: list[tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    return {json.loads(payload)["id"]: (topic, payload) for topic, payload in events}


@pytest.mark.parametrize("drafts", BUILT_IN.values(), ids=BUILT_IN.keys())
async def test_built_in_valid_events_are_what_the_model_encodes(drafts: list[Draft]) -> None:
    readings, events = await valid_events(Catalog(TEMPLATE), drafts)
    assert readings
    assert len(events) == len(readings)
    made = by_id(events)
    for reading in readings:
        topic, payload = made[reading.id]
        assert payload == dumps(reading.to_cloudevent(topic))


@pytest.mark.parametrize("drafts", DECLARED.values(), ids=DECLARED.keys())
async def test_declared_valid_events_are_what_the_model_encodes(drafts: list[Draft]) -> None:
    catalog = Catalog(TEMPLATE, parse_config({"catalog": {"types": TYPES}}).catalog.all_types, strict=True)
    readings, events = await valid_events(catalog, drafts)
    assert readings
    assert len(events) == len(readings)
    made = by_id(events)
    for reading in readings:
        topic, payload = made[reading.id]
        assert payload == model_bytes(reading, topic, SPLIT)
        assert set(json.loads(payload)["data"]) >= {"phase", "label", "on", "since", "volts"}


async def test_the_model_reference_sees_a_difference() -> None:
    """The comparison above is not vacuous: a reading that differs in one field encodes differently."""
    [reading], [(topic, payload)] = await valid_events(Catalog(TEMPLATE), [draft()])
    assert payload == dumps(reading.to_cloudevent(topic))
    assert payload != dumps(reading.model_copy(update={"seq": 2}).to_cloudevent(topic))
