"""Alert rules: threshold (hysteresis, minimum duration), rate of change, z-score anomaly.

Pure logic, no I/O: the analyze stage feeds each rule's per-series state one reading at a time
(``update(t_s, value)``) and gets back a raise, a clear or nothing. Time is the reading's time
(device time when present, else receive time), so rules behave the same when a backlog is replayed.

- **threshold**: raises when the value stays above ``high`` (or below ``low``) for ``for_s`` seconds
  without interruption (a reading back inside resets the timer); clears once the value is below
  ``clear_below`` (default ``high``) and above ``clear_above`` (default ``low``). Set ``clear_below``
  under ``high`` for hysteresis: values between the two neither raise again nor clear.
- **rate**: the change per second (``per = "s"``) or per minute (``per = "min"``) between the
  oldest reading in the last ``window_s`` and the newest; raises when its magnitude exceeds
  ``max_rate``, clears once it is at most ``clear_rate`` (default ``max_rate``). Readings older
  than the newest one seen are ignored (no rate from time running backwards).
- **zscore**: ``z = (value - mean) / stddev`` over the previous ``window`` readings (population
  stddev); evaluated once the window is full; raises when ``|z| > k``, clears when ``|z| <= clear_k``
  (default ``k``). A flat window (stddev 0) makes any different value an infinite z.

Alert state lives in memory. After a restart the gateway seeds each rule's state with the alerts the
store still lists as active (:meth:`RuleSet.seed`), so the first reading that no longer meets the
condition clears them and one that still does keeps them without raising twice; pending durations
(``for_s``) and rate and z-score windows start again from new readings. Alerts of rules no longer
configured are closed in the store at start (they could never clear), without an event.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pipeline.model import ALERT_CLEARED_TYPE, ALERT_TYPE, cloudevent, new_event_id

if TYPE_CHECKING:
    from pipeline.stage import Emitter

log = logging.getLogger(__name__)

ALERT_VERSION = "1.0"
Kind = Literal["threshold", "rate", "zscore", "inactivity"]  # inactivity: pipeline/liveness.py


@dataclass(frozen=True, slots=True)
class Selector:
    """Which series a rule watches: shell-style wildcards (``*``, ``?``, ``[ab]``) on each part."""

    device_id: str = "*"
    device_class: str = "*"
    metric: str = "*"

    def matches(self, device_id: str, device_class: str, metric: str) -> bool:
        return (
            fnmatchcase(metric, self.metric)
            and fnmatchcase(device_id, self.device_id)
            and fnmatchcase(device_class, self.device_class)
        )


class RuleState(Protocol):
    active: bool

    def update(self, t: float, value: float) -> str | None:
        """A message when this reading raises (inactive -> active) or clears (active -> inactive)."""
        ...


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    name: str
    select: Selector
    high: float | None = None
    low: float | None = None
    clear_below: float | None = None
    clear_above: float | None = None
    for_s: float = 0.0
    severity: str = "warning"
    kind: ClassVar[Kind] = "threshold"

    def new_state(self) -> ThresholdState:
        return ThresholdState(self)


@dataclass(slots=True)
class ThresholdState:
    rule: ThresholdRule
    active: bool = False
    side: str | None = None  # "high" or "low" while over a limit
    since: float = 0.0  # reading time the current excursion began

    def update(self, t: float, value: float) -> str | None:
        r = self.rule
        if self.active:
            below = r.high is None or value < (r.high if r.clear_below is None else r.clear_below)
            above = r.low is None or value > (r.low if r.clear_above is None else r.clear_above)
            if below and above:
                self.active, self.side = False, None
                return f"{value:g} back within limits"
            return None
        side = (
            "high" if r.high is not None and value > r.high
            else "low" if r.low is not None and value < r.low
            else None
        )
        if side != self.side:
            self.side, self.since = side, t
        if side is None or t - self.since < r.for_s:
            return None
        self.active = True
        limit = r.high if side == "high" else r.low
        held = f" for {t - self.since:g} s" if r.for_s > 0 else ""
        return f"{value:g} {'>' if side == 'high' else '<'} {limit:g}{held}"


@dataclass(frozen=True, slots=True)
class RateRule:
    name: str
    select: Selector
    max_rate: float
    per: Literal["s", "min"] = "min"
    window_s: float = 60.0
    clear_rate: float | None = None
    severity: str = "warning"
    kind: ClassVar[Kind] = "rate"

    def new_state(self) -> RateState:
        return RateState(self)


@dataclass(slots=True)
class RateState:
    rule: RateRule
    active: bool = False
    points: deque[tuple[float, float]] = field(default_factory=deque)

    def update(self, t: float, value: float) -> str | None:
        points = self.points
        if points and t <= points[-1][0]:
            return None  # out of order, or the same instant twice
        points.append((t, value))
        r = self.rule
        while t - points[0][0] > r.window_s:
            points.popleft()
        if len(points) < 2:
            return None
        t0, v0 = points[0]
        rate = (value - v0) / (t - t0) * (60.0 if r.per == "min" else 1.0)
        if not self.active and abs(rate) > r.max_rate:
            self.active = True
            return f"rate {rate:+g}/{r.per} exceeds {r.max_rate:g}/{r.per}"
        if self.active and abs(rate) <= (r.max_rate if r.clear_rate is None else r.clear_rate):
            self.active = False
            return f"rate {rate:+g}/{r.per} back within limits"
        return None


@dataclass(frozen=True, slots=True)
class ZScoreRule:
    name: str
    select: Selector
    k: float = 3.0
    window: int = 30
    clear_k: float | None = None
    severity: str = "warning"
    kind: ClassVar[Kind] = "zscore"

    def new_state(self) -> ZScoreState:
        return ZScoreState(self)


@dataclass(slots=True)
class ZScoreState:
    """Sliding mean and variance (Welford's update, applied forwards and backwards): O(1) a reading."""

    rule: ZScoreRule
    active: bool = False
    values: deque[float] = field(default_factory=deque)
    mean: float = 0.0
    m2: float = 0.0

    def z(self, value: float) -> float:
        std = math.sqrt(max(self.m2, 0.0) / len(self.values))
        if std <= 1e-12 * max(1.0, abs(self.mean)):
            return 0.0 if value == self.mean else math.copysign(math.inf, value - self.mean)
        return (value - self.mean) / std

    def update(self, t: float, value: float) -> str | None:
        r = self.rule
        values = self.values
        n = len(values)
        message = None
        if n >= r.window:
            z = self.z(value)
            if not self.active and abs(z) > r.k:
                self.active = True
                message = f"z-score {z:+.2f} beyond ±{r.k:g} (mean {self.mean:g} of {r.window})"
            elif self.active and abs(z) <= (r.k if r.clear_k is None else r.clear_k):
                self.active = False
                message = f"z-score {z:+.2f} back within ±{r.k:g}"
        # Welford's update, forwards for the new value and backwards for the one leaving (inlined: hot path)
        values.append(value)
        n += 1
        delta = value - self.mean
        mean = self.mean + delta / n
        m2 = self.m2 + delta * (value - mean)
        if n > r.window:
            old = values.popleft()
            n -= 1
            delta = old - mean
            mean -= delta / n
            m2 -= delta * (old - mean)
        self.mean, self.m2 = mean, m2
        return message


Rule = ThresholdRule | RateRule | ZScoreRule


@dataclass(frozen=True, slots=True)
class AlertChange:
    """An alert raised or cleared on one series, ready to publish and to record."""

    raised: bool
    rule: str
    kind: Kind
    severity: str
    site: str
    device_class: str
    device_id: str
    metric: str
    value: float
    message: str
    raised_at: datetime
    at: datetime  # when this change happened (the reading's time)
    event_id: str = field(default_factory=new_event_id)

    @property
    def topic(self) -> str:
        what = "raised" if self.raised else "cleared"
        return f"alert/{what}/{ALERT_VERSION}/{self.site}/{self.device_class}/{self.device_id}/{self.metric}"

    def data(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "kind": self.kind, "device_id": self.device_id, "metric": self.metric,
            "severity": self.severity, "value": self.value, "message": self.message,
            "raised_at": rfc3339(self.raised_at),
        }

    def to_cloudevent(self) -> dict[str, Any]:
        topic = self.topic
        return cloudevent(
            event_id=self.event_id, source=f"/iotgw/{self.site}/{self.device_id}",
            type_=ALERT_TYPE if self.raised else ALERT_CLEARED_TYPE, subject=topic, time=self.at, data=self.data(),
        )


async def announce(changes: list[AlertChange], emit: Emitter, counts: dict[str, int],
                   record: Callable[[list[AlertChange]], Awaitable[None]] | None) -> None:
    """Publish alert changes, count them in ``counts`` (``raised``, ``cleared``) and hand them to ``record``
    (the store's list of alerts); a failure to record is counted (``record_failures``) and logged."""
    for change in changes:
        what = "raised" if change.raised else "cleared"
        emit.publish(change.topic, change.to_cloudevent())
        counts[what] += 1
        log.warning("alert %s: %s", what, change.message)
    if record is not None and changes:
        try:
            await record(changes)
        except Exception:  # the events are out; the list of alerts is what misses them
            counts["record_failures"] += 1
            log.exception("could not record %d alert change(s) in the store", len(changes))


def rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Watch:
    rule: Rule
    state: RuleState
    raised_at: datetime | None = None


class RuleSet:
    """Every rule over every series. The rules that watch a series are found once, when it is first
    seen, and cached: a series no rule selects costs one dictionary lookup a reading."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        names = [r.name for r in rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        self.rules = tuple(rules)
        self._watches: dict[tuple[str, str, str], tuple[Watch, ...]] = {}
        self._seeded: dict[tuple[str, str, str], datetime] = {}  # (rule, device_id, metric) -> raised_at

    def seed(self, active: Iterable[tuple[str, str, str, datetime]]) -> None:
        """Alerts still active from the previous run: ``(rule, device_id, metric, raised_at)``."""
        for rule, device_id, metric, raised_at in active:
            self._seeded[(rule, device_id, metric)] = raised_at

    def watches(self, device_id: str, device_class: str, metric: str) -> tuple[Watch, ...]:
        key = (device_id, device_class, metric)
        found = self._watches.get(key)
        if found is None:
            found = tuple(
                self._watch(rule, device_id, metric) for rule in self.rules
                if rule.select.matches(device_id, device_class, metric)
            )
            self._watches[key] = found
        return found

    def _watch(self, rule: Rule, device_id: str, metric: str) -> Watch:
        watch = Watch(rule, rule.new_state())
        raised_at = self._seeded.pop((rule.name, device_id, metric), None)
        if raised_at is not None:
            watch.state.active, watch.raised_at = True, raised_at
        return watch

    def evaluate(  # noqa: PLR0917  (the hot path: no keyword packing)
        self, watches: tuple[Watch, ...], site: str, device_class: str, device_id: str, metric: str,
        at: datetime, t: float, value: float, out: list[AlertChange],
    ) -> None:
        for watch in watches:
            message = watch.state.update(t, value)
            if message is None:
                continue
            rule = watch.rule
            raised = watch.state.active
            if raised:
                watch.raised_at = at
            out.append(AlertChange(
                raised, rule.name, rule.kind, rule.severity, site, device_class, device_id, metric, value,
                f"{rule.name}: {device_id}/{metric} {message}", watch.raised_at or at, at,
            ))
