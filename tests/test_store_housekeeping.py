"""The store's rollups (against pandas, over shuffled batches and replays), retention per table in
small chunks, and the disk budget with a tiny budget: a real SQLite file in a temporary directory."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from oracles import resample

from gateway.query import parse_duration, query_series, rollup_width
from pipeline.model import Reading, new_event_id, to_ms
from pipeline.readings import ReadingBatch, Run
from pipeline.store import DAY_MS, SqliteStore, StoreLimits, StoreReader, db_path, rollup_rows, rollup_runs

T0_MS = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def reading(value: float, ts_ms: int, device_id: str = "dev-1", metric: str = "temperature") -> Reading:
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return Reading(
        id=new_event_id(ts_ms), site="site1", device_id=device_id, device_class="environment", transport="mqtt",
        metric=metric, value=value, unit="C", device_ts=ts, received_at=ts,
    )


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_rollups_match_pandas_over_shuffled_batches_and_replays(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    readings = []
    for device in ("a", "b", "c"):
        for _ in range(rnd.randrange(200, 600)):
            readings.append(reading(rnd.uniform(-50, 50), T0_MS + rnd.randrange(3 * 3_600_000), device))
    shuffled = readings[:]
    rnd.shuffle(shuffled)  # out of order, and a window's readings spread over many batches
    async with SqliteStore(tmp_path) as store:
        i = 0
        while i < len(shuffled):
            size = rnd.randrange(1, 150)
            await store.write(shuffled[i:i + size])
            i += size
        # a replay after a crash: some readings again, mixed with nothing new, then a batch half old, half new
        await store.write(rnd.sample(readings, 100))
        extra = [reading(rnd.uniform(-50, 50), T0_MS + rnd.randrange(3 * 3_600_000), "a") for _ in range(50)]
        await store.write(rnd.sample(readings, 50) + extra)
        assert store.duplicates == 150
        assert store.rows_written == len(readings) + 50
    everything = readings + extra
    with StoreReader(tmp_path) as reader:
        for width, rule in (("1m", "1min"), ("1h", "1h")):
            got = {}
            for device in ("a", "b", "c"):
                found = reader.rollups(device, "temperature", width)  # type: ignore[arg-type]
                assert found is not None
                assert found[0] == "C"
                got.update({(device, r.bucket_ms): (r.count, r.mean, r.min, r.max) for r in found[1]})
            expected = resample([(r.device_id, to_ms(r.ts), r.value) for r in everything], rule)
            assert got.keys() == expected.keys()
            for key, (count, mean, low, high) in expected.items():
                assert got[key][0] == count
                assert got[key][1] == pytest.approx(mean, rel=1e-9, abs=1e-9)
                assert got[key][2:] == (low, high)
        assert reader.rollups("nope", "temperature", "1m") is None
        some = reader.rollups("a", "temperature", "1h", since_ms=T0_MS + 3_600_000, until_ms=T0_MS + 3_600_000)
        assert some is not None
        assert [r.bucket_ms for r in some[1]] == [T0_MS + 3_600_000]


async def test_rollup_mean_of_extreme_values_stays_finite(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(1.7e308, T0_MS), reading(1.7e308, T0_MS + 1)])
        await store.write([reading(-1.7e308, T0_MS + 2)])
    with StoreReader(tmp_path) as reader:
        found = reader.rollups("dev-1", "temperature", "1m")
        assert found is not None
        [row] = found[1]
        assert row.count == 3
        assert row.mean == pytest.approx(1.7e308 / 3)


async def test_retention_per_table_deletes_in_chunks(tmp_path: Path) -> None:
    now = T0_MS + 1000 * DAY_MS
    limits = StoreLimits(raw_retention_days=7, rollup_1m_retention_days=90, rollup_1h_retention_days=730,
                         chunk_rows=7)
    ages_days = [800, 400, 100, 50, 8, 6, 1, 0]  # 3 readings each, in different minutes and hours
    async with SqliteStore(tmp_path, limits) as store:
        for age in ages_days:
            for k in range(3):
                await store.write([reading(float(age), now - age * DAY_MS - k * 3_600_000 - 1,
                                           device_id=f"d{k % 2}")])
        hk = await store.maintain(now)
        assert hk.retention_deleted == {"readings": 5 * 3, "rollup_1m": 3 * 3, "rollup_1h": 1 * 3, "alerts": 0}
        assert store.stats()["retention_deleted"] == hk.retention_deleted
        again = await store.maintain(now)
        assert again.retention_deleted["readings"] == 15  # nothing more to delete
        assert again.passes == 2
    with StoreReader(tmp_path) as reader:
        ages = sorted({int(v) for d in ("d0", "d1") for _, v in (reader.series(d, "temperature") or ("", []))[1]})
        assert ages == [0, 1, 6]
        hours = [r for d in ("d0", "d1") for r in (reader.rollups(d, "temperature", "1h") or ("", []))[1]]
        assert sorted({int(r.mean) for r in hours}) == [0, 1, 6, 8, 50, 100, 400]


async def test_retention_chunks_leave_room_for_writes(tmp_path: Path) -> None:
    """Deleting 5,000 rows in chunks of 100: each chunk is its own short transaction."""
    now = T0_MS + 30 * DAY_MS
    async with SqliteStore(tmp_path, StoreLimits(chunk_rows=100)) as store:
        await store.write([reading(1.0, T0_MS + i) for i in range(5000)])
        before = store.transactions
        hk = await store.maintain(now)
        assert hk.retention_deleted["readings"] == 5000
        assert store.transactions == before  # deletes are not counted as writes ...
        db = sqlite3.connect(db_path(tmp_path))
        try:
            assert db.execute("SELECT count(*) FROM readings").fetchone()[0] == 0
        finally:
            db.close()


def _file_size(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        count = db.execute("PRAGMA page_count").fetchone()[0]
        return int(size * count)
    finally:
        db.close()


async def test_disk_budget_deletes_oldest_raw_first_and_the_file_stops_growing(tmp_path: Path) -> None:
    budget = 400 * 1024
    limits = StoreLimits(max_bytes=budget, chunk_rows=500)
    sizes = []
    rows = 0
    async with SqliteStore(tmp_path, limits) as store:
        for batch_no in range(60):  # ~ 1.5 MB of readings over 60 minutes of reading time
            start = T0_MS + batch_no * 60_000
            await store.write([reading(float(batch_no), start + i * 60, device_id=f"d{i % 3}") for i in range(500)])
            rows += 500
            hk = await store.maintain(start)  # "now" is the newest reading: retention never applies
            sizes.append(hk.file_bytes)
        stats = store.stats()
    assert stats["budget_deleted"]["readings"] > 0
    assert stats["retention_deleted"]["readings"] == 0
    assert stats["budget_deleted"]["rollup_1m"] == 0  # raw readings were enough
    assert stats["used_bytes"] <= budget
    assert max(sizes) <= budget + 500 * 120  # at most one batch over, between passes
    assert max(sizes[30:]) <= max(sizes[:30]) + 64 * 1024  # the file stopped growing
    assert _file_size(db_path(tmp_path)) <= budget
    with StoreReader(tmp_path) as reader:
        kept = reader.count()
        assert kept + stats["budget_deleted"]["readings"] == rows
        newest_batches = set()
        for device in ("d0", "d1", "d2"):
            found = reader.series(device, "temperature")
            assert found is not None
            values = [v for _, v in found[1]]
            newest_batches |= set(values)
            assert max(values) == 59.0  # the newest readings are kept ...
        assert min(newest_batches) > 0  # ... and the oldest are the ones gone
        minutes = [r for d in ("d0", "d1", "d2") for r in (reader.rollups(d, "temperature", "1m") or ("", []))[1]]
        assert sum(r.count for r in minutes) == rows  # rollups keep what raw deletion took


async def test_disk_budget_then_takes_1m_rollups_and_never_1h(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    budget = 80 * 1024
    async with SqliteStore(tmp_path, StoreLimits(max_bytes=budget, chunk_rows=1000)) as store:
        # many series over many minutes: the 1-minute rollups alone are over the budget
        for hour in range(4):
            batch = [reading(float(m), T0_MS + hour * 3_600_000 + m * 60_000, device_id=f"d{s}")
                     for m in range(60) for s in range(20)]
            await store.write(batch)
        with caplog.at_level("WARNING", logger="pipeline.store"):
            hk = await store.maintain(T0_MS + 4 * 3_600_000)
        assert hk.over_budget
        assert hk.budget_deleted["readings"] == 4 * 60 * 20
        assert hk.budget_deleted["rollup_1m"] > 0
        assert store.stats()["over_budget"] is True
        assert sum("over its disk budget" in r.message for r in caplog.records) == 1
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 0
        hours = [r for s in range(20) for r in (reader.rollups(f"d{s}", "temperature", "1h") or ("", []))[1]]
        assert len(hours) == 4 * 20
        assert sum(r.count for r in hours) == 4 * 60 * 20


async def test_back_within_budget_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with SqliteStore(tmp_path, StoreLimits(max_bytes=200 * 1024)) as store:
        await store.write([reading(1.0, T0_MS + i, device_id=f"d{i % 5}") for i in range(8000)])
        with caplog.at_level("WARNING", logger="pipeline.store"):
            assert (await store.maintain(T0_MS)).over_budget
            store.limits = StoreLimits(max_bytes=10 * 1024 * 1024)
            assert not (await store.maintain(T0_MS)).over_budget
            assert not (await store.maintain(T0_MS)).over_budget
    messages = [r.message for r in caplog.records]
    assert sum("over its disk budget" in m for m in messages) == 1
    assert sum("back within its disk budget" in m for m in messages) == 1


async def test_a_store_without_rollups_is_upgraded(tmp_path: Path) -> None:
    path = db_path(tmp_path)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE series (series_id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, metric TEXT NOT NULL,
                             unit TEXT, UNIQUE (device_id, metric));
        CREATE TABLE readings (series_id INTEGER NOT NULL, ts INTEGER NOT NULL, event_id TEXT NOT NULL,
                               value REAL NOT NULL, seq INTEGER, received_at INTEGER NOT NULL, quality TEXT,
                               PRIMARY KEY (series_id, ts, event_id)) WITHOUT ROWID;
        INSERT INTO series VALUES (1, 'old', 'temperature', 'C');
        INSERT INTO readings VALUES (1, 1714564800000, 'A', 1.0, NULL, 0, NULL),
                                    (1, 1714564830000, 'B', 3.0, NULL, 0, NULL);
        PRAGMA user_version = 1;
    """)
    db.close()
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(5.0, T0_MS + 45_000, device_id="old")])
    with StoreReader(tmp_path) as reader:
        found = reader.rollups("old", "temperature", "1m")
        assert found is not None
        assert [(r.count, r.mean, r.min, r.max) for r in found[1]] == [(3, 3.0, 1.0, 5.0)]


# -- queries over rollups (gateway/query.py) ------------------------------------------------------


@pytest.mark.parametrize(("every", "agg"), [("1h", "mean"), ("2h", "max"), ("1h", "count"), ("15m", "min"),
                                            ("30m", "mean")])
async def test_coarse_queries_use_rollups_and_match_the_raw_readings(tmp_path: Path, every: str, agg: str) -> None:
    rnd = random.Random(7)
    readings = [reading(rnd.uniform(0, 100), T0_MS + rnd.randrange(6 * 3_600_000)) for _ in range(3000)]
    async with SqliteStore(tmp_path) as store:
        await store.write(readings)
    duration = parse_duration(every)
    assert rollup_width(duration, agg) is not None
    with StoreReader(tmp_path) as reader:
        got = query_series(reader, "dev-1", "temperature", every=duration, agg=agg, now_ms=T0_MS)
    series = pd.Series([r.value for r in readings], index=pd.DatetimeIndex([r.ts for r in readings]))
    expected = series.sort_index().resample(duration, origin="epoch").agg(agg)
    expected = expected[expected > 0] if agg == "count" else expected.dropna()
    assert [p.ts_ms for p in got] == list(pd.DatetimeIndex(expected.index).as_unit("ms").asi8)
    assert [p.value for p in got] == pytest.approx(list(expected.to_numpy()), rel=1e-9)


async def test_hourly_query_outlives_raw_retention(tmp_path: Path) -> None:
    now = T0_MS + 30 * DAY_MS
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(float(h), T0_MS + h * 3_600_000) for h in range(5)])
        await store.maintain(now)  # raw readings are older than 7 days: gone
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 0
        hourly = query_series(reader, "dev-1", "temperature", every=parse_duration("1h"), agg="mean", now_ms=now)
    assert [(p.ts_ms, p.value) for p in hourly] == [(T0_MS + h * 3_600_000, float(h)) for h in range(5)]
    assert rollup_width(parse_duration("1m"), "mean") is None  # fine buckets read the raw readings
    assert rollup_width(parse_duration("1h"), "last") is None


def test_rollup_runs_match_the_reading_by_reading_rollups() -> None:
    """The store's rollups of a batch, made run by run (one minute at once; a run straight to its rows when it
    is its series' only one), against the same readings rolled up one by one."""
    rnd = random.Random(5)

    def run(*ts_ms: int) -> Run:
        [one] = ReadingBatch.of([reading(rnd.uniform(-50, 50), t) for t in ts_ms]).runs
        return one

    runs = [
        (1, run(T0_MS + 5)),  # one reading
        (2, run(T0_MS + 1, T0_MS + 30_000, T0_MS + 59_999)),  # one minute
        (6, run(T0_MS + 125_000, T0_MS + 130_000)),  # one minute, not the first of its hour
        (3, run(T0_MS + 50_000, T0_MS + 70_000, T0_MS + 200_000)),  # in order, over three minutes
        (4, run(T0_MS + 3_599_000, T0_MS + 3_601_000)),  # two minutes of two hours
        (5, run(T0_MS + 130_000, T0_MS + 10_000, T0_MS + 70_000, T0_MS + 20_000)),  # out of order
    ]
    twice = [*runs, (2, run(T0_MS + 40_000, T0_MS + 61_000))]  # a series in two runs (two topic versions)
    for pairs in (runs, twice):
        rows = [(series_id, t, None, v) for series_id, r in pairs for t, v in zip(r.ts_ms, r.values, strict=True)]
        got, expected = rollup_runs(pairs), rollup_rows(rows)
        for width in ("1m", "1h"):
            assert sorted(row[:3] for row in got[width]) == sorted(row[:3] for row in expected[width])
            mine = {row[:2]: row[3:] for row in got[width]}
            for key, mean, low, high in ((row[:2], *row[3:]) for row in expected[width]):
                assert mine[key][0] == pytest.approx(mean, rel=1e-12)
                assert mine[key][1:] == (low, high)
