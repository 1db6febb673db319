"""Series queries over the store, downsampled in SQL, rendered as table, CSV or JSON; times and durations."""

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


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An instant: RFC 3339 with an offset (``2026-11-28T06:40:00Z``), ``now``, or relative to now
    (``-1h``, ``-15m``: a duration as :func:`parse_duration` reads it, with a minus sign)."""
    now = datetime.now(UTC) if now is None else now
    text = text.strip()
    if text == "now":
        return now
    if text.startswith("-"):
        return now - parse_duration(text[1:])
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or not re.fullmatch(r"\d{4}-\d\d-\d\d[T ].+", text, re.ASCII) or value.tzinfo is None:
        raise ValueError(f"not a time: {text!r} (use RFC 3339 with an offset, e.g. 2026-11-28T06:40:00Z, "
                         "or relative, e.g. -1h, or now)")
    return value


def query_series(
    store: StoreReader, device_id: str, metric: str, *, since: timedelta | None = None,
    every: timedelta | None = None, agg: str = "mean", now_ms: int | None = None,
    from_ms: int | None = None, to_ms: int | None = None,
) -> list[Point]:
    """One series, raw or in ``every`` buckets. The range is ``from_ms`` (or ``since`` ago) to ``to_ms``,
    both inclusive and optional. Coarse buckets to now come from the store's rollups; the others are
    aggregated in SQL (:meth:`StoreReader.buckets`)."""
    if agg not in AGGREGATES:
        raise QueryError(f"unknown aggregate {agg!r}; one of {', '.join(AGGREGATES)}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if from_ms is None and since is not None:
        from_ms = now_ms - int(since.total_seconds() * 1000)
    width = rollup_width(every, agg)
    if width is not None and every is not None and to_ms is None:
        return _from_rollups(store, device_id, metric, width, since_ms=from_ms,
                             every_ms=int(every.total_seconds() * 1000), agg=agg)
    if every is None:
        found = store.series(device_id, metric, from_ms, to_ms)
    else:
        try:
            found = store.buckets(device_id, metric, max(1, int(every.total_seconds() * 1000)), agg,
                                  since_ms=from_ms, until_ms=to_ms)
        except ValueError as exc:
            raise QueryError(str(exc)) from None
    if found is None:
        raise QueryError(f"no series {device_id}/{metric} in the store (see: iotgw devices)")
    return [Point(ts, value) for ts, value in found[1]]


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


SIGNIFICANT_DIGITS = 12  # far beyond any sensor; short of the binary noise of a mean (21.449999999999996)


def shown(value: float) -> float:
    """``value`` rounded to :data:`SIGNIFICANT_DIGITS`, so its shortest repr is what a person expects."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def render_points(points: list[Point], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"ts": iso_ms(p.ts_ms), "value": shown(p.value)} for p in points], indent=1) + "\n"
    out = io.StringIO()
    if fmt == "csv":
        out.write("ts,value\n")
        for p in points:
            out.write(f"{iso_ms(p.ts_ms)},{shown(p.value)!r}\n")
        return out.getvalue()
    for p in points:
        out.write(f"{iso_ms(p.ts_ms):<26} {shown(p.value)!r}\n")
    return out.getvalue()
