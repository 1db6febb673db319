"""Tumbling windows of the analyze stage: alignment, closing (a newer reading, or the grace period on
the gateway's clock), late readings, the agg event, and correctness against pandas' resample over
seeded random data. The stage's clock is a plain callable it takes by design."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from oracles import resample

from pipeline.analyze import AnalyzeStage, window_label
from pipeline.model import AGGREGATE_TYPE, Reading, new_event_id
from pipeline.stage import Emitter
from pipeline.topics import TopicTemplate

TEMPLATE = TopicTemplate()
T0_MS = 1_714_564_800_000  # 2024-05-01T12:00:00Z
GW_NOW = 5_000_000.0  # the gateway clock in these tests: unrelated to the readings' time on purpose


class Clock:
    def __init__(self, now: float = GW_NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reading(value: float, ts_ms: int, *, device_id: str = "dev-1", metric: str = "temperature",
            device_time: bool = True) -> Reading:
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return Reading(
        id=new_event_id(ts_ms), site="site1", device_id=device_id, device_class="environment", transport="mqtt",
        metric=metric, value=value, unit="C", device_ts=ts if device_time else None,
        received_at=ts if not device_time else datetime.fromtimestamp(0, UTC),
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def aggs(emit: Emitter) -> list[dict[str, Any]]:
    return [e["data"] for _, e in emit.events if e["type"] == AGGREGATE_TYPE]


@pytest.mark.parametrize(("ms", "label"), [(60_000, "1m"), (3_600_000, "1h"), (90_000, "90s"), (86_400_000, "1d"),
                                           (1500, "1500ms"), (7_200_000, "2h")])
def test_window_labels(ms: int, label: str) -> None:
    assert window_label(ms) == label


async def test_a_newer_reading_closes_the_window_and_the_event_has_its_shape() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60], clock=Clock())
    emit = Emitter()
    await stage.process([reading(4.0, T0_MS + 500), reading(6.0, T0_MS + 59_999)], emit)
    assert emit.events == []
    await stage.process([reading(7.0, T0_MS + 60_000)], emit)
    [(topic, event)] = emit.events
    assert topic == "telemetry/agg/1.0/site1/environment/dev-1/temperature"
    assert event["type"] == AGGREGATE_TYPE
    assert event["subject"] == topic
    assert event["source"] == "/iotgw/site1/dev-1"
    assert event["time"] == "2024-05-01T12:01:00Z"
    assert event["data"] == {
        "device_id": "dev-1", "metric": "temperature", "unit": "C", "window": "1m",
        "from": "2024-05-01T12:00:00Z", "to": "2024-05-01T12:01:00Z",
        "count": 2, "mean": 5.0, "min": 4.0, "max": 6.0,
    }
    json.dumps(event, allow_nan=False)


async def test_receive_time_is_used_without_device_time() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60], clock=Clock())
    emit = Emitter()
    await stage.process([reading(1.0, T0_MS + 1000, device_time=False),
                         reading(2.0, T0_MS + 61_000, device_time=False)], emit)
    assert [(a["from"], a["count"]) for a in aggs(emit)] == [("2024-05-01T12:00:00Z", 1)]


async def test_a_quiet_series_closes_after_the_grace_period_on_the_gateway_clock() -> None:
    clock = Clock()
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60, 3600], grace_s=5, clock=clock)
    await stage.process([reading(3.0, T0_MS + 10_000)], Emitter())  # 50 s before the minute ends
    emit = Emitter()
    clock.now = GW_NOW + 54.999
    stage.tick(emit)
    assert emit.events == []
    clock.now = GW_NOW + 55
    stage.tick(emit)
    assert [a["window"] for a in aggs(emit)] == ["1m"]
    clock.now = GW_NOW + 3590 + 5
    stage.tick(emit)
    assert [a["window"] for a in aggs(emit)] == ["1m", "1h"]
    stage.tick(emit)
    assert len(emit.events) == 2  # published once


async def test_an_hour_closes_with_its_last_minute() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60, 3600], clock=Clock())
    emit = Emitter()
    hour = T0_MS + 3_600_000
    await stage.process([reading(1.0, T0_MS + 5000), reading(3.0, hour - 30_000)], emit)
    assert [(a["window"], a["count"]) for a in aggs(emit)] == [("1m", 1)]  # 12:00 closed by 12:59:30
    await stage.process([reading(8.0, hour + 10_000)], emit)
    assert [(a["window"], a["from"], a["count"], a["mean"], a["max"]) for a in aggs(emit)][1:] == [
        ("1m", "2024-05-01T12:59:00Z", 1, 3.0, 3.0), ("1h", "2024-05-01T12:00:00Z", 2, 2.0, 3.0)]
    # a reading late for its minute is late for its hour too: counted, in no window
    await stage.process([reading(100.0, hour - 5000), reading(9.0, hour + 70_000)], emit)
    assert stage.late == 1
    stage.flush(emit)
    assert [(a["window"], a["count"], a["max"]) for a in aggs(emit)][3:] == [("1m", 1, 8.0), ("1m", 1, 9.0),
                                                                             ("1h", 2, 9.0)]


async def test_late_readings_are_counted_not_published_again() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60], clock=Clock())
    emit = Emitter()
    await stage.process([reading(1.0, T0_MS), reading(2.0, T0_MS + 61_000), reading(9.0, T0_MS + 30_000)], emit)
    assert [(a["count"], a["max"]) for a in aggs(emit)] == [(1, 1.0)]
    assert stage.late == 1
    assert stage.stats_dict()["late"] == 1


async def test_flush_publishes_what_is_open() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60, 3600], clock=Clock())
    await stage.process([reading(1.0, T0_MS, device_id="a"), reading(2.0, T0_MS, device_id="b")], Emitter())
    emit = Emitter()
    stage.flush(emit)
    assert sorted((a["device_id"], a["window"]) for a in aggs(emit)) == [("a", "1h"), ("a", "1m"), ("b", "1h"),
                                                                          ("b", "1m")]
    again = Emitter()
    stage.flush(again)
    stage.tick(again)
    assert again.events == []


@pytest.mark.parametrize("windows", [[60, 3600, 900], [60, 90, 3600]], ids=["multiples", "not-multiples"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_windows_match_pandas_resample(seed: int, windows: list[int]) -> None:
    rnd = random.Random(seed)
    rows: list[tuple[str, int, float]] = []
    for device in ("a", "b", "c"):
        ts = T0_MS + rnd.randrange(3_600_000)
        for _ in range(rnd.randrange(50, 400)):
            ts += rnd.choice([rnd.randrange(1, 3000), rnd.randrange(1, 200_000)])  # bursts and gaps
            rows.append((device, ts, rnd.uniform(-1e3, 1e3)))
    rows.sort(key=lambda r: r[1])  # in time order per series: nothing is late, so every reading is published
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=windows, clock=Clock())
    emit = Emitter()
    readings = [reading(v, ts, device_id=d) for d, ts, v in rows]
    i = 0
    while i < len(readings):
        size = rnd.randrange(1, 200)
        await stage.process(readings[i:i + size], emit)
        i += size
    stage.flush(emit)
    assert stage.late == 0
    for label, rule in (("1m", "1min"), ("1h", "1h"), ("15m", "15min"), ("90s", "90s")):
        if label not in {window_label(w * 1000) for w in windows}:
            continue
        got = {(a["device_id"], a["from"]): (a["count"], a["mean"], a["min"], a["max"])
               for a in aggs(emit) if a["window"] == label}
        expected = {(device, _iso(start)): value for (device, start), value in resample(rows, rule).items()}
        assert got.keys() == expected.keys()
        for key, (count, mean, low, high) in expected.items():
            assert got[key][0] == count
            assert got[key][1] == pytest.approx(mean, rel=1e-9, abs=1e-9)
            assert got[key][2:] == (low, high)


async def test_mean_of_extreme_values_stays_finite() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", windows_s=[60], clock=Clock())
    emit = Emitter()
    await stage.process([reading(1.7e308, T0_MS), reading(-1.7e308, T0_MS + 1), reading(1.7e308, T0_MS + 2)], emit)
    stage.flush(emit)
    [data] = aggs(emit)
    assert data["mean"] == pytest.approx(1.7e308 / 3)
    json.dumps(data, allow_nan=False)
