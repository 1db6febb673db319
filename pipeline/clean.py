"""clean: drop what cannot be a trustworthy measurement, fix what can be fixed, count every reason.

Rules, in the order they run (each drop is counted by reason and sent to the ``rejected`` stage):

- ``non_numeric``: strings, booleans, null, NaN, infinities.
- unit normalisation, declared per device class (``[pipeline.clean.units.<class>] metric = "°C"``):
  the value is converted to the declared unit; a reading without a unit is taken to be in it.
  ``unknown_unit`` / ``unit_mismatch`` when it cannot be converted.
- ``out_of_range``: outside the metric's ``min``/``max`` (after normalisation).
- timestamp sanity: a device time more than ``max_clock_ahead_s`` ahead of the gateway's receive
  time, or more than ``max_clock_behind_s`` behind it, is corrected to the receive time (quality
  flag ``clock_corrected``) or rejected as ``clock_skew``, by ``clock_policy``.
- ``duplicate``: a device sequence number / packet id already seen for the series within
  ``duplicate_window_s`` (a device that reboots and counts from 0 again is not a duplicate later).
- ``spike``: a step faster than the metric's ``max_rate_per_s`` from the last accepted value. A
  single-reading spike is dropped; a change that persists for two readings is a new level and kept.
- ``stuck``: the same value for longer than the metric's ``stuck_after_s`` (dropped until it changes).
- ``deadband``: report on change: a value within the metric's ``deadband`` of the last kept one,
  unless ``deadband_max_interval_s`` has passed since then (a heartbeat still gets through).

Time-based rules use the reading's time (device time when present, else receive time). A reading
older than the series' newest (a device catching up out of order) skips spike, stuck and deadband.
State is per series, in memory: after a restart the rules start afresh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol

from pipeline.stage import Draft, Emitter, StageStats
from pipeline.units import UnitProblem, convert

CLOCK_CORRECTED = "clock_corrected"
_SEQS_KEPT = 64  # per series: enough for repeats and short reorderings, bounded
_NUMBERS = (int, float)
_ZERO = timedelta(0)


class MetricRule(Protocol):
    """What clean reads from a metric's rules (gateway/config/pipeline.py's ``MetricRules``)."""

    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...
    @property
    def max_rate_per_s(self) -> float | None: ...
    @property
    def stuck_after_s(self) -> float | None: ...
    @property
    def deadband(self) -> float | None: ...
    @property
    def deadband_max_interval_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ClockPolicy:
    max_ahead_s: float = 60.0
    max_behind_s: float = 86_400.0
    policy: Literal["correct", "reject"] = "correct"


@dataclass(frozen=True, slots=True)
class _Rule:
    """A metric's rules in the form the hot loop wants (milliseconds, no attribute lookups on config)."""

    low: float = -math.inf
    high: float = math.inf
    max_rate_per_ms: float | None = None
    stuck_after_ms: int | None = None
    deadband: float | None = None
    deadband_interval_ms: int = 0
    temporal: bool = field(init=False)  # any of spike, stuck, deadband: worked out once, read per reading

    def __post_init__(self) -> None:
        object.__setattr__(self, "temporal", self.max_rate_per_ms is not None or self.stuck_after_ms is not None
                           or self.deadband is not None)


def _rule(rule: MetricRule) -> _Rule:
    return _Rule(
        low=-math.inf if rule.min is None else rule.min,
        high=math.inf if rule.max is None else rule.max,
        max_rate_per_ms=None if rule.max_rate_per_s is None else rule.max_rate_per_s / 1000,
        stuck_after_ms=None if rule.stuck_after_s is None else int(rule.stuck_after_s * 1000),
        deadband=rule.deadband,
        deadband_interval_ms=int(rule.deadband_max_interval_s * 1000),
    )


_NO_RULE = _Rule()


@dataclass(slots=True)
class _Series:
    """What the temporal rules remember about one (device, metric)."""

    last_ms: int = -(2**62)  # newest reading time seen (accepted or not)
    accepted: float | None = None  # last accepted value, and its time
    accepted_ms: int = 0
    previous: float | None = None  # the reading just before, accepted or not (spike vs new level)
    previous_ms: int = 0
    same_since_ms: int = 0  # when the current run of identical values began
    kept: float | None = None  # last value kept past the deadband, and its time
    kept_ms: int = 0
    seqs: dict[int, datetime] = field(default_factory=dict)  # seq -> receive time, insertion ordered


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


class CleanStage:
    name = "clean"

    def __init__(
        self,
        rules: Mapping[str, MetricRule],
        *,
        units: Mapping[str, Mapping[str, str]] | None = None,
        clock: ClockPolicy | None = None,
        duplicate_window_s: float = 600.0,
    ) -> None:
        """``rules`` by metric name; ``units`` by device class, then metric -> target unit."""
        self._series: dict[tuple[str, str], _Series] = {}
        self.stats = StageStats()
        self.corrected: dict[str, int] = {}  # fixed rather than dropped: unit_converted, clock_corrected
        self.configure(rules, units=units, clock=clock, duplicate_window_s=duplicate_window_s)

    def configure(
        self,
        rules: Mapping[str, MetricRule],
        *,
        units: Mapping[str, Mapping[str, str]] | None = None,
        clock: ClockPolicy | None = None,
        duplicate_window_s: float = 600.0,
    ) -> None:
        """New rules (a reload): what the series remember (last values, sequence numbers) is kept."""
        self._rules = {metric: _rule(rule) for metric, rule in rules.items()}
        self._units = {cls: dict(metrics) for cls, metrics in (units or {}).items()}
        self._clock = clock or ClockPolicy()
        self._ahead = timedelta(seconds=self._clock.max_ahead_s)
        self._behind = -timedelta(seconds=self._clock.max_behind_s)  # skews below this are too far behind
        self._dup = timedelta(seconds=duplicate_window_s)

    async def process(self, batch: Sequence[Draft], emit: Emitter) -> list[Draft]:
        out: list[Draft] = []
        rejected = self.stats.rejected
        for draft in batch:
            result = self._one(draft)
            if isinstance(result, tuple):
                reason, detail = result
                rejected[reason] += 1
                emit.reject(self.name, reason, detail, draft.topic, draft.payload)
            else:
                out.append(result)
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out

    def _count(self, what: str) -> None:
        self.corrected[what] = self.corrected.get(what, 0) + 1

    def _one(self, draft: Draft) -> Draft | tuple[str, str]:  # noqa: PLR0912 (one rule per branch)
        value = draft.value
        if type(value) is not float and (isinstance(value, bool) or not isinstance(value, _NUMBERS)):
            return "non_numeric", f"value {value!r} is not a number"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            return "non_numeric", f"value {str(value)[:40]} is not a finite float"
        value = float(value)
        fields = draft.fields
        metric = fields.metric
        changes: dict[str, object] = {}

        target = self._units.get(fields.device_class, {}).get(metric) if self._units else None
        if target is not None and draft.unit != target:
            if draft.unit is not None:
                converted = convert(value, draft.unit, target)
                if isinstance(converted, UnitProblem):
                    return converted.reason, converted.detail
                value = converted
                self._count("unit_converted")
            changes["unit"] = target

        rule = self._rules.get(metric, _NO_RULE)
        if not rule.low <= value <= rule.high:
            return "out_of_range", f"{value:g} outside [{rule.low:g}, {rule.high:g}] for {metric}"

        received = draft.received_at
        device_ts = draft.device_ts
        if device_ts is not None:
            skew = device_ts - received
            if skew > self._ahead or skew < self._behind:
                where = "ahead of" if skew > _ZERO else "behind"
                off = abs(skew).total_seconds()
                detail = f"device time {device_ts.isoformat()} is {off:.0f} s {where} the gateway's"
                if self._clock.policy == "reject":
                    return "clock_skew", detail
                changes["device_ts"] = device_ts = None
                changes["quality"] = (*draft.quality, CLOCK_CORRECTED)
                self._count(CLOCK_CORRECTED)

        if draft.seq is not None or rule.temporal:
            key = (fields.device_id, metric)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series()
            if draft.seq is not None and (verdict := self._sequence(series, draft.seq, received)) is not None:
                return verdict
            if rule.temporal:
                ts_ms = _ms(device_ts or received)
                if ts_ms >= series.last_ms:
                    verdict = self._temporal(rule, series, value, ts_ms, metric)
                    if verdict is not None:
                        return verdict

        if changes or value is not draft.value:
            return dataclasses.replace(draft, value=value, **changes)  # type: ignore[arg-type]
        return draft

    def _sequence(self, series: _Series, seq: int, received: datetime) -> tuple[str, str] | None:
        seqs = series.seqs
        seen = seqs.get(seq)
        if seen is not None and received - seen <= self._dup:
            return "duplicate", f"sequence {seq} already seen {(received - seen).total_seconds():.1f} s ago"
        seqs[seq] = received
        if len(seqs) > _SEQS_KEPT:
            del seqs[next(iter(seqs))]
        return None

    @staticmethod
    def _temporal(rule: _Rule, s: _Series, value: float, ts_ms: int, metric: str) -> tuple[str, str] | None:
        """Spike, stuck and deadband for a reading in time order; updates the series either way."""
        previous, previous_ms = s.previous, s.previous_ms
        s.last_ms, s.previous, s.previous_ms = ts_ms, value, ts_ms
        if value != previous:
            s.same_since_ms = ts_ms
        if rule.max_rate_per_ms is not None and s.accepted is not None:
            limit = rule.max_rate_per_ms
            if abs(value - s.accepted) > limit * max(ts_ms - s.accepted_ms, 1) and (
                previous is None or abs(value - previous) > limit * max(ts_ms - previous_ms, 1)
            ):
                return "spike", (
                    f"{metric} stepped from {s.accepted:g} to {value:g} in {(ts_ms - s.accepted_ms) / 1000:g} s "
                    f"(limit {limit * 1000:g}/s)"
                )
        s.accepted, s.accepted_ms = value, ts_ms
        if rule.stuck_after_ms is not None and ts_ms - s.same_since_ms > rule.stuck_after_ms:
            return "stuck", f"{metric} has read {value:g} for {(ts_ms - s.same_since_ms) / 1000:.0f} s"
        if rule.deadband is not None:
            if (
                s.kept is not None and abs(value - s.kept) < rule.deadband
                and ts_ms - s.kept_ms < rule.deadband_interval_ms
            ):
                return "deadband", f"{metric} {value:g} within {rule.deadband:g} of {s.kept:g}"
            s.kept, s.kept_ms = value, ts_ms
        return None
