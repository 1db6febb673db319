"""gateway.query: durations, series queries over a real store (raw, since, every= buckets) and rendering."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.query import AGGREGATES, Point, QueryError, parse_duration, query_series, render_points
from pipeline.model import Reading, new_event_id
from pipeline.store import SqliteStore, StoreReader

# ---------------------------------------------------------------------------
# parse_duration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("1w", timedelta(weeks=1)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5h", timedelta(minutes=90)),
        ("0.5s", timedelta(milliseconds=500)),
        ("1ms", timedelta(milliseconds=1)),
        (" 5m ", timedelta(minutes=5)),
        ("007s", timedelta(seconds=7)),
        ("10000d", timedelta(days=10000)),
    ],
)
def test_parse_duration_valid(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "5", "s", "ms", "0s", "0.0m", "-5s", "+5s", "5 s", "5S", "5M", "5min", "5sec", "1e3s", ".5s", "5.s",
     "5y", "1h30m", "5s5", "nan s", "infs", "1,5h"],
)
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_names_itself_for_argparse() -> None:
    assert parse_duration.__name__ == "duration"


def test_parse_duration_rejects_what_rounds_to_zero() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("0.0001ms")


def test_parse_duration_rejects_huge_durations() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1000000000w")


# ---------------------------------------------------------------------------
# query_series over a real store
# ---------------------------------------------------------------------------

BASE = 1_699_999_980_000  # 2023-11-14T22:13:00.000Z, a whole minute
# (seconds after BASE, value): three one-minute buckets with data, one (120-180 s) empty
POINTS = [(0, 1.0), (10, 3.0), (25, 2.0), (59, 8.0), (60, 5.0), (190, -1.0), (195, 4.0)]
ROWS = [(BASE + s * 1000, v) for s, v in POINTS]
NOW = BASE + 200_000
MINUTE = timedelta(minutes=1)
# computed by hand from POINTS, bucket by bucket: [0, 60), [60, 120), [180, 240)
EXPECTED = {
    "mean": [3.5, 5.0, 1.5],
    "min": [1.0, 5.0, -1.0],
    "max": [8.0, 5.0, 4.0],
    "last": [8.0, 5.0, 4.0],
    "count": [4.0, 1.0, 2.0],
}
BUCKETS = [BASE, BASE + 60_000, BASE + 180_000]


def _reading(ts_ms: int, value: float, metric: str = "temperature") -> Reading:
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return Reading.model_validate({
        "id": new_event_id(ts_ms), "site": "site1", "device_id": "dev-1", "device_class": "environment",
        "transport": "mqtt", "metric": metric, "value": value, "unit": "C", "device_ts": ts, "received_at": ts,
    })


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[StoreReader]:
    async def fill() -> None:
        async with SqliteStore(tmp_path) as store:
            # out of time order on purpose: the store orders by ts
            await store.write([_reading(ts, v) for ts, v in reversed(ROWS)])
            await store.write([_reading(BASE, 42.0, metric="humidity")])

    asyncio.run(fill())
    with StoreReader(tmp_path) as r:
        yield r


def test_query_raw(reader: StoreReader) -> None:
    assert query_series(reader, "dev-1", "temperature", now_ms=NOW) == [Point(ts, v) for ts, v in ROWS]
    assert query_series(reader, "dev-1", "humidity", now_ms=NOW) == [Point(BASE, 42.0)]


@pytest.mark.parametrize(
    ("since", "first"),
    [
        pytest.param(timedelta(seconds=200), 0, id="exactly-the-first-point"),
        pytest.param(timedelta(seconds=140), 60, id="boundary-inclusive"),
        pytest.param(timedelta(seconds=139.999), 190, id="just-after"),
        pytest.param(timedelta(seconds=4), None, id="nothing-that-recent"),
        pytest.param(timedelta(days=365), 0, id="everything"),
    ],
)
def test_query_since(reader: StoreReader, since: timedelta, first: int | None) -> None:
    got = query_series(reader, "dev-1", "temperature", since=since, now_ms=NOW)
    expected = [Point(BASE + s * 1000, v) for s, v in POINTS if first is not None and s >= first]
    assert got == expected


@pytest.mark.parametrize("agg", AGGREGATES)
def test_query_every_aggregates(reader: StoreReader, agg: str) -> None:
    got = query_series(reader, "dev-1", "temperature", every=MINUTE, agg=agg, now_ms=NOW)
    assert [p.value for p in got] == EXPECTED[agg]
    assert all(type(p.value) is float and type(p.ts_ms) is int for p in got)


def test_query_every_default_aggregate_is_mean(reader: StoreReader) -> None:
    got = query_series(reader, "dev-1", "temperature", every=MINUTE, now_ms=NOW)
    assert [p.value for p in got] == EXPECTED["mean"]


def test_query_every_bucket_times_are_epoch_ms(reader: StoreReader) -> None:
    got = query_series(reader, "dev-1", "temperature", every=MINUTE, agg="count", now_ms=NOW)
    assert [p.ts_ms for p in got] == BUCKETS


def test_query_every_with_since(reader: StoreReader) -> None:
    # since 60 s after BASE: [60, 120) holds 5.0, [180, 240) holds -1.0 and 4.0
    got = query_series(reader, "dev-1", "temperature", since=timedelta(seconds=140), every=MINUTE, agg="max",
                       now_ms=NOW)
    assert [p.value for p in got] == [5.0, 4.0]
    got = query_series(reader, "dev-1", "temperature", since=timedelta(seconds=4), every=MINUTE, now_ms=NOW)
    assert got == []


def test_query_every_finer_buckets(reader: StoreReader) -> None:
    got = query_series(reader, "dev-1", "temperature", every=timedelta(seconds=30), agg="count", now_ms=NOW)
    # [0, 30): 3 points, [30, 60): 1, [60, 90): 1, [180, 210): 2
    assert [p.value for p in got] == [3.0, 1.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("device_id", "metric"),
    [("nobody", "temperature"), ("dev-1", "pressure"), ("humidity", "dev-1")],
)
def test_query_unknown_series(reader: StoreReader, device_id: str, metric: str) -> None:
    with pytest.raises(QueryError, match="no series"):
        query_series(reader, device_id, metric, now_ms=NOW)


def test_query_unknown_aggregate(reader: StoreReader) -> None:
    with pytest.raises(QueryError, match="unknown aggregate"):
        query_series(reader, "dev-1", "temperature", every=MINUTE, agg="median", now_ms=NOW)
    assert issubclass(QueryError, GatewayError)


# ---------------------------------------------------------------------------
# render_points
# ---------------------------------------------------------------------------

SAMPLE = [Point(BASE, 1.5), Point(BASE + 1, -2.0), Point(BASE + 60_000, 0.1)]


def test_render_json() -> None:
    text = render_points(SAMPLE, "json")
    assert text.endswith("\n")
    assert json.loads(text) == [
        {"ts": "2023-11-14T22:13:00.000Z", "value": 1.5},
        {"ts": "2023-11-14T22:13:00.001Z", "value": -2.0},
        {"ts": "2023-11-14T22:14:00.000Z", "value": 0.1},
    ]
    assert render_points([], "json") == "[]\n"


def test_render_csv() -> None:
    text = render_points(SAMPLE, "csv")
    assert text == (
        "ts,value\n"
        "2023-11-14T22:13:00.000Z,1.5\n"
        "2023-11-14T22:13:00.001Z,-2.0\n"
        "2023-11-14T22:14:00.000Z,0.1\n"
    )
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [float(r["value"]) for r in rows] == [p.value for p in SAMPLE]
    assert render_points([], "csv") == "ts,value\n"


def test_render_table() -> None:
    lines = render_points(SAMPLE, "table").splitlines()
    assert lines == [
        "2023-11-14T22:13:00.000Z" + " " * 2 + " 1.5",
        "2023-11-14T22:13:00.001Z" + " " * 2 + " -2.0",
        "2023-11-14T22:14:00.000Z" + " " * 2 + " 0.1",
    ]
    assert render_points([], "table") == ""


def test_render_round_trips_query_output(reader: StoreReader) -> None:
    points = query_series(reader, "dev-1", "temperature", now_ms=NOW)
    assert [row["value"] for row in json.loads(render_points(points, "json"))] == [v for _, v in POINTS]
