"""The rows the store writes, against the same readings turned into rows one by one with the model's own
conversions (:func:`~pipeline.model.to_ms`): times with microseconds, readings without a device time,
quality flags, sequence numbers or none, a series in two runs, and a replay half old, half new."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.model import Quality, Reading, new_event_id, to_ms
from pipeline.store import SqliteStore, db_path

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


def readings(rnd: random.Random, count: int) -> list[Reading]:
    out = []
    for _ in range(count):
        received = T0 + timedelta(microseconds=rnd.randrange(10 * 3_600_000_000))
        device_ts = None if rnd.random() < 0.2 else received - timedelta(microseconds=rnd.randrange(5_000_000))
        quality = () if device_ts else (Quality.DEVICE_TIME_MISSING,)
        if rnd.random() < 0.1:
            quality = (*quality, Quality.CLOCK_CORRECTED)
        out.append(Reading(
            id=new_event_id(to_ms(received)), site="s", device_id=rnd.choice(["d1", "d2", "d3"]),
            device_class=rnd.choice(["env", "env2"]), transport=rnd.choice(["mqtt", "ble"]),
            metric=rnd.choice(["temperature", "humidity"]), value=rnd.uniform(-50, 50), unit="C",
            device_ts=device_ts, received_at=received, seq=rnd.choice([None, rnd.randrange(2**63)]), quality=quality,
        ))
    return out


def expected_row(r: Reading) -> tuple[Any, ...]:
    return (r.device_id, r.metric, to_ms(r.device_ts or r.received_at), r.id, r.value, r.seq, to_ms(r.received_at),
            ",".join(r.quality) or None)


async def test_stored_rows_are_the_readings_one_by_one(tmp_path: Path) -> None:
    rnd = random.Random(3)
    everything = readings(rnd, 1500)
    batches = []
    i = 0
    while i < 1000:
        size = rnd.choice([1, 7, 64, 65, 200, 300])  # a statement's worth of rows, and a part of one
        batches.append(everything[i:min(i + size, 1000)])
        i += size
    batches.append(rnd.sample(everything[:1000], 100) + everything[1000:])  # a replay, then new ones
    async with SqliteStore(tmp_path) as store:
        for batch in batches:
            await store.write(batch)
        assert (store.rows_written, store.duplicates) == (1500, 100)
    db = sqlite3.connect(db_path(tmp_path))
    got = db.execute("SELECT device_id, metric, ts, event_id, value, seq, received_at, quality "
                     "FROM readings JOIN series USING (series_id)").fetchall()
    assert sorted(got, key=str) == sorted(map(expected_row, everything), key=str)
    devices = db.execute("SELECT device_id, first_seen, last_seen FROM devices ORDER BY device_id").fetchall()
    first_batch = {d: next(b for b in batches if any(r.device_id == d for r in b)) for d in ("d1", "d2", "d3")}
    assert devices == [  # first seen: the earliest receive time of the first batch the device is in
        (d, min(to_ms(r.received_at) for r in first_batch[d] if r.device_id == d),
         max(to_ms(r.received_at) for r in everything if r.device_id == d)) for d in ("d1", "d2", "d3")
    ]
    db.close()
