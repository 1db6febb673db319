"""The pipeline at work: batches from the ingest queue through the stages, and the work the stages
need on the gateway's clock (closing aggregate windows, store housekeeping).

:class:`Flow` runs the pipeline's two halves (pipeline/runner.py) as two tasks joined by a bounded
hand-off: the front (collect, clean, define: CPU) works on one batch while the back (store, analyze:
SQLite on its own thread) finishes the one before; batches stay in order. A batch is processed only
once the journal holds it, and leaves the journal only once it is stored and its events are in the
outboxes, so a crash at any point replays, and never loses, what was acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.journal import Journal
from gateway.publish import Publisher
from gateway.status import PipelineStatus, StageStatus
from pipeline.analyze import AnalyzeStage
from pipeline.queue import BatchQueue
from pipeline.retry import stop_task
from pipeline.runner import Pipeline
from pipeline.stage import Emitter, RawMessage
from pipeline.store import SqliteStore

log = logging.getLogger(__name__)
HANDOFF = 2  # batches between the front and the back
WINDOW_TICK_S = 1.0


class Outboxes(Protocol):
    async def committed(self) -> None:
        """Until this returns, what was routed may not be durable in the outboxes yet."""
        ...


_Job = tuple[list[RawMessage], Emitter, Sequence[Any]]  # the batch, what it emitted, what the front passed on


class Flow:
    """``start()`` the pipeline's tasks; ``drain()`` them at a stop; ``status()`` meanwhile."""

    def __init__(self, pipeline: Pipeline, queue: BatchQueue[RawMessage], journal: Journal, publisher: Publisher,
                 outboxes: Outboxes, *, batch_size: int, max_latency_s: float) -> None:
        self._pipeline = pipeline
        self._queue = queue
        self._journal = journal
        self._publisher = publisher
        self._outboxes = outboxes
        self._batch_size = batch_size
        self._max_latency_s = max_latency_s
        self._busy: dict[str, float] = {}  # half -> monotonic time its batch entered its stages
        self._batches = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pipeline")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def drain(self, timeout_s: float) -> bool:
        """No more input: the queue closes, the tasks finish what it holds. False if they did not
        within ``timeout_s`` (a pipeline held up by a refusing, unreachable backbone): what they had not
        finished is still in the journal and is replayed at the next start."""
        self._queue.close()
        if self._task is None:
            return True
        done, _ = await asyncio.wait([self._task], timeout=timeout_s)
        return bool(done)

    async def cancel(self) -> None:
        """Stop the tasks where they are (after a failed start, or a drain that timed out)."""
        if self._task is not None and not self._task.done():
            await stop_task(self._task)

    def status(self) -> PipelineStatus:
        now = time.monotonic()
        return PipelineStatus(running=self.running, batches=self._batches,
                              busy_s={half: now - started for half, started in list(self._busy.items())})

    def stage_status(self) -> dict[str, StageStatus]:
        return {
            stage.name: StageStatus(in_=stage.stats.received, out=stage.stats.passed,
                                    rejected=dict(sorted(stage.stats.rejected.items())))
            for stage in self._pipeline.stages
        }

    async def _run(self) -> None:
        handoff: asyncio.Queue[_Job | None] = asyncio.Queue(HANDOFF)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._front(handoff), name="pipeline: collect, clean, define")
            group.create_task(self._back(handoff), name="pipeline: store, analyze, publish")

    async def _front(self, handoff: asyncio.Queue[_Job | None]) -> None:
        while batch := await self._queue.get_batch(self._batch_size, self._max_latency_s):
            # Process only what is journaled: otherwise a crash could leave an event in an outbox whose
            # message the journal never recorded, and the device's resend would get a second event id.
            # The journal commits on its own cadence ([storage] commit_interval_s): under light load a batch
            # waits for that commit, so the store commits about as often as the journal does.
            await self._journal.committed()
            emit = Emitter()
            self._busy["front"] = time.monotonic()
            items = await self._pipeline.run_front(batch, emit)  # never raises
            del self._busy["front"]
            await handoff.put((batch, emit, items))  # waits while the back is two batches behind
        await handoff.put(None)  # the queue closed (shutdown): the back finishes what it has, then ends

    async def _back(self, handoff: asyncio.Queue[_Job | None]) -> None:
        while (job := await handoff.get()) is not None:
            batch, emit, items = job
            self._busy["back"] = time.monotonic()
            await self._pipeline.run_back(items, emit)  # never raises
            del self._busy["back"]
            self._batches += 1
            await self._publisher.results(emit)
            # The batch's events are durable in the outboxes ...
            await self._outboxes.committed()
            self._journal.done([m.event_id for m in batch])  # ... so the journal can let it go (on its next commit)


class Windows:
    """Aggregate windows close on the gateway's clock too: a series that went quiet has no batch to
    close them (pipeline/analyze.py)."""

    def __init__(self, analyze: AnalyzeStage, publisher: Publisher, *, tick_s: float = WINDOW_TICK_S) -> None:
        self._analyze = analyze
        self._publisher = publisher
        self._tick_s = tick_s

    async def run(self) -> None:
        """Until cancelled: close the windows whose grace period passed."""
        while True:
            await asyncio.sleep(self._tick_s)
            emit = Emitter()
            self._analyze.tick(emit)
            await self._publisher.results(emit)

    async def flush(self) -> None:
        """At a stop, after the pipeline drained: every open window is published as it stands."""
        emit = Emitter()
        self._analyze.flush(emit)
        await self._publisher.results(emit)


async def store_housekeeping(store: SqliteStore, interval_s: float) -> None:
    """Until cancelled: retention and the disk budget of the store (pipeline/store.py), in short transactions."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await store.maintain(int(datetime.now(UTC).timestamp() * 1000))
        except Exception:
            log.exception("store housekeeping failed; trying again in %.0f s", interval_s)
