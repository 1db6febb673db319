"""Series queries over the store, downsampled in SQL, rendered as table, CSV or JSON; times and durations."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.errors import GatewayError
from pipeline.store import StoreReader

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
    """One series, raw or in ``every`` buckets (aggregated in SQL: :meth:`StoreReader.buckets`).
    The range is ``from_ms`` (or ``since`` ago) to ``to_ms``, both inclusive and optional."""
    if agg not in AGGREGATES:
        raise QueryError(f"unknown aggregate {agg!r}; one of {', '.join(AGGREGATES)}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if from_ms is None and since is not None:
        from_ms = now_ms - int(since.total_seconds() * 1000)
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
