"""Device inactivity: no reading from a device for ``after_s`` seconds raises an alert, its next reading
clears it (``[[rules]] kind = "inactivity"``).

A stage at the end of the pipeline notes when each watched device was last heard from (the reading's
receive time, on the gateway's clock: a device's own clock plays no part) and clears an active alert
when a reading arrives; :meth:`InactivityStage.tick`, called every second or so, raises the alerts of the
devices that have been silent too long. Alerts are published like the alert rules' (pipeline/rules.py):
``alert/raised/1.0/{site}/{device_class}/{device_id}/inactive`` (or the rule's metric, when it watches
one) and ``alert/cleared/...``, and handed to ``on_alerts`` (the store records them).

Which devices: those a reading arrives from, the configured ones (:meth:`watch`, counted from the start)
and those the store knew (:meth:`watch` with their last reading, so a device that went silent while the
gateway was stopped is noticed). Alerts still active in the store at start are taken over (:meth:`seed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from pipeline.model import Reading
from pipeline.readings import ReadingBatch
from pipeline.rules import AlertChange, Kind, Selector, announce
from pipeline.stage import Emitter, StageStats

log = logging.getLogger(__name__)
INACTIVE_METRIC = "inactive"
_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class InactivityRule:
    name: str
    select: Selector
    after_s: float
    severity: str = "warning"
    kind: ClassVar[Kind] = "inactivity"

    @property
    def metric(self) -> str:
        """The alert topic's metric level: the one metric the rule watches, else ``inactive``."""
        metric = self.select.metric
        return INACTIVE_METRIC if _WILDCARDS & set(metric) else metric


@dataclass(slots=True)
class _Watched:
    site: str
    device_class: str
    last_s: float  # gateway time of the last reading
    raised_at: datetime | None = None  # while the alert is active


class InactivityStage:
    name = "liveness"

    def __init__(self, rules: Sequence[InactivityRule], *, site: str,
                 on_alerts: Callable[[list[AlertChange]], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.rules = tuple(rules)
        self._site = site
        self._on_alerts = on_alerts
        self._clock = clock
        self._watched: dict[tuple[str, str], _Watched] = {}  # (rule, device id) -> state
        self._selected: dict[tuple[str, str, str], tuple[InactivityRule, ...]] = {}
        self._seeded: dict[tuple[str, str], datetime] = {}
        self.stats = StageStats()
        self.alerts = {"raised": 0, "cleared": 0, "record_failures": 0}

    def set_rules(self, rules: Sequence[InactivityRule]) -> None:
        """A reload: devices stay watched by the rules that are still there."""
        names = {r.name for r in rules}
        self.rules = tuple(rules)
        self._selected.clear()
        self._watched = {k: v for k, v in self._watched.items() if k[0] in names}

    def seed(self, active: Iterable[tuple[str, str, str, datetime]]) -> None:
        """Alerts still active in the store from the last run: ``(rule, device_id, metric, raised_at)``."""
        names = {r.name for r in self.rules}
        for rule, device_id, _metric, raised_at in active:
            if rule in names:
                self._seeded[(rule, device_id)] = raised_at
                if (state := self._watched.get((rule, device_id))) is not None:
                    state.raised_at = raised_at

    def watch(self, device_id: str, device_class: str, *, last_s: float | None = None, site: str | None = None) -> None:
        """Watch a device not heard from yet in this run: configured (``last_s`` None: from now) or known
        to the store (its last reading). Rules that watch one metric wait for a reading of it."""
        for rule in self.rules:
            if rule.select.metric != "*" or not rule.select.matches(device_id, device_class, "*"):
                continue
            key = (rule.name, device_id)
            if key not in self._watched:
                state = _Watched(site or self._site, device_class, self._clock() if last_s is None else last_s)
                state.raised_at = self._seeded.get(key)
                self._watched[key] = state

    def _rules_for(self, device_id: str, device_class: str, metric: str) -> tuple[InactivityRule, ...]:
        key = (device_id, device_class, metric)
        found = self._selected.get(key)
        if found is None:
            found = self._selected[key] = tuple(
                r for r in self.rules if r.select.matches(device_id, device_class, metric))
        return found

    async def process(self, batch: Sequence[Reading], emit: Emitter) -> Sequence[Reading]:
        changes: list[AlertChange] = []
        if self.rules:
            for run in ReadingBatch.of(batch).runs:  # one series at a time (the batch is columnar already)
                rules = self._rules_for(run.device_id, run.device_class, run.metric)
                if rules:
                    heard = max(run.received_at)
                    for rule in rules:
                        self._heard(rule, run.site, run.device_id, run.device_class, run.metric, heard, changes)
        self.stats.received += len(batch)
        self.stats.passed += len(batch)
        await announce(changes, emit, self.alerts, self._on_alerts)
        return batch

    def _heard(self, rule: InactivityRule, site: str, device_id: str, device_class: str, metric: str,  # noqa: PLR0917
               heard: datetime, changes: list[AlertChange]) -> None:
        key = (rule.name, device_id)
        heard_s = heard.timestamp()
        state = self._watched.get(key)
        if state is None:
            state = self._watched[key] = _Watched(site, device_class, heard_s, self._seeded.get(key))
        state.last_s = max(state.last_s, heard_s)
        if state.raised_at is not None:
            changes.append(self._change(rule, device_id, state, raised=False, at=heard,
                                        message=f"{rule.name}: {device_id} is back ({metric})"))
            state.raised_at = None

    async def tick(self, emit: Emitter) -> None:
        """Raise the alerts of the devices silent for longer than their rule allows."""
        now = self._clock()
        changes: list[AlertChange] = []
        rules = {r.name: r for r in self.rules}
        for (name, device_id), state in self._watched.items():
            rule = rules.get(name)
            if rule is None or state.raised_at is not None or now - state.last_s < rule.after_s:
                continue
            at = datetime.fromtimestamp(now, tz=UTC)
            state.raised_at = at
            silent = now - state.last_s
            changes.append(self._change(rule, device_id, state, raised=True, at=at,
                                        message=f"{rule.name}: {device_id} silent for {silent:.0f} s "
                                                f"(limit {rule.after_s:g} s)", value=silent))
        await announce(changes, emit, self.alerts, self._on_alerts)

    def stats_dict(self) -> dict[str, object]:
        """Devices watched (per rule), how many of them are silent now, and the alert changes counted."""
        return {"watched": len(self._watched), "silent": sum(1 for s in self._watched.values() if s.raised_at),
                "alerts": dict(self.alerts)}

    def _change(self, rule: InactivityRule, device_id: str, state: _Watched, *, raised: bool, at: datetime,
                message: str, value: float = 0.0) -> AlertChange:
        return AlertChange(raised, rule.name, rule.kind, rule.severity, state.site, state.device_class, device_id,
                           rule.metric, value, message, state.raised_at or at, at)
