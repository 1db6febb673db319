"""The forwarder with a destination that takes several batches on the way (gateway/forward/base.py
``Pipelined``): batches go out in outbox order, and when the far side acknowledges only part of one, or
fails, what was sent after it is given up and everything from the first unacknowledged event goes again,
in order; nothing acknowledged is sent twice by the forwarder and nothing unacknowledged leaves the outbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from gateway.forward.base import (
    PIPELINE_DEPTH,
    DestinationUnavailableError,
    InboundMessage,
    OutboundEvent,
    Pipelined,
    UnsendableEventError,
)
from gateway.forward.forwarder import Forwarder, Route
from gateway.forward.outbox import Limits
from pipeline.model import new_event_id
from pipeline.topics import compile_filter

TOPIC = "telemetry/valid/1.0/s1/env/d1/temperature"


class ScriptedDestination:
    """Acknowledges what ``decide(batch number, batch)`` says: a count, or an exception."""

    name = "far"

    def __init__(self, decide: Callable[[int, list[int]], int | Exception]) -> None:
        self.decide = decide
        self.submitted: list[list[int]] = []  # each batch's payload numbers, in submit order
        self.most_on_the_way = 0
        self._on_the_way: list[asyncio.Future[int]] = []

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        return await (await self.submit(batch))

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        numbers = [int(e.payload) for e in batch]
        self.submitted.append(numbers)
        verdict = self.decide(len(self.submitted), numbers)
        self._on_the_way = [f for f in self._on_the_way if not f.done()]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._on_the_way.append(future)
        self.most_on_the_way = max(self.most_on_the_way, len(self._on_the_way))

        def settle() -> None:
            if future.done():
                return
            if isinstance(verdict, Exception):
                future.set_exception(verdict)
            else:
                future.set_result(verdict)

        asyncio.get_running_loop().call_later(0.01, settle)
        return future

    async def inbound(self) -> AsyncIterator[InboundMessage]:
        await asyncio.Event().wait()
        yield InboundMessage("", b"")  # pragma: no cover


async def _no_inbound(name: str, message: InboundMessage) -> None:
    return None


async def forward(tmp_path: Path, destination: ScriptedDestination, count: int, batch_size: int) -> Forwarder:
    limits = Limits(1 << 30, "refuse")
    forwarder = Forwarder(tmp_path, [Route(destination, (compile_filter("telemetry/#"),), limits, batch_size)],
                          gateway_id="gw", on_inbound=_no_inbound, on_drop=lambda *_: None)
    async with forwarder:
        for i in range(1, count + 1):
            await forwarder.outbox.enqueue(destination.name, new_event_id(), TOPIC, "d1", str(i).encode())
        await forwarder.outbox.flush()
        async with asyncio.timeout(20):
            while forwarder.outbox.stats[destination.name].depth:
                await asyncio.sleep(0.01)
    return forwarder


async def test_batches_are_on_the_way_together_in_order(tmp_path: Path) -> None:
    destination = ScriptedDestination(lambda n, batch: len(batch))
    assert isinstance(destination, Pipelined)
    forwarder = await forward(tmp_path, destination, 100, 10)
    assert [n for batch in destination.submitted for n in batch] == list(range(1, 101))
    assert destination.most_on_the_way == PIPELINE_DEPTH
    assert forwarder.outbox.stats["far"].delivered == 100


async def test_a_partly_acknowledged_batch_is_resent_from_its_first_unacknowledged_event(tmp_path: Path) -> None:
    destination = ScriptedDestination(lambda n, batch: 3 if n == 2 else len(batch))  # batch 2: 3 of 10
    forwarder = await forward(tmp_path, destination, 50, 10)
    sent = destination.submitted
    assert sent[0] == list(range(1, 11))
    assert sent[1] == list(range(11, 21))
    # what went out after batch 2 was given up: everything from event 14 goes again, in order
    resent_from = next(i for i, batch in enumerate(sent) if i > 1 and batch[0] == 14)
    assert [n for batch in sent[resent_from:] for n in batch] == list(range(14, 51))
    assert forwarder.outbox.stats["far"].delivered == 50
    assert forwarder.send_failures["far"] == 0


async def test_a_failed_batch_gives_up_the_window_and_resends_in_order(tmp_path: Path) -> None:
    failed = DestinationUnavailableError("far: gone")
    destination = ScriptedDestination(lambda n, batch: failed if n == 3 else len(batch))
    forwarder = await forward(tmp_path, destination, 60, 10)
    sent = destination.submitted
    resent_from = next(i for i, batch in enumerate(sent) if i > 2 and batch[0] == 21)
    assert [n for batch in sent[resent_from:] for n in batch] == list(range(21, 61))
    assert [n for batch in sent[:2] for n in batch] == list(range(1, 21))
    assert forwarder.send_failures["far"] == 1
    assert forwarder.outbox.stats["far"].delivered == 60


class RefusesAfterSending(ScriptedDestination):
    """Finds out only once a batch was sent that its first event can never go (a server's 400, say)."""

    def __init__(self, refused: int) -> None:
        super().__init__(lambda n, batch: len(batch))
        self.refused = refused

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        if int(batch[0].payload) != self.refused:
            return await super().submit(batch)
        self.submitted.append([int(e.payload) for e in batch])
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_exception(UnsendableEventError(batch[0], "refused by the server"))
        return future


async def test_an_event_refused_once_sent_is_dropped_and_the_rest_goes_in_order(tmp_path: Path) -> None:
    destination = RefusesAfterSending(refused=11)
    forwarder = await forward(tmp_path, destination, 50, 10)
    sent = destination.submitted
    resent_from = next(i for i, batch in enumerate(sent) if batch[0] == 12)
    assert [n for batch in sent[resent_from:] for n in batch] == list(range(12, 51))
    stats = forwarder.outbox.stats["far"]
    assert (stats.delivered, stats.dropped) == (49, 1)
    assert forwarder.send_failures["far"] == 0
