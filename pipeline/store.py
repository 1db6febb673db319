"""store: validated readings -> SQLite (WAL) under the data directory.

One transaction per batch. Readings are clustered by ``(series_id, ts)`` in a WITHOUT ROWID table,
so "one series over a time range" is a single index range scan. SQLite runs on one dedicated
thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pipeline.errors import PipelineError
from pipeline.model import Reading
from pipeline.stage import Emitter, StageStats

log = logging.getLogger(__name__)
DB_NAME = "iotgw.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id    TEXT PRIMARY KEY,
    transport    TEXT NOT NULL,
    device_class TEXT NOT NULL,
    site         TEXT NOT NULL,
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    series_id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    metric    TEXT NOT NULL,
    unit      TEXT,
    UNIQUE (device_id, metric)
);
CREATE TABLE IF NOT EXISTS readings (
    series_id   INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    value       REAL NOT NULL,
    seq         INTEGER,
    received_at INTEGER NOT NULL,
    quality     TEXT,
    PRIMARY KEY (series_id, ts, event_id)
) WITHOUT ROWID;
"""


_BUCKET_AGG_SQL = {"mean": "avg(value)", "min": "min(value)", "max": "max(value)", "count": "nullif(count(*), 0)"}


class StoreError(PipelineError):
    """The local store cannot be opened or written."""


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


class SqliteStore:
    """The writer. Use as ``async with SqliteStore(dir) as store: await store.write(batch)``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = db_path(data_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotgw-sqlite")
        self._db: sqlite3.Connection | None = None
        self._series: dict[tuple[str, str], int] = {}
        self.rows_written = 0
        self.transactions = 0

    async def __aenter__(self) -> Self:
        await self._run(self._open)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def write(self, readings: list[Reading]) -> None:
        if readings:
            await self._run(self._write, readings)

    async def _run(self, fn: object, *args: object) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, fn, *args)  # type: ignore[arg-type]

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL, like the journal: the journal lets a batch go once it is here, so here must survive a
            # power cut too. One fsync per batch (batches linger up to max_latency_s under light load).
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        self._db = db
        for series_id, device_id, metric in db.execute("SELECT series_id, device_id, metric FROM series"):
            self._series[(device_id, metric)] = series_id

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _new_series(self, db: sqlite3.Connection, reading: Reading, new: dict[tuple[str, str], int]) -> int:
        key = (reading.device_id, reading.metric)
        db.execute(
            "INSERT OR IGNORE INTO series (device_id, metric, unit) VALUES (?, ?, ?)",
            (reading.device_id, reading.metric, reading.unit),
        )
        row = db.execute("SELECT series_id FROM series WHERE device_id = ? AND metric = ?", key).fetchone()
        series_id = new[key] = int(row[0])
        return series_id

    def _write(self, readings: list[Reading]) -> None:
        db = self._db
        if db is None:
            raise StoreError("the store is not open")
        known = self._series
        new_series: dict[tuple[str, str], int] = {}  # cached only once committed
        seen: dict[str, list[Any]] = {}  # device id -> [transport, class, site, first, last] (receive ms)
        rows: list[tuple[Any, ...]] = []
        append = rows.append
        db.execute("BEGIN")
        try:
            for r in readings:
                key = (r.device_id, r.metric)
                series_id = known.get(key) or new_series.get(key) or self._new_series(db, r, new_series)
                received = int(r.received_at.timestamp() * 1000)
                device_ts = r.device_ts
                append((
                    series_id,
                    int(device_ts.timestamp() * 1000) if device_ts is not None else received,
                    r.id,
                    r.value,
                    r.seq,
                    received,
                    ",".join(r.quality) if r.quality else None,
                ))
                device = seen.get(r.device_id)
                if device is None:
                    seen[r.device_id] = [r.transport, r.device_class, r.site, received, received]
                elif received > device[4]:
                    device[4] = received
                elif received < device[3]:
                    device[3] = received
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            inserted = db.total_changes - before  # duplicates (same event id) are not counted
            db.executemany(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                "transport = excluded.transport, device_class = excluded.device_class, site = excluded.site, "
                "last_seen = max(last_seen, excluded.last_seen)",
                [(device_id, *info) for device_id, info in seen.items()],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        known.update(new_series)
        self.rows_written += inserted
        self.transactions += 1


class StoreStage:
    name = "store"

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.stats = StageStats()
        self.write_failures = 0

    async def process(self, batch: list[Reading], emit: Emitter) -> list[Reading]:
        attempt = 0
        while True:  # a full or failing disk holds the batch (and, behind it, ingestion): it is never dropped
            try:
                await self._store.write(batch)
                break
            except (StoreError, sqlite3.Error, OSError) as exc:
                attempt += 1
                if attempt == 1:
                    log.error("store write failed, retrying until it succeeds: %s", exc)
                self.write_failures += 1
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))
        if attempt:
            log.warning("store write recovered after %d failed attempt(s)", attempt)
        self.stats.received += len(batch)
        self.stats.passed += len(batch)
        return batch


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    transport: str
    device_class: str
    site: str
    first_seen_ms: int
    last_seen_ms: int
    metrics: tuple[str, ...]


class StoreReader:
    """Read-only queries for the CLI and, later, the HTTP API."""

    def __init__(self, data_dir: Path) -> None:
        path = db_path(data_dir)
        if not path.exists():
            raise StoreError(f"no store at {path} (is --data-dir right?)")
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self._db.execute("PRAGMA mmap_size=1073741824")  # long scans read mapped pages, not copies (bench/query.py)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()

    def devices(self) -> list[DeviceRow]:
        metrics: dict[str, list[str]] = {}
        for device_id, metric in self._db.execute("SELECT device_id, metric FROM series ORDER BY device_id, metric"):
            metrics.setdefault(device_id, []).append(metric)
        return [
            DeviceRow(device_id, transport, device_class, site, first, last, tuple(metrics.get(device_id, ())))
            for device_id, transport, device_class, site, first, last in self._db.execute(
                "SELECT device_id, transport, device_class, site, first_seen, last_seen FROM devices "
                "ORDER BY device_id"
            )
        ]

    def series(
        self, device_id: str, metric: str, since_ms: int | None = None, until_ms: int | None = None
    ) -> tuple[str | None, list[tuple[int, float]]] | None:
        """(unit, [(ts_ms, value), ...]) of one series in time order; None if there is no such series."""
        row = self._db.execute(
            "SELECT series_id, unit FROM series WHERE device_id = ? AND metric = ?", (device_id, metric)
        ).fetchone()
        if row is None:
            return None
        points = self._db.execute(
            "SELECT ts, value FROM readings WHERE series_id = ? AND ts >= ? AND ts <= ? ORDER BY ts",
            (row[0], since_ms if since_ms is not None else -(2**62), until_ms if until_ms is not None else 2**62),
        ).fetchall()
        return row[1], points

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM readings").fetchone()[0])

    # -- for the HTTP API (gateway/api.py) and `iotgw query --every` ---------------------------------

    MAX_BUCKETS = 20_000

    def buckets(
        self, device_id: str, metric: str, bucket_ms: int, agg: str, *,
        since_ms: int | None = None, until_ms: int | None = None,
    ) -> tuple[str | None, list[tuple[int, float]]] | None:
        """(unit, [(bucket start ms, aggregate), ...]) of one series, aggregated in SQL: only non-empty
        buckets, aligned on the epoch, over ``since_ms <= ts <= until_ms`` (default: the whole series).

        One statement: a recursive CTE walks the bucket starts and each bucket is an aggregate over an
        index range of the ``(series_id, ts)`` key, so rows arrive in key order and nothing is sorted
        (a ``GROUP BY ts / bucket`` builds a temporary B-tree over every row: ~3x slower, see bench/query.py).
        Raises ValueError for a bad aggregate or more than :attr:`MAX_BUCKETS` buckets.
        """
        if bucket_ms < 1:
            raise ValueError(f"bucket must be at least 1 ms, not {bucket_ms}")
        # one bucket: [s, s + bucket) clipped to [?5, ?6], the range asked for, as [lo, hi]
        where = "FROM readings WHERE series_id = ?2 AND ts BETWEEN lo AND hi"
        if agg == "last":
            value = f"SELECT value {where} ORDER BY ts DESC LIMIT 1"
        elif agg in _BUCKET_AGG_SQL:
            value = f"SELECT {_BUCKET_AGG_SQL[agg]} {where}"
        else:
            raise ValueError(f"unknown aggregate {agg!r}; one of mean, min, max, last, count")
        row = self._db.execute(
            "SELECT series_id, unit FROM series WHERE device_id = ? AND metric = ?", (device_id, metric)
        ).fetchone()
        if row is None:
            return None
        series_id, unit = row
        first, last = self._ends(series_id, since_ms, until_ms)
        if first is None or last is None:
            return unit, []
        first_bucket = first - first % bucket_ms
        count = (last - first_bucket) // bucket_ms + 1
        if count > self.MAX_BUCKETS:
            raise ValueError(f"{count} buckets of {bucket_ms} ms in this range, at most {self.MAX_BUCKETS}: "
                             "use a larger bucket or a shorter range")
        lo, hi = since_ms if since_ms is not None else first, until_ms if until_ms is not None else last
        # the text is fixed (one of the aggregates above): no parameter reaches it
        steps = ("WITH RECURSIVE b(s, lo, hi) AS (SELECT ?3, max(?3, ?5), min(?3 + ?1 - 1, ?6) "
                 "UNION ALL SELECT s + ?1, s + ?1, min(s + 2 * ?1 - 1, ?6) FROM b WHERE s + ?1 <= ?4) ")
        sql = f"{steps}SELECT s, v FROM (SELECT s, ({value}) AS v FROM b) WHERE v IS NOT NULL"  # noqa: S608
        points = self._db.execute(
            sql,
            (bucket_ms, series_id, first_bucket, last, lo, hi),
        ).fetchall()
        return unit, [(int(s), float(v)) for s, v in points]

    def latest(self) -> list[tuple[str, str, str | None, int, float]]:
        """The newest reading of every series: (device_id, metric, unit, ts_ms, value)."""
        out: list[tuple[str, str, str | None, int, float]] = []
        for series_id, device_id, metric, unit in self._db.execute(
            "SELECT series_id, device_id, metric, unit FROM series ORDER BY device_id, metric"
        ).fetchall():
            last = self._db.execute(
                "SELECT ts, value FROM readings WHERE series_id = ? ORDER BY ts DESC LIMIT 1", (series_id,)
            ).fetchone()
            if last is not None:
                out.append((device_id, metric, unit, int(last[0]), float(last[1])))
        return out

    def series_span(
        self, device_id: str, metric: str, since_ms: int | None = None, until_ms: int | None = None
    ) -> tuple[str | None, int | None, int | None] | None:
        """(unit, first ts, last ts) of one series within the range (None, None when empty); None if no such series."""
        row = self._db.execute(
            "SELECT series_id, unit FROM series WHERE device_id = ? AND metric = ?", (device_id, metric)
        ).fetchone()
        if row is None:
            return None
        return (row[1], *self._ends(row[0], since_ms, until_ms))

    def _ends(self, series_id: int, since_ms: int | None, until_ms: int | None) -> tuple[int | None, int | None]:
        """First and last ts in the range: two index seeks (``SELECT min(ts), max(ts)`` together would scan it)."""
        bounds = (series_id, since_ms if since_ms is not None else -(2**62),
                  until_ms if until_ms is not None else 2**62)
        where = "FROM readings WHERE series_id = ? AND ts >= ? AND ts <= ?"
        first = self._db.execute(f"SELECT min(ts) {where}", bounds).fetchone()[0]
        last = self._db.execute(f"SELECT max(ts) {where}", bounds).fetchone()[0]
        return first, last

    def count_range(self, device_id: str, metric: str, since_ms: int | None = None, until_ms: int | None = None) -> int:
        return int(self._db.execute(
            "SELECT count(*) FROM readings r JOIN series s ON r.series_id = s.series_id "
            "WHERE s.device_id = ? AND s.metric = ? AND r.ts >= ? AND r.ts <= ?",
            (device_id, metric, since_ms if since_ms is not None else -(2**62),
             until_ms if until_ms is not None else 2**62),
        ).fetchone()[0])

    def count_series(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM series").fetchone()[0])
