"""Columnar readings (pipeline/readings.py) and the define stage's batch validation (pipeline/define.py):
a batch validated a type at a time gives exactly the readings that validating each draft alone gives."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.config import parse_config
from pipeline.catalog import Catalog
from pipeline.define import DefineStage
from pipeline.model import Quality, Reading, new_event_id, to_ms
from pipeline.readings import ReadingBatch, mean_of, spans
from pipeline.stage import Draft, Emitter
from pipeline.topics import TopicTemplate

TEMPLATE = TopicTemplate()
RECEIVED = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
TYPES: list[dict[str, Any]] = [
    {"name": "com.example.t.v1", "version": "1.0", "metric": "temperature", "device_classes": ["env"],
     "value": {"unit": "°C", "minimum": -40, "maximum": 85}},
    {"name": "com.example.t.v1", "version": "1.1", "metric": "temperature", "device_classes": ["env"],
     "value": {"unit": "°C", "minimum": -40, "maximum": 85},
     "fields": {"accuracy": {"type": "number", "minimum": 0}, "label": {"type": "string"}}},
]


def catalog() -> Catalog:
    return Catalog(TEMPLATE, parse_config({"catalog": {"types": TYPES}}).catalog.all_types)


def draft(rng: random.Random, i: int) -> Draft:
    device = f"d{rng.randrange(4)}"
    kind = rng.choice(["plain", "plain", "declared", "extra"])
    metric, device_class, version = {"plain": (rng.choice(["co2", "pm2_5"]), "air", "1.0"),
                                      "declared": ("temperature", "env", "1.0"),
                                      "extra": ("temperature", "env", "1.1")}[kind]
    topic = f"telemetry/raw/{version}/site1/{device_class}/{device}/{metric}"
    fields = TEMPLATE.parse(topic)
    assert fields is not None
    body: dict[str, Any] = {"value": rng.uniform(-10, 30)}
    if kind == "extra" and rng.random() < 0.7:
        body["accuracy"] = rng.choice([0.1, 2, None])
    if kind == "extra" and rng.random() < 0.5:
        body["label"] = "a"
    received = RECEIVED + timedelta(milliseconds=i, microseconds=rng.randrange(1000))
    device_ts = None if rng.random() < 0.3 else received - timedelta(seconds=rng.randrange(100))
    return Draft(
        topic=topic, fields=fields, transport=rng.choice(["mqtt", "ble"]), value=rng.choice([body["value"], 7]),
        unit=rng.choice([None, "°C"]) if kind != "plain" else rng.choice([None, "ppm"]), device_ts=device_ts,
        seq=rng.choice([None, i]), received_at=received, payload=json.dumps(body).encode(),
        event_id=new_event_id(), quality=rng.choice([(), (), ("clock_corrected",)]),
    )


def one_by_one(stage: DefineStage, d: Draft) -> Reading:
    """What validating the draft alone gives (the define stage's own slow path)."""
    route = stage._route(d)
    assert route.event_type is not None
    rejects: list[tuple[int, str, str]] = []
    run = stage._one_by_one(route, route.event_type, [0], [d], [d.event_id], rejects)
    assert rejects == []
    [reading] = run.readings()
    return reading


@pytest.mark.parametrize("seed", range(5))
async def test_a_batch_validated_by_type_equals_each_draft_validated_alone(seed: int) -> None:
    rng = random.Random(seed)
    drafts = [draft(rng, i) for i in range(300)]
    stage = DefineStage(TEMPLATE, catalog=catalog())
    emit = Emitter()
    batch = await stage.process(drafts, emit)
    assert emit.rejects == []
    assert len(batch.runs) > 3
    expected = [one_by_one(stage, d) for d in drafts]
    assert list(batch) == expected  # in arrival order, field by field (extra fields too)
    assert [type(r) for r in batch] == [type(r) for r in expected]
    assert [r.model_dump_json() for r in batch] == [r.model_dump_json() for r in expected]
    # each run's times in milliseconds, worked out by define for the batch at once: the model's conversion's
    assert all(run._ts_ms is not None for run in batch.runs)
    for run in batch.runs:
        assert run.ts_ms == [to_ms(r.ts) for r in run.readings()]
        assert run.received_ms == [to_ms(r.received_at) for r in run.readings()]
    # the valid events, made on demand, are the readings' in arrival order within each topic
    by_topic: dict[str, list[str]] = {}
    for topic, event in emit.events:
        by_topic.setdefault(topic, []).append(event["id"])
    assert sum(map(len, by_topic.values())) == len(drafts)
    for ids in by_topic.values():
        assert ids == sorted(ids)


async def test_one_bad_reading_rejects_only_itself_with_its_own_error() -> None:
    rng = random.Random(1)
    drafts = [draft(rng, i) for i in range(50)]
    bad = next(i for i, d in enumerate(drafts) if d.fields.version == "1.0" and d.fields.metric == "temperature")
    drafts[bad] = Draft(**{**{f: getattr(drafts[bad], f) for f in Draft.__dataclass_fields__}, "value": 99.0})
    emit = Emitter()
    batch = await DefineStage(TEMPLATE, catalog=catalog()).process(drafts, emit)
    [reject] = emit.rejects
    assert reject.reason == "invalid_event"
    assert "value: Input should be less than or equal to 85" in reject.detail
    assert [r.id for r in batch] == [d.event_id for i, d in enumerate(drafts) if i != bad]


async def test_quality_flags_follow_the_device_time() -> None:
    rng = random.Random(2)
    drafts = [draft(rng, i) for i in range(40)]
    batch = await DefineStage(TEMPLATE, catalog=catalog()).process(drafts, Emitter())
    for d, r in zip(drafts, batch, strict=True):
        flags = tuple(Quality(q) for q in d.quality) or (() if d.device_ts else (Quality.DEVICE_TIME_MISSING,))
        assert r.quality == flags


def test_a_batch_made_of_readings_gives_them_back() -> None:
    readings = [Reading(id=new_event_id(), site="s", device_id=f"d{i % 3}", device_class="c", transport="mqtt",
                        metric="m", value=float(i), received_at=RECEIVED) for i in range(10)]
    batch = ReadingBatch.of(readings)
    assert len(batch.runs) == 3
    assert batch == readings
    assert all(a is b for a, b in zip(batch, readings, strict=True))
    assert ReadingBatch.of(batch) is batch
    assert ReadingBatch([]) == []


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        pytest.param([5], [(0, 0, 1)], id="one"),
        pytest.param([59_999, 1, 30_000], [(0, 0, 3)], id="one-window-any-order"),
        pytest.param([1, 60_000, 60_001, 130_000], [(0, 0, 1), (60_000, 1, 3), (120_000, 3, 4)], id="in-order"),
        pytest.param([60_000, 1], None, id="out-of-order-across-windows"),
    ],
)
def test_spans_cut_times_in_order_at_window_edges(ts: list[int], expected: object) -> None:
    assert spans(ts, 60_000) == expected


def test_mean_of_extreme_values_stays_finite() -> None:
    assert mean_of([1.7e308, 1.7e308, -1.7e308]) == pytest.approx(1.7e308 / 3)
    assert mean_of([0.1] * 10) == 0.1
