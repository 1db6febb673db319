"""StoreReader.buckets (the SQL downsampling behind the API), series spans and the API's time parsing."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.query import QueryError, parse_time, query_series
from pipeline.model import Reading, new_event_id
from pipeline.store import SqliteStore, StoreReader, db_path

BASE = 1_700_000_040_000  # a whole minute
SECONDS = [0, 5, 30, 59, 61, 200, 201]  # value = seconds; buckets of 60 s: [0,60) [60,120) [180,240)


def _reading(ts_ms: int, value: float) -> Reading:
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return Reading.model_validate({
        "id": new_event_id(ts_ms), "site": "s", "device_id": "d", "device_class": "c", "transport": "mqtt",
        "metric": "m", "value": value, "unit": "u", "device_ts": ts, "received_at": ts,
    })


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[StoreReader]:
    async def fill() -> None:
        async with SqliteStore(tmp_path) as store:
            await store.write([_reading(BASE + s * 1000, float(s)) for s in SECONDS])

    asyncio.run(fill())
    with StoreReader(tmp_path) as r:
        yield r


def test_buckets_are_clipped_to_the_range_asked(reader: StoreReader) -> None:
    # from 30 s to 200 s: the first bucket only sees 30 and 59, the last only 200
    found = reader.buckets("d", "m", 60_000, "count", since_ms=BASE + 30_000, until_ms=BASE + 200_000)
    assert found == ("u", [(BASE, 2.0), (BASE + 60_000, 1.0), (BASE + 180_000, 1.0)])
    assert reader.buckets("d", "m", 60_000, "last", since_ms=BASE, until_ms=BASE + 61_000) == (
        "u", [(BASE, 59.0), (BASE + 60_000, 61.0)])
    assert reader.buckets("d", "m", 60_000, "last", since_ms=BASE, until_ms=BASE + 60_000) == ("u", [(BASE, 59.0)])
    assert reader.buckets("d", "m", 60_000, "mean", since_ms=BASE + 300_000) == ("u", [])
    assert reader.buckets("d", "x", 60_000, "mean") is None


def test_buckets_refuse_too_many_and_unknown_aggregates(reader: StoreReader) -> None:
    with pytest.raises(ValueError, match="at most 20000"):
        reader.buckets("d", "m", 1, "mean")  # 201 s in 1 ms buckets
    with pytest.raises(ValueError, match="unknown aggregate"):
        reader.buckets("d", "m", 1000, "median")
    with pytest.raises(QueryError, match="use a larger bucket"):
        query_series(reader, "d", "m", every=timedelta(milliseconds=1))


def test_span_and_count(reader: StoreReader) -> None:
    assert reader.series_span("d", "m") == ("u", BASE, BASE + 201_000)
    assert reader.series_span("d", "m", BASE + 300_000) == ("u", None, None)
    assert reader.series_span("d", "nope") is None
    assert reader.count_range("d", "m", BASE + 1, BASE + 61_000) == 4
    assert reader.count_series() == 1
    assert [row[:2] + row[3:] for row in reader.latest()] == [("d", "m", BASE + 201_000, 201.0)]


NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("-1h", NOW - timedelta(hours=1)),
        ("-90s", NOW - timedelta(seconds=90)),
        ("2026-11-28T06:40:00Z", datetime(2026, 11, 28, 6, 40, tzinfo=UTC)),
        ("2026-11-28T07:40:00+01:00", datetime(2026, 11, 28, 6, 40, tzinfo=UTC)),
        ("2026-11-28 06:40:00.5+00:00", datetime(2026, 11, 28, 6, 40, 0, 500_000, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-11-28T06:40:00", "2026-11-28", "-", "-0s", "+1h", "1h",
                                  "20261128T064000Z"])
def test_parse_time_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        parse_time(text, NOW)


def test_a_reader_over_an_open_connection_leaves_it_open(reader: StoreReader, tmp_path: Path) -> None:
    connection = sqlite3.connect(db_path(tmp_path))
    with StoreReader(connection) as borrowed:
        assert borrowed.count() == reader.count() == len(SECONDS)
    assert connection.execute("SELECT count(*) FROM series").fetchone()[0] == 1  # still usable: its owner closes it
    connection.close()
