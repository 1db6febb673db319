"""What windows, rules and rollups cost per reading, each beside a baseline in the same run.

    .venv/bin/python bench/analyze.py [--readings 200000] [--series 100] [--rounds 3]

- analyze stage (1m and 1h windows): without rules, with 20 rules none of which selects the
  series, and with 3 rules on every series; beside a loop that only reads each reading's time and
  value (the least any per-reading stage does);
- store writes with 1m/1h rollups merged in the same transaction, beside a raw ``executemany`` of the
  same rows into a table of the same shape (the store's cost without rollups, series or devices).

The analyze stage and the store take each batch as the define stage hands it on (a
:class:`~pipeline.readings.ReadingBatch`, columns per topic), made afresh for every round before the
clock starts. Figures are medians of ``--rounds``; the ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.analyze import AnalyzeStage
from pipeline.model import Reading, new_event_id, to_ms
from pipeline.readings import ReadingBatch
from pipeline.rules import RateRule, RuleSet, Selector, ThresholdRule, ZScoreRule
from pipeline.stage import Emitter
from pipeline.store import SqliteStore
from pipeline.topics import TopicTemplate

T0_MS = 1_714_564_800_000
BATCH = 500


def make_readings(count: int, series: int) -> list[Reading]:
    out = []
    for i in range(count):
        ts_ms = T0_MS + i * 10  # 100 readings a second across all series: many 1m windows close
        ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
        out.append(Reading(
            id=new_event_id(ts_ms), site="bench", device_id=f"d{i % series}", device_class="env", transport="mqtt",
            metric="temperature", value=20.0 + (i // series % 600) / 100,  # a slow ramp
            unit="C", device_ts=ts, received_at=ts,
        ))
    return out


def median_rate(count: int, rounds: int, run: Callable[[], Coroutine[Any, Any, None]],
                prepare: Callable[[], None] = lambda: None) -> float:
    """``prepare()`` runs before each round, off the clock."""
    times = []
    for _ in range(rounds):
        prepare()
        start = time.perf_counter()
        asyncio.run(run())
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def main() -> None:  # noqa: PLR0915 (a script: the cases in order, as printed)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # alert changes are logged: not what is measured
    readings = make_readings(args.readings, args.series)
    batches = [readings[i:i + BATCH] for i in range(0, len(readings), BATCH)]
    template = TopicTemplate()
    handed: list[ReadingBatch] = []  # the batches as define hands them on, afresh each round

    def hand_over() -> None:
        handed[:] = [ReadingBatch.of(batch) for batch in batches]

    async def baseline() -> None:
        total = 0.0
        for batch in batches:
            for r in batch:
                ts = r.device_ts or r.received_at
                total += ts.timestamp() + r.value

    def analyze_with(rules: RuleSet) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            stage = AnalyzeStage(template, "1.0", windows_s=[60, 3600], rules=rules, clock=lambda: 0.0)
            for batch in handed:
                await stage.process(batch, Emitter())
        return run

    unmatched = RuleSet([ThresholdRule(f"r{i}", Selector(metric=f"m{i}"), high=1.0) for i in range(20)])
    matched = RuleSet([
        ThresholdRule("hot", Selector(metric="temperature"), high=100.0, clear_below=90.0, for_s=60),
        RateRule("climb", Selector(metric="temp*"), max_rate=50.0),
        ZScoreRule("odd", Selector(), k=6.0, window=30),
    ])
    n = len(readings)
    base = median_rate(n, args.rounds, baseline)
    print(f"analyze, {n} readings over {args.series} series, batches of {BATCH} (median of {args.rounds}):")
    print(f"  baseline loop (time and value only)  {base:12,.0f} readings/s")
    for label, rules in (("windows, no rules", RuleSet(())), ("windows, 20 rules, none selects", unmatched),
                         ("windows, 3 rules on every series", matched)):
        rate = median_rate(n, args.rounds, analyze_with(rules), hand_over)
        print(f"  {label:<36} {rate:12,.0f} readings/s  ({rate / base:.2f} of baseline)")

    with tempfile.TemporaryDirectory() as tmp:
        rounds = [0]

        async def store_run() -> None:
            rounds[0] += 1
            async with SqliteStore(Path(tmp) / f"store{rounds[0]}") as store:
                for batch in handed:
                    await store.write(batch)

        async def raw_run() -> None:
            rounds[0] += 1
            path = Path(tmp) / f"raw{rounds[0]}.sqlite3"
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE readings (series_id INTEGER NOT NULL, ts INTEGER NOT NULL, event_id TEXT NOT NULL,"
                       " value REAL NOT NULL, seq INTEGER, received_at INTEGER NOT NULL, quality TEXT,"
                       " PRIMARY KEY (series_id, ts, event_id)) WITHOUT ROWID")
            for batch in batches:
                rows = [(int(r.device_id[1:]), to_ms(r.ts), r.id, r.value, r.seq, to_ms(r.received_at), None)
                        for r in batch]
                db.execute("BEGIN")
                db.executemany("INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                db.execute("COMMIT")
            db.close()

        raw = median_rate(n, args.rounds, raw_run)
        stored = median_rate(n, args.rounds, store_run, hand_over)
        print(f"store, same readings, one transaction per batch of {BATCH}, synchronous=FULL:")
        print(f"  raw executemany (no rollups)         {raw:12,.0f} rows/s")
        print(f"  SqliteStore.write with 1m/1h rollups {stored:12,.0f} rows/s  ({stored / raw:.2f} of raw)")


if __name__ == "__main__":
    main()
