"""Readings per second through clean -> define -> store -> analyze on one core, beside raw SQLite
inserts of the same rows into the same schema, in the same run.

    .venv/bin/python bench/pipeline_throughput.py [--readings 200000] [--batch 500] [--rounds 3] [--series 200]
                                                  [--no-analyze] [--ceiling]

The process is pinned to one CPU (threads included: the store's SQLite thread shares it). Drafts
are made by the collect stage beforehand (collect parses JSON; the figure asked for starts at
clean). The stages run as the gateway runs them: front (clean, define) and back (store, analyze)
halves as two tasks; nobody consumes the valid events, so they are not made (gateway/publish.py).
Each round writes a fresh database with the store's settings (WAL, synchronous=FULL, one
transaction per batch). The baseline is the cheapest write of the same rows: ``executemany`` of
ready tuples into the same ``readings`` table, one transaction per batch, same pragmas. The
figure to watch is the ratio (target: >= 0.8; each round's too) and readings/s (target: >= 100,000).
Each stage's CPU time per reading is printed too, and the raw inserts' CPU time per row beside them: with
the process on one CPU, a machine busy with other work makes both runs CPU-bound, and the ratio tends to
that of their CPU times.

``--ceiling`` then measures what bounds the ratio: the store alone on batches clean and define made
beforehand (as if clean, define and analyze cost nothing), and the SQL statements the store executes for
them, recorded once and replayed on a fresh file (as if the store's Python cost nothing too), each beside
the raw inserts in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.config import DEFAULT_METRIC_RULES
from pipeline.analyze import AnalyzeStage
from pipeline.clean import CleanStage
from pipeline.collect import CollectStage
from pipeline.define import DefineStage
from pipeline.model import new_event_id, to_ms
from pipeline.stage import Draft, Emitter, RawMessage
from pipeline.store import _SCHEMA, SqliteStore, StoreStage
from pipeline.store import PRAGMAS as STORE_PRAGMAS
from pipeline.topics import DEFAULT_TEMPLATE, DEFAULT_VERSION, TopicTemplate

METRICS = (("temperature", "°C", 21.0), ("humidity", "%", 45.0), ("pm2_5", "µg/m³", 12.0), ("co2", "ppm", 600.0))


def make_drafts(count: int, series: int, seed: int = 1) -> list[Draft]:
    """Realistic readings: ``series`` series, values wandering a little, device time a second apart."""
    rng = random.Random(seed)
    template = TopicTemplate(DEFAULT_TEMPLATE)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    raw: list[RawMessage] = []
    level = [METRICS[i % len(METRICS)][2] for i in range(series)]
    for i in range(count):
        s = i % series
        metric, unit, base = METRICS[s % len(METRICS)]
        level[s] += rng.uniform(-0.5, 0.5) + 0.1 * (base - level[s])  # wanders near its base
        ts = start + timedelta(seconds=i // series)
        body = {"value": round(level[s], 2), "unit": unit, "ts": ts.timestamp(), "seq": i // series}
        topic = f"telemetry/raw/1.0/bench/environment/dev-{s // len(METRICS)}/{metric}"
        raw.append(RawMessage(topic, json.dumps(body).encode(), "bench", ts + timedelta(milliseconds=20),
                              new_event_id(to_ms(ts))))
    collect = CollectStage(template, {})

    async def run() -> list[Draft]:
        return await collect.process(raw, Emitter())

    drafts = asyncio.run(run())
    assert len(drafts) == count, "collect rejected bench input"
    return drafts


async def through_stages(drafts: list[Draft], batch: int, data_dir: Path, *, analyze: bool
                         ) -> tuple[float, int, dict[str, float]]:
    """Seconds in total, rows stored, and CPU seconds spent inside each stage.

    The stages run as the gateway runs them (gateway/flow.py): the front half (clean, define) and the back
    half (store, then analyze) as two tasks joined by a hand-off of two batches, so the front works on the
    next batch while the store's thread waits for its commit to reach the disk. With the halves
    interleaved, a stage's wall time includes the other half's: each stage's figure is the CPU time of the
    threads it ran on (the event loop's, and the store's SQLite thread).
    """
    template = TopicTemplate(DEFAULT_TEMPLATE)
    clean = CleanStage(DEFAULT_METRIC_RULES)
    define = DefineStage(template)
    async with SqliteStore(data_dir) as store:
        front: tuple[tuple[str, Any], ...] = (("clean", clean), ("define", define))
        back: tuple[tuple[str, Any], ...] = (("store", StoreStage(store)),)
        if analyze:
            back += (("analyze", AnalyzeStage(template, DEFAULT_VERSION)),)
        spent = dict.fromkeys([name for name, _ in (*front, *back)], 0.0)
        handoff: asyncio.Queue[tuple[list[Any], Emitter] | None] = asyncio.Queue(2)

        # clean, define and analyze run on the event loop without yielding to the other half: the loop
        # thread's CPU time across each call is theirs. The store's work is its SQLite thread's CPU time.
        sqlite_thread = time.pthread_getcpuclockid(await store._db.run(lambda _: threading.get_ident()))

        async def run(stages: tuple[tuple[str, Any], ...], items: list[Any], emit: Emitter) -> list[Any]:
            for name, stage in stages:
                before = time.thread_time()
                items = await stage.process(items, emit)
                if name != "store":
                    spent[name] += time.thread_time() - before
            return items

        async def front_half() -> None:
            for i in range(0, len(drafts), batch):
                emit = Emitter()
                await handoff.put((await run(front, drafts[i:i + batch], emit), emit))
            await handoff.put(None)

        async def back_half() -> None:
            while (job := await handoff.get()) is not None:
                await run(back, *job)

        started, store_cpu = time.perf_counter(), time.clock_gettime(sqlite_thread)
        await asyncio.gather(front_half(), back_half())
        elapsed = time.perf_counter() - started
        spent["store"] = time.clock_gettime(sqlite_thread) - store_cpu
        return elapsed, store.rows_written, spent


def store_like_db(path: Path) -> sqlite3.Connection:
    """A new database with the store's schema and settings (its pragmas in its order, WAL, synchronous=FULL)."""
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in STORE_PRAGMAS:
        db.execute(f"PRAGMA {pragma}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def raw_inserts(drafts: list[Draft], batch: int, data_dir: Path) -> tuple[float, float]:
    """The same rows as ready tuples, straight into the store's schema: seconds, and CPU seconds of the
    inserting thread."""
    db = store_like_db(data_dir / "raw.sqlite3")
    series: dict[tuple[str, str], int] = {}
    rows = []
    for d in drafts:
        key = (d.fields.device_id, d.fields.metric)
        sid = series.setdefault(key, len(series) + 1)
        ts = d.device_ts or d.received_at
        rows.append((sid, to_ms(ts), d.event_id, float(d.value), d.seq, to_ms(d.received_at), None))  # type: ignore[arg-type]
    started, cpu = time.perf_counter(), time.thread_time()
    for i in range(0, len(rows), batch):
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?, ?)", rows[i:i + batch])
        db.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
    db.close()
    return elapsed, cpu


class _Recording:
    """A connection that notes every statement and its parameters (the store's SQL, for :func:`ceiling`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.statements: list[tuple[bool, str, Any]] = []  # (many, sql, parameters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        self.statements.append((False, sql, parameters))
        return self.db.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> sqlite3.Cursor:
        self.statements.append((True, sql, parameters))
        return self.db.executemany(sql, parameters)


def ceiling(drafts: list[Draft], batch: int, rounds: int) -> None:
    """What the ratio would be (a) if clean, define and analyze cost nothing: the store alone, on batches
    clean and define made beforehand; (b) if the store's Python cost nothing too: the statements the store
    executes for those batches (recorded once), replayed on a fresh file with the same pragmas. Each beside
    the raw inserts, in the same round; CPU time of the writing thread per reading."""
    async def made() -> list[Any]:
        clean = CleanStage(DEFAULT_METRIC_RULES)
        define = DefineStage(TopicTemplate(DEFAULT_TEMPLATE), publish_valid=False)
        out = []
        for i in range(0, len(drafts), batch):
            emit = Emitter()
            out.append(await define.process(await clean.process(drafts[i:i + batch], emit), emit))
        return out

    batches = asyncio.run(made())

    async def record(data_dir: Path) -> list[list[tuple[bool, str, Any]]]:
        async with SqliteStore(data_dir) as store:
            def each(db: sqlite3.Connection) -> list[list[tuple[bool, str, Any]]]:
                out = []
                for b in batches:
                    recording = _Recording(db)
                    store._write(recording, b)  # type: ignore[arg-type]
                    out.append(recording.statements)
                return out
            return await store._db.run(each)

    async def store_alone(data_dir: Path) -> tuple[float, float]:
        async with SqliteStore(data_dir) as store:
            stage = StoreStage(store)
            clock = time.pthread_getcpuclockid(await store._db.run(lambda _: threading.get_ident()))
            started, cpu = time.perf_counter(), time.clock_gettime(clock)
            for b in batches:
                await stage.process(b, Emitter())
            return time.perf_counter() - started, time.clock_gettime(clock) - cpu

    def sql_alone(data_dir: Path, statements: list[list[tuple[bool, str, Any]]]) -> tuple[float, float]:
        db = store_like_db(data_dir / "sql.sqlite3")
        started, cpu = time.perf_counter(), time.thread_time()
        for one_batch in statements:
            for many, sql, parameters in one_batch:
                (db.executemany if many else db.execute)(sql, parameters)
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
        db.close()
        return elapsed, cpu

    with tempfile.TemporaryDirectory(prefix="iotgw-bench-") as tmp:
        statements = asyncio.run(record(Path(tmp)))
    gc.collect()
    gc.freeze()
    runs: dict[str, list[tuple[float, float]]] = {"store alone": [], "store's SQL alone": [], "raw inserts": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="iotgw-bench-") as tmp:
            runs["store alone"].append(asyncio.run(store_alone(Path(tmp))))
            runs["store's SQL alone"].append(sql_alone(Path(tmp), statements))
            runs["raw inserts"].append(raw_inserts(drafts, batch, Path(tmp)))
    raw = runs["raw inserts"]
    print("ceiling (clean, define and analyze free; then the store's Python free too):")
    for name, figures in runs.items():
        wall, cpu = statistics.median(w for w, _ in figures), statistics.median(c for _, c in figures)
        line = f"  {name + ':':20s} {len(drafts) / wall:10,.0f} readings/s, CPU {cpu / len(drafts) * 1e6:.1f} us each"
        if figures is not raw:
            line += (f"; ratio {statistics.median(r for r, _ in raw) / wall:.2f} (by round "
                     + ", ".join(f"{r[0] / f[0]:.2f}" for f, r in zip(figures, raw, strict=True))
                     + f"), CPU ratio {statistics.median(c for _, c in raw) / cpu:.2f}")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--series", type=int, default=200)
    parser.add_argument("--no-analyze", dest="analyze", action="store_false",
                        help="clean -> define -> store only (default: analyze runs after store, as in the gateway)")
    parser.add_argument("--ceiling", action="store_true",
                        help="then the store alone and its SQL alone beside the raw inserts (the ratio's ceiling)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to CPU {cpu}")
    drafts = make_drafts(args.readings, args.series)
    # The input is made once, up front; in the gateway only a batch or two is alive at a time. Keep the
    # collector from rescanning the whole input on every pass (the gateway freezes its start-up heap too).
    gc.collect()
    gc.freeze()
    pipeline_s: list[float] = []
    raw_s: list[float] = []
    raw_cpu: list[float] = []
    per_stage: list[dict[str, float]] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="iotgw-bench-") as tmp:
            elapsed, written, spent = asyncio.run(through_stages(drafts, args.batch, Path(tmp), analyze=args.analyze))
            per_stage.append(spent)
            if written != len(drafts):
                sys.exit(f"pipeline stored {written} of {len(drafts)} readings")
            pipeline_s.append(elapsed)
            raw_elapsed, raw_thread_s = raw_inserts(drafts, args.batch, Path(tmp))
            raw_s.append(raw_elapsed)
            raw_cpu.append(raw_thread_s)
    pipe_rate = len(drafts) / statistics.median(pipeline_s)
    raw_rate = len(drafts) / statistics.median(raw_s)
    print(f"readings: {len(drafts):,} in batches of {args.batch}, {args.series} series, {args.rounds} rounds (medians)")
    chain = "clean -> define -> store" + (" -> analyze" if args.analyze else "")
    print(f"{chain + ':':36s} {pipe_rate:10,.0f} readings/s")
    print(f"{'raw SQLite inserts:':36s} {raw_rate:10,.0f} rows/s")
    print(f"ratio: {pipe_rate / raw_rate:.2f} (target >= 0.8); target >= 100,000 readings/s; by round: "
          + ", ".join(f"{r / p:.2f}" for p, r in zip(pipeline_s, raw_s, strict=True)))
    print("per reading, CPU time inside each stage (median round): " + ", ".join(
        f"{name} {statistics.median(r[name] for r in per_stage) / len(drafts) * 1e6:.1f} us" for name in per_stage[0]
    ) + f"; raw inserts {statistics.median(raw_cpu) / len(drafts) * 1e6:.1f} us a row")
    if args.ceiling:
        gc.unfreeze()
        ceiling(drafts, args.batch, args.rounds)


if __name__ == "__main__":
    main()
