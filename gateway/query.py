"""Series queries over the store, downsampled with pandas, rendered as table, CSV or JSON."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.errors import GatewayError
from pipeline.store import ROLLUPS, RollupWidth, StoreReader

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$", re.ASCII)
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
AGGREGATES = ("mean", "min", "max", "last", "count")


class QueryError(GatewayError):
    pass


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w``, ``250ms``."""
    match = _DURATION.fullmatch(text.strip())
    try:
        duration = timedelta(seconds=float(match[1]) * _UNIT_S[match[2]]) if match else timedelta(0)
    except OverflowError:
        duration = timedelta(0)
    if duration < timedelta(milliseconds=1):
        raise ValueError(f"not a duration of at least 1ms: {text!r} (use e.g. 90s, 15m, 2h, 7d)")
    return duration


parse_duration.__name__ = "duration"  # argparse names the type in its error message


@dataclass(frozen=True, slots=True)
class Point:
    ts_ms: int
    value: float


def query_series(
    store: StoreReader, device_id: str, metric: str, *, since: timedelta | None = None,
    every: timedelta | None = None, agg: str = "mean", now_ms: int | None = None,
) -> list[Point]:
    if agg not in AGGREGATES:
        raise QueryError(f"unknown aggregate {agg!r}; one of {', '.join(AGGREGATES)}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    since_ms = now_ms - int(since.total_seconds() * 1000) if since is not None else None
    width = rollup_width(every, agg)
    if width is not None and every is not None:
        return _from_rollups(store, device_id, metric, width, since_ms=since_ms,
                             every_ms=int(every.total_seconds() * 1000), agg=agg)
    found = store.series(device_id, metric, since_ms)
    if found is None:
        raise QueryError(f"no series {device_id}/{metric} in the store (see: iotgw devices)")
    rows = found[1]
    if every is None:
        return [Point(ts, value) for ts, value in rows]
    if not rows:
        return []
    import pandas as pd  # loaded only when a query downsamples: the running gateway never pays for it

    frame = pd.DataFrame(rows, columns=["ts", "value"])
    series = pd.Series(frame["value"].to_numpy(), index=pd.to_datetime(frame["ts"], unit="ms", utc=True))
    buckets = series.resample(every, origin="epoch", label="left").agg(agg)
    buckets = buckets[buckets > 0] if agg == "count" else buckets.dropna()
    stamps_ms = pd.DatetimeIndex(buckets.index).as_unit("ms").asi8
    return [Point(int(ts), float(v)) for ts, v in zip(stamps_ms, buckets.to_numpy(), strict=True)]


def rollup_width(every: timedelta | None, agg: str) -> RollupWidth | None:
    """The store's rollups answer coarse buckets (whole hours; whole minutes from 10 minutes up) for
    every aggregate but ``last``: far fewer rows, and older than the raw readings' retention."""
    if every is None or agg == "last":
        return None
    ms = every.total_seconds() * 1000
    if ms % 3_600_000 == 0:
        return "1h"
    if ms % 60_000 == 0 and ms >= 600_000:
        return "1m"
    return None


def _from_rollups(
    store: StoreReader, device_id: str, metric: str, width: RollupWidth, *, since_ms: int | None, every_ms: int,
    agg: str,
) -> list[Point]:
    """Buckets of ``every_ms`` (aligned to the epoch, labelled by their start) merged from rollups. With
    ``since``, the first bucket counts the whole minute or hour that ``since`` falls in."""
    step = ROLLUPS[width]
    found = store.rollups(device_id, metric, width, since_ms - since_ms % step if since_ms is not None else None)
    if found is None:
        raise QueryError(f"no series {device_id}/{metric} in the store (see: iotgw devices)")
    buckets: dict[int, list[float]] = {}
    for r in found[1]:
        start = r.bucket_ms - r.bucket_ms % every_ms
        b = buckets.get(start)
        if b is None:
            buckets[start] = [r.count, r.mean, r.min, r.max]
            continue
        total = b[0] + r.count
        b[1] = b[1] * (b[0] / total) + r.mean * (r.count / total)
        b[0], b[2], b[3] = total, min(b[2], r.min), max(b[3], r.max)
    column = {"count": 0, "mean": 1, "min": 2, "max": 3}[agg]
    return [Point(start, float(b[column])) for start, b in sorted(buckets.items())]


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_points(points: list[Point], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"ts": iso_ms(p.ts_ms), "value": p.value} for p in points], indent=1) + "\n"
    out = io.StringIO()
    if fmt == "csv":
        out.write("ts,value\n")
        for p in points:
            out.write(f"{iso_ms(p.ts_ms)},{p.value!r}\n")
        return out.getvalue()
    for p in points:
        out.write(f"{iso_ms(p.ts_ms):<26} {p.value!r}\n")
    return out.getvalue()
