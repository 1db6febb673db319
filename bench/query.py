"""A series query over 1,000,000 stored points, downsampled to about 500 buckets, as the HTTP API runs it.

Writes one series of 1,000,000 readings (one a second: 11.6 days) into a fresh store with the store's
own schema, then times, in the same run (median of several rounds):

- the API's query: ``gateway.query.query_series(..., every=...)`` -> ``StoreReader.buckets`` (SQL), as the
  API's ``/api/v1/series?bucket=...`` runs it (without the HTTP and JSON around it);
- baseline 1: a plain ``SELECT ts, value`` of the same range (what any downsampling must at least read);
- baseline 2: that fetch plus pandas ``resample().mean()`` (how ``iotgw query --every`` used to do it);
- for reference: a naive ``GROUP BY ts / bucket`` in SQL (sorts every row in a temporary B-tree).

Usage: ``.venv/bin/python bench/query.py [--points 1000000] [--buckets 500] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pandas as pd

from gateway.query import query_series
from pipeline.store import SqliteStore, StoreReader, db_path

T0_MS = 1_764_000_000_000


async def _create(data_dir: Path) -> None:
    async with SqliteStore(data_dir):  # the store's own schema
        pass


def fill(data_dir: Path, points: int) -> None:
    asyncio.run(_create(data_dir))
    db = sqlite3.connect(db_path(data_dir), isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("INSERT INTO series (series_id, device_id, metric, unit) VALUES (1, 'bench-1', 'temperature', '°C')")
    db.execute("INSERT INTO devices VALUES ('bench-1', 'mqtt', 'generic', 'bench', ?, ?)",
               (T0_MS, T0_MS + points * 1000))
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO readings VALUES (1, ?, ?, ?, NULL, ?, NULL)",
        ((T0_MS + i * 1000, f"{i:026d}", 20 + (i % 600) / 60, T0_MS + i * 1000) for i in range(points)),
    )
    db.execute("COMMIT")
    # one 65 MB transaction sits in the WAL until a checkpoint; the running store checkpoints every 1000 pages
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def timed(fn: Callable[[], object], rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iotgw-bench-query-") as tmp:
        data_dir = Path(tmp)
        start = time.perf_counter()
        fill(data_dir, args.points)
        print(f"stored {args.points:,} points in one series in {time.perf_counter() - start:.1f} s")
        span_ms = args.points * 1000
        every = timedelta(milliseconds=-(-span_ms // args.buckets))
        lo, hi = T0_MS, T0_MS + span_ms
        with StoreReader(data_dir) as store:
            db = store._db  # the baselines read the same connection

            def api() -> object:
                return query_series(store, "bench-1", "temperature", every=every, agg="mean", from_ms=lo, to_ms=hi)

            def plain() -> object:
                return db.execute("SELECT ts, value FROM readings WHERE series_id = 1 AND ts >= ? AND ts <= ? "
                                  "ORDER BY ts", (lo, hi)).fetchall()

            def pandas_resample() -> object:
                rows = plain()
                assert isinstance(rows, list)
                frame = pd.DataFrame(rows, columns=["ts", "value"])
                series = pd.Series(frame["value"].to_numpy(), index=pd.to_datetime(frame["ts"], unit="ms", utc=True))
                return series.resample(every, origin="epoch").mean().dropna()

            def group_by() -> object:
                return db.execute("SELECT ts / ?1 AS b, avg(value) FROM readings WHERE series_id = 1 AND ts >= ?2 "
                                  "AND ts <= ?3 GROUP BY b ORDER BY b", (every // timedelta(milliseconds=1), lo, hi)
                                  ).fetchall()

            t_api, result = timed(api, args.rounds)
            t_plain, _ = timed(plain, args.rounds)
            t_pandas, resampled = timed(pandas_resample, args.rounds)
            t_group, _ = timed(group_by, args.rounds)
        assert isinstance(result, list)
        assert isinstance(resampled, pd.Series)
        assert len(result) == len(resampled), (len(result), len(resampled))
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"buckets: {len(result)} of {every.total_seconds():.0f} s (agg mean), median of {args.rounds} rounds")
        print(f"  API query (SQL, bucket by bucket over the key)   {t_api * 1000:8.1f} ms")
        print(f"  baseline: plain SELECT ts, value of the range     {t_plain * 1000:8.1f} ms"
              f"   ratio API/baseline {t_api / t_plain:.2f}")
        print(f"  baseline: fetch + pandas resample().mean()        {t_pandas * 1000:8.1f} ms"
              f"   ratio API/baseline {t_api / t_pandas:.2f}")
        print(f"  reference: SQL GROUP BY ts / bucket              {t_group * 1000:8.1f} ms"
              f"   ratio API/reference {t_api / t_group:.2f}")


if __name__ == "__main__":
    main()
