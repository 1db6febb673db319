"""store: validated readings -> SQLite (WAL) under the data directory.

One transaction per batch. Readings are clustered by ``(series_id, ts)`` in a WITHOUT ROWID table,
so "one series over a time range" is a single index range scan. SQLite runs on one dedicated
thread so the event loop never waits on the disk.

Rollups. The same transaction that inserts a batch's readings merges them into 1-minute and 1-hour
rollups keyed by ``(series_id, bucket start)`` (count, mean, min, max; buckets aligned to UTC
boundaries of the reading's time). Merging is an upsert, so rollups are exact however readings are
batched, late or out of order; readings the store already had (a replay after a crash) are not
counted twice: only rows actually inserted are rolled up.

Retention and the disk budget (:meth:`SqliteStore.maintain`, run periodically by the gateway):

- raw readings, 1-minute and 1-hour rollups are each kept for their configured number of days;
  closed alerts as long as 1-minute rollups;
- deletion goes in chunks of ``chunk_rows``, one short transaction each, so the store's writes
  run between them and no write lock is held for long;
- the file is created with ``auto_vacuum=INCREMENTAL``: freed pages are reused by new rows and only
  the free pages that would keep the file above ``max_bytes`` are given back to the file system
  (``PRAGMA incremental_vacuum``). A store created before this version reuses its free pages but
  does not shrink;
- **disk budget**: when the pages in use exceed ``max_bytes``, the oldest raw readings go first
  (in slices of 5 % of the stored time span, across all series), until use is back under 90 % of the
  budget; when no raw reading is left, the oldest 1-minute rollups go the same way; 1-hour rollups
  and alerts are never deleted for the budget. Every deletion is counted (``budget_deleted`` in the
  stats), entering and leaving the over-budget state is logged once each, and ingestion never waits
  for the budget: writes go on while it is over, and the next pass deletes again. The WAL file
  comes on top of the budget, capped at ``WAL_LIMIT_BYTES`` after each checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from pipeline.db import INSERT_CHUNK, DatabaseError, SqliteThread, in_transaction, insert_many
from pipeline.errors import PipelineError
from pipeline.model import Reading, to_ms, utc_from_ms
from pipeline.readings import ReadingBatch, Run, mean_of, spans, times_ms
from pipeline.retry import backoff_delay, until_done
from pipeline.rules import AlertChange
from pipeline.stage import Emitter, StageStats

log = logging.getLogger(__name__)
DB_NAME = "iotgw.sqlite3"
SCHEMA_VERSION = 2
DAY_MS = 86_400_000
ROLLUPS = {"1m": 60_000, "1h": 3_600_000}  # rollup table suffix -> bucket width in ms
RollupWidth = Literal["1m", "1h"]
WAL_LIMIT_BYTES = 8 * 1024 * 1024
PRAGMAS = ("auto_vacuum=INCREMENTAL", f"journal_size_limit={WAL_LIMIT_BYTES}")  # set before WAL mode and the schema
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
CREATE TABLE IF NOT EXISTS alerts (
    alert_id      INTEGER PRIMARY KEY,
    rule          TEXT NOT NULL,
    kind          TEXT NOT NULL,
    severity      TEXT NOT NULL,
    site          TEXT NOT NULL,
    device_class  TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    metric        TEXT NOT NULL,
    value         REAL NOT NULL,
    message       TEXT NOT NULL,
    raised_at     INTEGER NOT NULL,
    event_id      TEXT NOT NULL,
    cleared_at    INTEGER,
    clear_value   REAL,
    clear_message TEXT
);
CREATE INDEX IF NOT EXISTS alerts_by_state ON alerts (cleared_at, rule, device_id, metric);
"""
_SCHEMA += "".join(f"""
CREATE TABLE IF NOT EXISTS rollup_{width} (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    mean      REAL NOT NULL,
    vmin      REAL NOT NULL,
    vmax      REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
""" for width in ROLLUPS)
# Merge a partial aggregate into a bucket. In SET, every column name means the row's old value.
_UPSERT_ROLLUP = ("INSERT INTO rollup_{w} (series_id, bucket, n, mean, vmin, vmax) VALUES", """
ON CONFLICT (series_id, bucket) DO UPDATE SET
    n = n + excluded.n,
    mean = mean * (CAST(n AS REAL) / (n + excluded.n)) + excluded.mean * (CAST(excluded.n AS REAL) / (n + excluded.n)),
    vmin = min(vmin, excluded.vmin),
    vmax = max(vmax, excluded.vmax)
""")
_INSERT_READING = "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?, ?)"


@functools.cache
def _insert_statement(columns: int, rows: int) -> str:
    """``INSERT OR IGNORE INTO readings VALUES (?, ...), ...`` for ``rows`` rows."""
    return "INSERT OR IGNORE INTO readings VALUES " + ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows)  # noqa: S608
_UPSERT_DEVICE = ("INSERT INTO devices VALUES", """
ON CONFLICT (device_id) DO UPDATE SET transport = excluded.transport, device_class = excluded.device_class,
    site = excluded.site, last_seen = max(last_seen, excluded.last_seen)
""")
_BUCKET_AGG_SQL = {"mean": "avg(value)", "min": "min(value)", "max": "max(value)", "count": "nullif(count(*), 0)"}


class StoreError(PipelineError):
    """The local store cannot be opened or written."""


class _Replayed(Exception):
    """Some readings of a batch were stored already."""


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Retention per table (days) and the disk budget; defaults live in gateway/config/storage.py."""

    raw_retention_days: float = 7
    rollup_1m_retention_days: float = 90
    rollup_1h_retention_days: float = 730
    max_bytes: int = 1024**3
    chunk_rows: int = 2000  # rows per deleting transaction


@dataclass(slots=True)
class StoreHousekeeping:
    retention_deleted: dict[str, int] = field(default_factory=lambda: {"readings": 0, "rollup_1m": 0,
                                                                         "rollup_1h": 0, "alerts": 0})
    budget_deleted: dict[str, int] = field(default_factory=lambda: {"readings": 0, "rollup_1m": 0})
    over_budget: bool = False
    passes: int = 0
    pages_released: int = 0
    used_bytes: int = 0
    file_bytes: int = 0


def _merge(groups: dict[tuple[int, int], list[float]], key: tuple[int, int], part: list[float]) -> None:
    n, mean, lo, hi = part
    g = groups.get(key)
    if g is None:
        groups[key] = part
        return
    total = g[0] + n
    g[1] = g[1] * (g[0] / total) + mean * (n / total)  # weighted, cannot overflow for finite means
    g[0] = total
    g[2] = min(g[2], lo)
    g[3] = max(g[3], hi)


def _minutes(rows: Iterable[tuple[Any, ...]]) -> dict[tuple[int, int], list[float]]:
    minutes: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        series_id, ts, value = row[0], row[1], row[3]
        key = (series_id, ts - ts % 60_000)
        g = minutes.get(key)
        if g is None:
            minutes[key] = [1, value, value, value]
            continue
        n = g[0] + 1
        g[0] = n
        g[1] = g[1] * (1 - 1 / n) + value / n
        if value < g[2]:
            g[2] = value
        elif value > g[3]:
            g[3] = value
    return minutes


def _widths(minutes: dict[tuple[int, int], list[float]]) -> dict[str, list[tuple[int, int, int, float, float, float]]]:
    hours: dict[tuple[int, int], list[float]] = {}
    for (series_id, bucket), (n, mean, lo, hi) in minutes.items():
        _merge(hours, (series_id, bucket - bucket % 3_600_000), [n, mean, lo, hi])
    return {
        width: [(sid, bucket, int(n), mean, lo, hi) for (sid, bucket), (n, mean, lo, hi) in groups.items()]
        for width, groups in (("1m", minutes), ("1h", hours))
    }


def rollup_rows(rows: Iterable[tuple[Any, ...]]) -> dict[str, list[tuple[int, int, int, float, float, float]]]:
    """Partial 1-minute and 1-hour aggregates of reading rows ``(series_id, ts_ms, _, value, ...)``."""
    return _widths(_minutes(rows))


def rollup_runs(runs: Sequence[tuple[int, Run]]) -> dict[str, list[tuple[int, int, int, float, float, float]]]:
    """:func:`rollup_rows` of every reading of ``(series_id, run)``: the readings of a run that fall in one
    minute (all of them, usually; else the run is cut where the minutes change, if its times are in order)
    are summed up at once. A run that is the only one of its series in the batch and falls in one minute
    (the usual case) makes its 1-minute and 1-hour rows straight away, with no merging."""
    if len({series_id for series_id, _ in runs}) != len(runs):  # a series in two runs: merge them
        return _widths(_run_minutes(runs))
    out_1m: list[tuple[int, int, int, float, float, float]] = []
    out_1h: list[tuple[int, int, int, float, float, float]] = []
    rest = []
    for series_id, run in runs:
        ts, values = run.ts_ms, run.values
        first = ts[0]
        minute = first - first % 60_000
        if len(ts) == 1:
            value = values[0]
            part = (1, value, value, value)
        elif min(ts) >= minute and max(ts) < minute + 60_000:
            part = (len(ts), mean_of(values), min(values), max(values))
        else:
            rest.append((series_id, run))
            continue
        out_1m.append((series_id, minute, *part))
        out_1h.append((series_id, minute - minute % 3_600_000, *part))
    if rest:  # series of their own: their rows cannot meet those above
        more = _widths(_run_minutes(rest))
        out_1m += more["1m"]
        out_1h += more["1h"]
    return {"1m": out_1m, "1h": out_1h}


def _run_minutes(runs: Iterable[tuple[int, Run]]) -> dict[tuple[int, int], list[float]]:
    minutes: dict[tuple[int, int], list[float]] = {}
    for series_id, run in runs:
        ts = run.ts_ms
        cut = spans(ts, 60_000)
        if cut is not None:
            values = run.values
            for bucket, i, j in cut:
                part = values[i:j] if i or j < len(values) else values
                _merge(minutes, (series_id, bucket), [j - i, mean_of(part), min(part), max(part)])
            continue
        for key, part in _minutes((series_id, t, None, v) for t, v in zip(ts, run.values, strict=True)).items():
            _merge(minutes, key, part)
    return minutes


def _delete_chunk(db: sqlite3.Connection, table: str, column: str, series_id: int, before: int, rows: int) -> int:  # noqa: PLR0917
    """Up to about ``rows`` rows of one series older than ``before``, oldest first, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        cursor = db.execute(
            f"DELETE FROM {table} WHERE series_id = ?1 AND {column} < ?2 AND {column} <= coalesce("  # noqa: S608
            f"(SELECT {column} FROM {table} WHERE series_id = ?1 AND {column} < ?2 ORDER BY {column} "
            "LIMIT 1 OFFSET ?3), ?2)",
            (series_id, before, rows - 1),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return cursor.rowcount


def _page_use(db: sqlite3.Connection) -> tuple[int, int, int]:
    """(page size, pages in the file, free pages)."""
    size = db.execute("PRAGMA page_size").fetchone()[0]
    count = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return int(size), int(count), int(free)


def _delete_old_alerts(db: sqlite3.Connection, before: int) -> int:
    return db.execute("DELETE FROM alerts WHERE cleared_at < ?", (before,)).rowcount


def _time_span(db: sqlite3.Connection, table: str, column: str) -> tuple[int, int] | None:
    row = db.execute(
        f"SELECT min(lo), max(hi) FROM (SELECT (SELECT min({column}) FROM {table} t "  # noqa: S608
        f"WHERE t.series_id = s.series_id) AS lo, (SELECT max({column}) FROM {table} t "
        "WHERE t.series_id = s.series_id) AS hi FROM series s)"
    ).fetchone()
    return None if row[0] is None else (int(row[0]), int(row[1]))


class SqliteStore:
    """The writer. Use as ``async with SqliteStore(dir) as store: await store.write(batch)``."""

    def __init__(self, data_dir: Path, limits: StoreLimits | None = None) -> None:
        self.path = db_path(data_dir)
        self.limits = limits or StoreLimits()
        # FULL, like the journal: the journal lets a batch go once it is here, so here must survive a
        # power cut too. One fsync per batch (batches linger up to max_latency_s under light load).
        # auto_vacuum takes effect only in a new file (before any table).
        self._db = SqliteThread(self.path, synchronous="FULL", pragmas=PRAGMAS)
        self._series: dict[tuple[str, str], int] = {}
        self.rows_written = 0
        self.transactions = 0
        self.duplicates = 0
        self.housekeeping = StoreHousekeeping()
        self._maintaining = asyncio.Lock()

    async def __aenter__(self) -> Self:
        try:
            await self._db.open(_SCHEMA)  # CREATE ... IF NOT EXISTS leaves user_version as it was
            await self._db.run(self._upgrade)
        except (DatabaseError, sqlite3.Error) as exc:
            await self._db.close()
            cause = exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ else exc
            raise StoreError(f"cannot open the store at {self.path}: {cause}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._db.close()

    async def write(self, readings: Sequence[Reading]) -> None:
        if readings:
            await self._db.run(self._write, ReadingBatch.of(readings))

    def _upgrade(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if 0 < version < SCHEMA_VERSION:
            self._backfill_rollups(db)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        for series_id, device_id, metric in db.execute("SELECT series_id, device_id, metric FROM series"):
            self._series[(device_id, metric)] = series_id

    @staticmethod
    def _backfill_rollups(db: sqlite3.Connection) -> None:
        """A store from before rollups: roll up what it holds, once, at the upgrade."""
        log.warning("upgrading the store: computing 1-minute and 1-hour rollups of the stored readings")

        def backfill(db: sqlite3.Connection) -> None:
            for width, ms in ROLLUPS.items():
                db.execute(
                    f"INSERT OR REPLACE INTO rollup_{width} SELECT series_id, ts - ts % {ms}, count(*), avg(value), "  # noqa: S608
                    "min(value), max(value) FROM readings GROUP BY series_id, ts - ts % " + str(ms)
                )

        in_transaction(db, backfill)

    @staticmethod
    def _new_series(db: sqlite3.Connection, run: Run, new: dict[tuple[str, str], int]) -> int:
        key = (run.device_id, run.metric)
        db.execute("INSERT OR IGNORE INTO series (device_id, metric, unit) VALUES (?, ?, ?)", (*key, run.units[0]))
        row = db.execute("SELECT series_id FROM series WHERE device_id = ? AND metric = ?", key).fetchone()
        series_id = new[key] = int(row[0])
        return series_id

    @staticmethod
    def _insert_all(db: sqlite3.Connection, columns: list[list[Any]]) -> bool:
        """Insert, :data:`~pipeline.db.INSERT_CHUNK` rows to a statement; False if some rows were stored already.
        The parameters are laid out straight from the columns (slice assignment), no tuple made per row."""
        width, rows = len(columns), len(columns[0])
        flat: list[Any] = [None] * (width * rows)
        for i, column in enumerate(columns):
            flat[i::width] = column
        before = db.total_changes
        whole = rows - rows % INSERT_CHUNK
        step = INSERT_CHUNK * width
        if whole:
            db.executemany(_insert_statement(width, INSERT_CHUNK),
                           [flat[i:i + step] for i in range(0, whole * width, step)])
        if whole < rows:
            db.execute(_insert_statement(width, rows - whole), flat[whole * width:])
        return db.total_changes - before == rows

    @staticmethod
    def _insert_each(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Insert one by one; return the rows that were new."""
        fresh = []
        for row in rows:
            before = db.total_changes
            db.execute(_INSERT_READING, row)
            if db.total_changes != before:
                fresh.append(row)
        return fresh

    def _write(self, db: sqlite3.Connection, batch: ReadingBatch) -> None:
        """One transaction. The readings go in many to a statement; only when some were stored already (a
        replay after a crash) is the transaction rolled back and done again reading by reading, to learn
        which ones are new: duplicates (same event id) are neither stored again nor rolled up twice. (A
        savepoint would spare the second try, but costs a copy of every page the batch touches.)"""
        try:
            self._write_once(db, batch, careful=False)
        except _Replayed:
            self._write_once(db, batch, careful=True)

    def _write_once(self, db: sqlite3.Connection, batch: ReadingBatch, *, careful: bool) -> None:
        known = self._series
        new_series: dict[tuple[str, str], int] = {}  # cached only once committed
        seen: dict[str, list[Any]] = {}  # device id -> [transport, class, site, first, last] (receive ms)
        db.execute("BEGIN")
        try:
            runs = []
            for run in batch.runs:
                key = (run.device_id, run.metric)
                runs.append((known.get(key) or new_series.get(key) or self._new_series(db, run, new_series), run))
            runs.sort(key=itemgetter(0))  # rows in about key order: the inserts walk the B-tree in order
            columns = self._columns(runs)
            for _, run in runs:
                received = run.received_ms
                first, last = min(received), max(received)
                device = seen.get(run.device_id)
                if device is None:
                    seen[run.device_id] = [run.transports[0], run.device_class, run.site, first, last]
                else:
                    device[3], device[4] = min(device[3], first), max(device[4], last)
            total = len(columns[0])
            if careful:
                inserted = self._insert_each(db, list(zip(*columns, strict=True)))
                rollups = rollup_rows(inserted)
                stored = len(inserted)
            elif self._insert_all(db, columns):
                rollups = rollup_runs(runs)
                stored = total
            else:
                raise _Replayed
            for width, partials in rollups.items():
                insert_many(db, _UPSERT_ROLLUP[0].format(w=width), _UPSERT_ROLLUP[1], partials)
            insert_many(db, *_UPSERT_DEVICE, [(device_id, *info) for device_id, info in seen.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        known.update(new_series)
        self.rows_written += stored
        self.duplicates += total - stored
        self.transactions += 1

    @staticmethod
    def _columns(runs: list[tuple[int, Run]]) -> list[list[Any]]:
        """The ``readings`` rows of ``(series_id, run)``, column by column, in that order: each column is one
        C-level concatenation over the runs, and the times are converted once for the batch."""
        def each(column: Callable[[Run], list[Any]]) -> list[Any]:
            return list(chain.from_iterable(column(run) for _, run in runs))

        ts, received = times_ms([run for _, run in runs])
        quality: list[Any] = each(attrgetter("quality"))
        quality = [",".join(q) if q else None for q in quality] if any(quality) else [None] * len(quality)
        series = list(chain.from_iterable(repeat(series_id, len(run.ids)) for series_id, run in runs))
        return [series, ts, each(attrgetter("ids")), each(attrgetter("values")), each(attrgetter("seqs")), received,
                quality]

    # -- alerts ------------------------------------------------------------------------------------

    async def record_alerts(self, changes: list[AlertChange]) -> None:
        """A raise opens a row (unless one is open for the same rule and series); a clear closes it."""
        if changes:
            await self._db.run(in_transaction, lambda db: self._record_alerts(db, changes))

    @staticmethod
    def _record_alerts(db: sqlite3.Connection, changes: list[AlertChange]) -> None:
        for c in changes:
            key = (c.rule, c.device_id, c.metric)
            if c.raised:
                db.execute(
                    "INSERT INTO alerts (rule, kind, severity, site, device_class, device_id, metric, value, "
                    "message, raised_at, event_id) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS "
                    "(SELECT 1 FROM alerts WHERE cleared_at IS NULL AND rule = ? AND device_id = ? AND metric = ?)",
                    (c.rule, c.kind, c.severity, c.site, c.device_class, c.device_id, c.metric, c.value,
                     c.message, to_ms(c.raised_at), c.event_id, *key),
                )
            else:
                db.execute(
                    "UPDATE alerts SET cleared_at = ?, clear_value = ?, clear_message = ? "
                    "WHERE cleared_at IS NULL AND rule = ? AND device_id = ? AND metric = ?",
                    (to_ms(c.at), c.value, c.message, *key),
                )

    async def active_alerts(self) -> list[tuple[str, str, str, datetime]]:
        """``(rule, device_id, metric, raised_at)`` of every alert not cleared: seeds the rules at start."""
        rows = await self._db.run(lambda db: db.execute(
            "SELECT rule, device_id, metric, raised_at FROM alerts WHERE cleared_at IS NULL").fetchall())
        return [(rule, device_id, metric, utc_from_ms(raised)) for rule, device_id, metric, raised in rows]

    async def close_unconfigured_alerts(self, rules: Iterable[str], at_ms: int) -> int:
        """At start: alerts of rules no longer configured can never clear; close them (no event)."""
        names = sorted(set(rules))

        def close(db: sqlite3.Connection) -> int:
            marks = ", ".join("?" * len(names))
            return db.execute(
                "UPDATE alerts SET cleared_at = ?, clear_message = 'rule no longer configured' "  # noqa: S608
                f"WHERE cleared_at IS NULL AND rule NOT IN ({marks})", (at_ms, *names)).rowcount

        return await self._db.run(close)

    # -- retention and the disk budget -------------------------------------------------------------

    async def maintain(self, now_ms: int) -> StoreHousekeeping:
        """One retention and budget pass (see the module docstring); many short transactions."""
        async with self._maintaining:
            limits, hk = self.limits, self.housekeeping
            series = await self._db.run(lambda db: [sid for (sid,) in db.execute("SELECT series_id FROM series")])
            for table, column, days in (("readings", "ts", limits.raw_retention_days),
                                        ("rollup_1m", "bucket", limits.rollup_1m_retention_days),
                                        ("rollup_1h", "bucket", limits.rollup_1h_retention_days)):
                cutoff = now_ms - int(days * DAY_MS)
                hk.retention_deleted[table] += await self._delete_before(table, column, series, cutoff)
            hk.retention_deleted["alerts"] += await self._db.run(
                _delete_old_alerts, now_ms - int(limits.rollup_1m_retention_days * DAY_MS))
            await self._enforce_budget(series)
            hk.passes += 1
            return hk

    async def _delete_before(self, table: str, column: str, series: list[int], cutoff: int) -> int:
        deleted = 0
        for series_id in series:
            while True:
                count = await self._db.run(_delete_chunk, table, column, series_id, cutoff, self.limits.chunk_rows)
                deleted += count
                if count < self.limits.chunk_rows:
                    break
        return deleted

    async def _enforce_budget(self, series: list[int]) -> None:
        limits, hk = self.limits, self.housekeeping
        target = int(limits.max_bytes * 0.9)
        used = await self._db.run(self._used_bytes)
        if used > limits.max_bytes:
            if not hk.over_budget:
                log.warning("store over its disk budget (%d of %d bytes in use): deleting the oldest raw readings,"
                            " then the oldest 1-minute rollups", used, limits.max_bytes)
            hk.over_budget = True
            for table, column in (("readings", "ts"), ("rollup_1m", "bucket")):
                while used > target:
                    span = await self._db.run(_time_span, table, column)
                    if span is None:
                        break
                    oldest, newest = span
                    cutoff = oldest + max(1, (newest - oldest) // 20)
                    hk.budget_deleted[table] += await self._delete_before(table, column, series, cutoff)
                    used = await self._db.run(self._used_bytes)
            if used > target:
                log.error("store still over its disk budget with only 1-hour rollups and alerts left (%d bytes)", used)
        elif hk.over_budget:  # a pass that had nothing to delete
            hk.over_budget = False
            log.warning("store back within its disk budget (%d of %d bytes in use)", used, limits.max_bytes)
        hk.pages_released += await self._db.run(self._release_pages)
        hk.used_bytes = await self._db.run(self._used_bytes)

    def _used_bytes(self, db: sqlite3.Connection) -> int:
        size, count, free = _page_use(db)
        self.housekeeping.file_bytes = size * count
        return size * (count - free)

    def _release_pages(self, db: sqlite3.Connection) -> int:
        """Give back the free pages that keep the file over the budget (incremental vacuum)."""
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return 0
        released = 0
        for _ in range(4):  # pointer-map pages can make one call give back a little less than asked
            size, count, free = _page_use(db)
            excess = min(free, count - self.limits.max_bytes // size)
            if excess <= 0:
                break
            db.execute(f"PRAGMA incremental_vacuum({excess})").fetchall()
            released += count - _page_use(db)[1]
        return released

    def stats(self) -> dict[str, Any]:
        hk = self.housekeeping
        return {
            "rows_written": self.rows_written, "duplicates": self.duplicates, "transactions": self.transactions,
            "retention_deleted": dict(hk.retention_deleted), "budget_deleted": dict(hk.budget_deleted),
            "over_budget": hk.over_budget, "used_bytes": hk.used_bytes, "file_bytes": hk.file_bytes,
            "max_bytes": self.limits.max_bytes, "maintenance_passes": hk.passes, "pages_released": hk.pages_released,
        }


_WRITE_ERRORS = (StoreError, DatabaseError, sqlite3.Error, OSError)


def _write_retry_delay(attempt: int) -> float:
    """Between attempts at a store write: 1, 2, 4, ... seconds, at most 30, not randomised (a disk)."""
    return backoff_delay(attempt, base_s=0.5, factor=2.0, cap_s=30.0, jitter=False)


class StoreStage:
    name = "store"

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.stats = StageStats()
        self.write_failures = 0

    async def process(self, batch: Sequence[Reading], emit: Emitter) -> Sequence[Reading]:
        async def write() -> None:
            try:
                await self._store.write(batch)
            except _WRITE_ERRORS:
                self.write_failures += 1
                raise

        # A full or failing disk holds the batch (and, behind it, ingestion): it is never dropped.
        await until_done(write, what="store write", log=log, retry_on=_WRITE_ERRORS, delay=_write_retry_delay)
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


@dataclass(frozen=True, slots=True)
class RollupRow:
    bucket_ms: int
    count: int
    mean: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class AlertRow:
    alert_id: int
    rule: str
    kind: str
    severity: str
    site: str
    device_class: str
    device_id: str
    metric: str
    value: float
    message: str
    raised_at_ms: int
    event_id: str
    cleared_at_ms: int | None
    clear_value: float | None
    clear_message: str | None

    @property
    def active(self) -> bool:
        return self.cleared_at_ms is None


READER_PRAGMAS = ("mmap_size=1073741824",)  # long scans read mapped pages, not copies (bench/query.py)


class StoreReader:
    """Read-only queries: ``with StoreReader(data_dir) as store`` (the CLI) opens the store read-only
    and closes it at the end; ``StoreReader(connection)`` (the HTTP API, on the connection its
    :class:`~pipeline.db.SqliteThread` owns) reads through a connection it leaves open."""

    def __init__(self, source: Path | sqlite3.Connection) -> None:
        self._owned = not isinstance(source, sqlite3.Connection)
        if isinstance(source, sqlite3.Connection):
            self._db = source
            return
        path = db_path(source)
        if not path.exists():
            raise StoreError(f"no store at {path} (is --data-dir right?)")
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for pragma in READER_PRAGMAS:
            self._db.execute(f"PRAGMA {pragma}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
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

    def _series_row(self, device_id: str, metric: str) -> tuple[int, str | None] | None:
        row = self._db.execute(
            "SELECT series_id, unit FROM series WHERE device_id = ? AND metric = ?", (device_id, metric)
        ).fetchone()
        return None if row is None else (int(row[0]), row[1])

    def series(
        self, device_id: str, metric: str, since_ms: int | None = None, until_ms: int | None = None
    ) -> tuple[str | None, list[tuple[int, float]]] | None:
        """(unit, [(ts_ms, value), ...]) of one series in time order; None if there is no such series."""
        found = self._series_row(device_id, metric)
        if found is None:
            return None
        points = self._db.execute(
            "SELECT ts, value FROM readings WHERE series_id = ? AND ts >= ? AND ts <= ? ORDER BY ts",
            (found[0], since_ms if since_ms is not None else -(2**62), until_ms if until_ms is not None else 2**62),
        ).fetchall()
        return found[1], points

    def rollups(
        self, device_id: str, metric: str, width: RollupWidth, since_ms: int | None = None, until_ms: int | None = None
    ) -> tuple[str | None, list[RollupRow]] | None:
        """(unit, rollups in bucket order) of one series, 1-minute or 1-hour buckets whose start lies in
        ``[since_ms, until_ms]``; None if there is no such series."""
        if width not in ROLLUPS:
            raise StoreError(f"no {width!r} rollups; one of {', '.join(ROLLUPS)}")
        found = self._series_row(device_id, metric)
        if found is None:
            return None
        rows = self._db.execute(
            f"SELECT bucket, n, mean, vmin, vmax FROM rollup_{width} WHERE series_id = ? "  # noqa: S608
            "AND bucket >= ? AND bucket <= ? ORDER BY bucket",
            (found[0], since_ms if since_ms is not None else -(2**62), until_ms if until_ms is not None else 2**62),
        ).fetchall()
        return found[1], [RollupRow(*row) for row in rows]

    def alerts(self, *, active: bool | None = None, limit: int = 100) -> list[AlertRow]:
        """Alerts, newest raised first: all, only active (``active=True``) or only cleared ones."""
        where = {None: "", True: "WHERE cleared_at IS NULL", False: "WHERE cleared_at IS NOT NULL"}[active]
        rows = self._db.execute(
            "SELECT alert_id, rule, kind, severity, site, device_class, device_id, metric, value, message, "  # noqa: S608
            f"raised_at, event_id, cleared_at, clear_value, clear_message FROM alerts {where} "
            "ORDER BY raised_at DESC, alert_id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [AlertRow(*row) for row in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM readings").fetchone()[0])

    # -- for the HTTP API (gateway/http/api.py) and `iotgw query --every` ---------------------------------

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
