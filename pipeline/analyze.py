"""analyze: per-series running count/mean/min/max, published back as ``agg`` events.

Each series publishes at most once per ``interval_s`` (and once more on :meth:`flush` at shutdown),
so a fast sensor does not flood subscribers with aggregates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.model import AGGREGATE_TYPE, Reading, cloudevent, new_event_id
from pipeline.stage import Emitter, StageStats
from pipeline.topics import TopicFields, TopicTemplate


@dataclass(slots=True)
class RunningStats:
    fields: TopicFields
    unit: str | None
    count: int = 0
    mean: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    published_at: float = float("-inf")
    dirty: bool = False

    def add(self, reading: Reading) -> None:
        self.count += 1
        # Incremental, and in a form that cannot overflow for finite inputs (no x - mean).
        self.mean = self.mean * (1 - 1 / self.count) + reading.value / self.count
        self.min = min(self.min, reading.value)
        self.max = max(self.max, reading.value)
        self.first_ts = self.first_ts or reading.ts
        self.last_ts = max(self.last_ts, reading.ts) if self.last_ts else reading.ts
        self.dirty = True


class AnalyzeStage:
    name = "analyze"

    def __init__(
        self, template: TopicTemplate, version: str, *, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._template = template
        self._version = version
        self._interval = interval_s
        self._clock = clock
        self.series: dict[tuple[str, str], RunningStats] = {}
        self.stats = StageStats()
        self.events_published = 0

    async def process(self, batch: list[Reading], emit: Emitter) -> list[Reading]:
        for reading in batch:
            key = (reading.device_id, reading.metric)
            running = self.series.get(key)
            if running is None:
                fields = TopicFields(
                    stage="agg", version=self._version, site=reading.site, device_class=reading.device_class,
                    device_id=reading.device_id, metric=reading.metric,
                )
                running = self.series[key] = RunningStats(fields, reading.unit)
            running.add(reading)
        now = self._clock()
        for running in self.series.values():
            if running.dirty and now - running.published_at >= self._interval:
                self._publish(running, now, emit)
        self.stats.received += len(batch)
        self.stats.passed += len(batch)
        return batch

    def flush(self, emit: Emitter) -> None:
        now = self._clock()
        for running in self.series.values():
            if running.dirty:
                self._publish(running, now, emit)

    def _publish(self, running: RunningStats, now: float, emit: Emitter) -> None:
        running.published_at = now
        running.dirty = False
        topic = self._template.format(running.fields)
        fields = running.fields
        emit.publish(topic, cloudevent(
            event_id=new_event_id(),
            source=f"/iotgw/{fields.site}/{fields.device_id}",
            type_=AGGREGATE_TYPE,
            subject=topic,
            time=running.last_ts or datetime.now(UTC),
            data={
                "device_id": fields.device_id, "metric": fields.metric, "unit": running.unit,
                "count": running.count, "mean": running.mean, "min": running.min, "max": running.max,
                "from": running.first_ts.isoformat() if running.first_ts else None,
                "to": running.last_ts.isoformat() if running.last_ts else None,
            },
        ))
        self.events_published += 1
