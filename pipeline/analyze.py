"""analyze: tumbling-window aggregates per series, published as ``agg`` events, and alert rules.

Windows (``[pipeline.analyze] windows``, e.g. 1 minute and 1 hour) are aligned to wall-clock
boundaries of the readings' time (device time when present, else receive time): a 1-minute window
holds ``[12:03:00, 12:04:00)``. Each series keeps one open window per size. A window closes, and is
published once with its count, mean, min and max, when

- a reading of the same series falls past its end (a newer window opens), or
- the gateway's clock passes its end plus ``grace_s`` (a series that went quiet). The deadline is
  counted on the gateway's clock from when the window opened, so a device whose clock is off does not
  close its windows early or late: ``deadline = opened_at + (window end - first reading) + grace``.

A reading for a window already closed is *late*: it is counted (``late`` in the stage stats) and not
published again.

Cost: only the smallest window (and any window that is not a multiple of it) is updated reading by
reading; each closed smallest window is merged into the larger windows that are multiples of it (1m
into 1h). So a larger window closes when its last smallest window does, or when the rest of its span
has passed on the gateway's clock after the last merge; and a reading late for the smallest window is
late for the larger ones too. The store's rollups (pipeline/store.py) are computed from the stored readings in
the store's own transaction, so they include late and out-of-order readings and are exact however
the readings were batched; the ``agg`` events are the live view.

Alert rules (pipeline/rules.py) run on every reading of the series they select; the changes they
raise are published (``alert/raised/...``, ``alert/cleared/...``) and handed to ``on_alerts`` (the
store records them).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline.model import AGGREGATE_TYPE, Reading, cloudevent, new_event_id
from pipeline.readings import ReadingBatch, Run, mean_of, spans
from pipeline.rules import AlertChange, RuleSet, Watch, announce
from pipeline.stage import Emitter, StageStats
from pipeline.topics import TopicFields, TopicTemplate

log = logging.getLogger(__name__)
AlertSink = Callable[[list[AlertChange]], Awaitable[None]]
_FEW = 8  # readings of a series in a batch below which summing up at once does not pay
_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s"), (1, "ms"))


def _series_runs(batch: ReadingBatch) -> Iterator[tuple[Run, list[int], list[float], list[datetime] | None]]:
    """Each series' readings of the batch, in arrival order: (a run of it, times in ms, values, and the
    times as datetimes when already at hand). Two runs of one series (two topic versions) are merged."""
    runs = batch.runs
    if len({(run.device_id, run.metric) for run in runs}) == len(runs):  # the usual case: a run a series
        for run in runs:
            yield run, run.ts_ms, run.values, None
        return
    by_series: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_series.setdefault((run.device_id, run.metric), []).append(run)
    for same in by_series.values():
        if len(same) == 1:
            yield same[0], same[0].ts_ms, same[0].values, None
            continue
        merged = sorted((position, t, value, d or r) for run in same for position, t, value, d, r in zip(
            run.positions, run.ts_ms, run.values, run.device_ts, run.received_at, strict=True))
        yield same[0], [m[1] for m in merged], [m[2] for m in merged], [m[3] for m in merged]


def window_label(ms: int) -> str:
    """``60000`` -> ``"1m"``: the largest unit that divides the window."""
    for size, unit in _UNITS:
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"  # pragma: no cover - the loop ends with 1 ms


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Window:
    start_ms: int
    count: int
    mean: float
    min: float
    max: float


@dataclass(slots=True)
class SeriesState:
    fields: TopicFields  # on the agg stage
    unit: str | None
    open: list[Window | None]  # one slot per window size
    watches: tuple[Watch, ...] = field(default_factory=tuple)


class AnalyzeStage:
    name = "analyze"

    def __init__(
        self,
        template: TopicTemplate,
        version: str,
        *,
        windows_s: Sequence[float] = (60.0, 3600.0),
        grace_s: float = 5.0,
        rules: RuleSet | None = None,
        on_alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._template = template
        self._version = version
        self._windows = tuple(sorted({round(w * 1000) for w in windows_s}))
        if any(w < 1 for w in self._windows):
            raise ValueError("windows must be at least 1 ms long")
        self._labels = tuple(window_label(w) for w in self._windows)
        # Windows that are multiples of the smallest are not fed reading by reading: each closed smallest
        # window is merged into them (one update a reading instead of one per window size).
        base = self._windows[0]
        self._derived = tuple(i for i, w in enumerate(self._windows) if i and w % base == 0)
        self._direct = tuple((i, w) for i, w in enumerate(self._windows) if i not in self._derived)
        self._grace_ms = int(grace_s * 1000)
        self.rules = rules or RuleSet(())
        self._on_alerts = on_alerts
        self._clock = clock
        self.series: dict[tuple[str, str], SeriesState] = {}
        # (gateway-clock deadline ms, series key, window index, window start): lazily invalidated
        self._deadlines: list[tuple[int, tuple[str, str], int, int]] = []
        self.stats = StageStats()
        self.events_published = 0
        self.late = 0
        self.alerts: dict[str, int] = {"raised": 0, "cleared": 0, "record_failures": 0}

    async def process(self, batch: Sequence[Reading], emit: Emitter) -> Sequence[Reading]:
        now_ms = int(self._clock() * 1000)
        changes: list[AlertChange] = []
        for run, ts_ms, values, known_times in _series_runs(ReadingBatch.of(batch)):
            key = (run.device_id, run.metric)
            state = self.series.get(key)
            if state is None:
                state = self._new_series(run)
            self._windows_update(state, key, ts_ms, values, now_ms, emit)
            if state.watches:
                evaluate, watches = self.rules.evaluate, state.watches
                site, device_class, device_id, metric = run.site, run.device_class, run.device_id, run.metric
                times = known_times or [d or r for d, r in zip(run.device_ts, run.received_at, strict=True)]
                for ts, t_ms, value in zip(times, ts_ms, values, strict=True):
                    evaluate(watches, site, device_class, device_id, metric, ts, t_ms / 1000, value, changes)
        self._expire(now_ms, emit)
        if changes:
            await announce(changes, emit, self.alerts, self._on_alerts)
        self.stats.received += len(batch)
        self.stats.passed += len(batch)
        return batch

    def _windows_update(  # noqa: PLR0917  (internal, once per series and batch)
        self, state: SeriesState, key: tuple[str, str], ts_ms: list[int], values: list[float], now_ms: int,
        emit: Emitter,
    ) -> None:
        """A series' readings (in arrival order) into its open windows. The readings that fall in one window
        are summed up at once, when they come in time order and none is late (the usual case; with more than
        one window size fed directly, only when all fall in one window of each); otherwise one by one."""
        direct = self._direct
        slots = state.open
        cuts = [spans(ts_ms, size) for _, size in direct] if len(ts_ms) > _FEW else []
        if cuts and all(cut is not None and (len(cut) == 1 or len(direct) == 1)
               and (slots[i] is None or slots[i].start_ms <= cut[0][0])  # type: ignore[union-attr]
               for (i, _), cut in zip(direct, cuts, strict=True)):
            for (i, size), cut in zip(direct, cuts, strict=True):
                assert cut is not None
                for start, a, b in cut:
                    part = values[a:b] if a or b < len(values) else values
                    n, mean, lo, hi = b - a, mean_of(part), min(part), max(part)
                    window = slots[i]
                    if window is not None and window.start_ms == start:
                        total = window.count + n
                        window.mean = window.mean * (window.count / total) + mean * (n / total)
                        window.count, window.min, window.max = total, min(window.min, lo), max(window.max, hi)
                        continue
                    if window is not None:
                        self._close(state, key, i, window, now_ms, emit)
                    slots[i] = Window(start, n, mean, lo, hi)
                    heapq.heappush(self._deadlines, (now_ms + start + size - ts_ms[a] + self._grace_ms, key, i, start))
            return
        for ts, value in zip(ts_ms, values, strict=True):
            for i, size in direct:
                start = ts - ts % size
                window = slots[i]
                if window is not None and window.start_ms == start:  # the hot path, inlined
                    n = window.count = window.count + 1
                    # incremental, and in a form that cannot overflow for finite inputs (no x - mean)
                    window.mean = window.mean * (1 - 1 / n) + value / n
                    if value < window.min:
                        window.min = value
                    elif value > window.max:
                        window.max = value
                    continue
                if window is not None and start < window.start_ms:
                    self.late += 1
                    continue
                if window is not None:
                    self._close(state, key, i, window, now_ms, emit)
                slots[i] = Window(start, 1, value, value, value)
                heapq.heappush(self._deadlines, (now_ms + start + size - ts + self._grace_ms, key, i, start))

    def set_rules(self, rules: RuleSet) -> None:
        """New alert rules (a reload). A rule whose definition did not change keeps its state for every
        series (an active alert stays active, a threshold's timer keeps running); a new or changed rule
        starts afresh."""
        unchanged = {rule.name for rule in rules.rules if rule in self.rules.rules}
        for (device_id, metric), state in self.series.items():
            kept = {w.rule.name: w for w in state.watches if w.rule.name in unchanged}
            state.watches = tuple(
                kept.get(w.rule.name, w) for w in rules.watches(device_id, state.fields.device_class, metric)
            )
        self.rules = rules

    def tick(self, emit: Emitter) -> None:
        """Close the windows whose grace period has passed on the gateway's clock (call it
        periodically: a series that went quiet has no batch to do it)."""
        self._expire(int(self._clock() * 1000), emit)

    def flush(self, emit: Emitter) -> None:
        """At shutdown: publish every open window as it stands (the store's rollups stay exact)."""
        for key, state in self.series.items():
            for i in range(len(self._windows)):  # the smallest first: it is merged into the larger ones
                window = state.open[i]
                if window is not None:
                    self._close(state, key, i, window, 0, emit)
        self._deadlines.clear()

    def _new_series(self, run: Run) -> SeriesState:
        fields = TopicFields(
            stage="agg", version=self._version, site=run.site, device_class=run.device_class,
            device_id=run.device_id, metric=run.metric,
        )
        watches = self.rules.watches(run.device_id, run.device_class, run.metric)
        state = self.series[(run.device_id, run.metric)] = SeriesState(
            fields, run.units[0], [None] * len(self._windows), watches,
        )
        return state

    def _expire(self, now_ms: int, emit: Emitter) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now_ms:
            _, key, i, start = heapq.heappop(deadlines)
            state = self.series[key]
            window = state.open[i]
            if window is not None and window.start_ms == start:  # else: closed already by a newer reading
                self._close(state, key, i, window, now_ms, emit)

    def _close(  # noqa: PLR0917  (internal, called per closed window)
        self, state: SeriesState, key: tuple[str, str], i: int, window: Window, now_ms: int, emit: Emitter
    ) -> None:
        """Publish a window; the smallest one is then merged into the larger windows it is part of."""
        self._publish(state, i, window, emit)
        state.open[i] = None
        if i != 0:
            return
        end = window.start_ms + self._windows[0]
        for j in self._derived:
            size = self._windows[j]
            start = window.start_ms - window.start_ms % size
            big = state.open[j]
            if big is not None and start < big.start_ms:
                self.late += window.count
                continue
            if big is not None and big.start_ms == start:
                total = big.count + window.count
                big.mean = big.mean * (big.count / total) + window.mean * (window.count / total)
                big.count, big.min, big.max = total, min(big.min, window.min), max(big.max, window.max)
            else:
                if big is not None:
                    self._publish(state, j, big, emit)
                big = state.open[j] = Window(window.start_ms, window.count, window.mean, window.min, window.max)
                big.start_ms = start
                # the rest of it on the gateway's clock (the grace period is already behind the small window)
                heapq.heappush(self._deadlines, (now_ms + start + size - end, key, j, start))
            if end == start + size:  # its last part: complete
                self._publish(state, j, big, emit)
                state.open[j] = None

    def _publish(self, state: SeriesState, i: int, window: Window, emit: Emitter) -> None:
        topic = self._template.format(state.fields)
        fields = state.fields
        end = window.start_ms + self._windows[i]
        emit.publish(topic, cloudevent(
            event_id=new_event_id(),
            source=f"/iotgw/{fields.site}/{fields.device_id}",
            type_=AGGREGATE_TYPE,
            subject=topic,
            time=datetime.fromtimestamp(end / 1000, tz=UTC),
            data={
                "device_id": fields.device_id, "metric": fields.metric, "unit": state.unit,
                "window": self._labels[i], "from": _iso(window.start_ms), "to": _iso(end),
                "count": window.count, "mean": window.mean, "min": window.min, "max": window.max,
            },
        ))
        self.events_published += 1

    def stats_dict(self) -> dict[str, object]:
        return {"agg_published": self.events_published, "late": self.late, "open_series": len(self.series),
                "alerts": dict(self.alerts)}
