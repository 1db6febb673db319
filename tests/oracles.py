"""Reference results computed independently of the code under test (pandas), shared by tests."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

Aggregate = tuple[int, float, float, float]  # count, mean, min, max


def resample(rows: Iterable[tuple[str, int, float]], rule: str) -> dict[tuple[str, int], Aggregate]:
    """``(series, ts_ms, value)`` rows -> ``{(series, bucket start ms): (count, mean, min, max)}`` for
    every non-empty epoch-aligned bucket of ``rule`` (a pandas frequency such as ``"1min"``)."""
    frame = pd.DataFrame(list(rows), columns=["series", "ts", "value"])
    frame["ts"] = pd.to_datetime(frame["ts"], unit="ms", utc=True)
    out = {}
    for series, group in frame.groupby("series"):
        buckets = group.set_index("ts")["value"].resample(rule, origin="epoch").agg(["count", "mean", "min", "max"])
        nonempty = buckets[buckets["count"] > 0]
        starts = pd.DatetimeIndex(nonempty.index).as_unit("ms").asi8
        for start, count, mean, low, high in zip(starts, nonempty["count"], nonempty["mean"], nonempty["min"],
                                                 nonempty["max"], strict=True):
            out[(str(series), int(start))] = (int(count), float(mean), float(low), float(high))
    return out
