"""Routes broker traffic into per-destination outboxes and drains each outbox to its destination.

One sender task per destination: it takes the oldest events from the outbox, sends them, and
removes what was acknowledged, so order is the outbox order (per device, the order events were
published) and a replay after an outage or a crash resends in the same order. Messages that come
back from the backbone (downlink commands, mesh events from other gateways) are handed to the
gateway, and are never forwarded back to the destination they came from; our own events echoed
back by the backbone are recognised (by gateway id or event id) and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.forward.base import (
    PIPELINE_DEPTH,
    Destination,
    DestinationConfigError,
    DestinationUnavailableError,
    InboundMessage,
    OutboundEvent,
    Pipelined,
    UnsendableEventError,
)
from gateway.forward.outbox import Limits, Outbox
from pipeline.retry import StateLog, backoff_delay, cancel_and_wait
from pipeline.topics import TopicFilter

log = logging.getLogger(__name__)
ORIGIN_PREFIX = "forward:"
_RECENT_IDS = 100_000
_DOWN_POLL_S = 0.2  # how often a sender looks whether its destination is back, at most


@dataclass(frozen=True, slots=True)
class Route:
    destination: Destination
    filters: tuple[TopicFilter, ...]
    limits: Limits
    batch_size: int = 500
    fresh_first: bool = False


@dataclass(slots=True)
class _Lanes:
    """Cursors of one sender: the last sequence acknowledged in each lane. In order, only ``live``
    moves; ``fresh_first`` treats everything queued up to ``boundary`` when the destination came
    back as the backlog."""

    live: int = 0
    backlog: int = 0
    boundary: int = 0
    down: bool = True
    live_turn: bool = True

    @property
    def backlog_pending(self) -> bool:
        return self.backlog < self.boundary

    def recovered(self, max_seq: int) -> None:
        if not self.backlog_pending:
            self.backlog = self.live  # a new backlog starts after what was already sent
        self.boundary = max(self.boundary, max_seq)
        self.live = max(self.live, self.boundary)

    def advance(self, lane: str, seq: int) -> None:
        if lane == "backlog":
            self.backlog = seq
        else:
            self.live = seq


InboundHandler = Callable[[str, InboundMessage], Awaitable[None]]


_Window = deque[tuple[list[OutboundEvent], asyncio.Future[int]]]  # batches on the way, oldest first


async def _abandon(window: _Window) -> None:
    """Stop waiting for the batches on the way: they are sent again from the outbox."""
    pending = [acks for _, acks in window]
    window.clear()
    await cancel_and_wait(*pending)


class Forwarder:
    def __init__(
        self, data_dir: Path, routes: Sequence[Route], *, gateway_id: str, on_inbound: InboundHandler,
        on_drop: Callable[[str, int], None], commit_interval_s: float = 0.0,
    ) -> None:
        self.routes = {r.destination.name: r for r in routes}
        self.gateway_id = gateway_id
        self.outbox = Outbox(data_dir, {name: r.limits for name, r in self.routes.items()}, on_drop=on_drop,
                             interval_s=commit_interval_s)
        self._on_inbound = on_inbound
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # ids we sent: an echo of one is dropped
        self.echoes_dropped = 0
        self.send_failures = dict.fromkeys(self.routes, 0)
        self.errors: dict[str, str | None] = dict.fromkeys(self.routes)  # a config problem, until a send succeeds

    async def __aenter__(self) -> Forwarder:
        await self.outbox.open()
        for route in self.routes.values():
            await self._start(route)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name in list(self.routes):
            await self._stop(name)
        await self.outbox.close()

    async def _start(self, route: Route) -> None:
        name = route.destination.name
        await route.destination.start()
        self._tasks[name] = [
            asyncio.create_task(self._sender(route), name=f"forward {name} sender"),
            asyncio.create_task(self._receiver(route), name=f"forward {name} inbound"),
        ]

    async def _stop(self, name: str) -> None:
        await cancel_and_wait(*self._tasks.pop(name, []))
        with contextlib.suppress(Exception):
            await self.routes[name].destination.close()

    async def add(self, route: Route) -> None:
        """A destination added by a reload; what its outbox queue already holds is sent first."""
        name = route.destination.name
        await self.outbox.add(name, route.limits)
        self.routes[name] = route
        self.send_failures.setdefault(name, 0)
        self.errors[name] = None
        await self._start(route)

    async def remove(self, name: str) -> None:
        """A destination removed by a reload. Its unsent events stay in the outbox file (a later
        reload or restart that names it again sends them); nothing new is queued for it."""
        await self._stop(name)
        del self.routes[name]

    def wants(self, topic: str, origin: str | None) -> bool:
        return any(self._matches(route, topic, origin) for route in self.routes.values())

    @staticmethod
    def _matches(route: Route, topic: str, origin: str | None) -> bool:
        if origin == ORIGIN_PREFIX + route.destination.name:
            return False  # never back to where it came from
        return any(f.matches(topic) for f in route.filters)

    async def route(self, topic: str, payload: bytes, *, event_id: str, key: str, origin: str | None
                    ) -> list[asyncio.Future[None]]:
        """Queue a broker message for every destination that forwards its topic."""
        futures = []
        for name, route in list(self.routes.items()):  # a reload may change the routes meanwhile
            if self._matches(route, topic, origin):
                futures.append(await self.outbox.enqueue(name, event_id, topic, key, payload))
        if futures:
            self._remember(event_id)
        return futures

    def _remember(self, event_id: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > _RECENT_IDS:
            self._recent.popitem(last=False)

    async def flush(self) -> None:
        await self.outbox.flush()

    async def committed(self) -> None:
        await self.outbox.committed()

    async def _sender(self, route: Route) -> None:
        """Send the outbox in order, removing what the destination acknowledged."""
        dest = route.destination
        name = dest.name
        lanes = _Lanes()
        sending = StateLog(log, f"forward {name}", down="%(name)s: sending paused: %(reason)s",
                           up="%(name)s: sending resumed after %(failures)d failed attempt(s)")
        window: _Window = deque()
        polls = 0  # while the destination is away: it is looked at often at first, then every 0.2 s
        try:
            while True:
                if not dest.connected:
                    await _abandon(window)
                    lanes.down = True
                    await asyncio.sleep(min(_DOWN_POLL_S, 0.01 * 2 ** polls))
                    polls = min(polls + 1, 8)
                    continue
                polls = 0
                if lanes.down and route.fresh_first:
                    lanes.recovered(await self.outbox.max_seq(name))
                lanes.down = False
                if isinstance(dest, Pipelined) and not lanes.backlog_pending:
                    await self._send_pipelined(route, dest, lanes, window, sending)
                else:
                    await self._send_one(route, lanes, sending)
        finally:
            await _abandon(window)

    async def _send_pipelined(self, route: Route, dest: Pipelined, lanes: _Lanes,
                              window: _Window, sending: StateLog) -> None:
        """One step of sending the live lane with up to PIPELINE_DEPTH batches on the way: fill the window,
        then take the oldest batch's acknowledgements. Whatever goes wrong, the window is given up and
        sending starts again, in order, after what was acknowledged."""
        name = route.destination.name
        upto = window[-1][0][-1].seq if window else lanes.live
        try:
            while len(window) < PIPELINE_DEPTH:
                batch = await self.outbox.fetch(name, route.batch_size, upto)
                if not batch:
                    break
                try:
                    acks = await dest.submit(batch)
                except UnsendableEventError as exc:
                    if window:
                        break  # dropped once what was sent before it is through
                    log.error("forward %s: dropping an event it can never take: %s", name, exc)
                    self.outbox.drop(name, exc.event)
                    lanes.advance("live", exc.event.seq)
                    upto = exc.event.seq
                    continue
                window.append((batch, acks))
                upto = batch[-1].seq
                if len(batch) < route.batch_size:
                    break  # all there is for now
        except Exception as exc:  # the outbox failed (disk), the destination refused, or a bug: never die
            await self._failed(name, exc, window, sending)
            return
        if not window:
            await self.outbox.wait_new(name, 1.0)
            return
        batch, acks = window.popleft()
        try:
            acked = await acks
        except UnsendableEventError as exc:  # found only once sent (a server refused it, say): as in _send_one
            if exc.event.seq != batch[0].seq:
                await self._failed(name, exc, window, sending)
                return
            await _abandon(window)  # what followed it goes again, after it is dropped
            log.error("forward %s: dropping an event it can never take: %s", name, exc)
            self.outbox.drop(name, exc.event)
            lanes.advance("live", exc.event.seq)
            return
        except Exception as exc:
            await self._failed(name, exc, window, sending)
            return
        self._resumed(name, sending)
        if acked:
            lanes.advance("live", batch[acked - 1].seq)
            self.outbox.ack(name, batch[:acked])  # committed in the background; the cursor moves on now
        if acked < len(batch):
            await _abandon(window)  # the rest of the batch goes again first, then what followed it

    async def _failed(self, name: str, exc: Exception, window: _Window, sending: StateLog) -> None:
        await _abandon(window)
        await self._paused(name, exc, sending)

    async def _paused(self, name: str, exc: Exception, sending: StateLog) -> None:
        """A send failed: count it, say so once per outage (a destination's config problem at ERROR,
        and again if the problem changes), and wait before the next attempt."""
        self.send_failures[name] += 1
        problem = str(exc) if isinstance(exc, DestinationConfigError) else None  # someone must act
        if problem is not None and sending.is_down and problem != self.errors.get(name):
            log.error("forward %s: sending paused: %s", name, exc)  # a new problem within the outage
        sending.down(exc, exc_info=not isinstance(exc, (DestinationUnavailableError, DestinationConfigError)),
                     level=logging.ERROR if problem is not None else None)
        self.errors[name] = problem or self.errors.get(name)
        await asyncio.sleep(backoff_delay(sending.failures, base_s=0.2, factor=2.0, cap_s=5.0, jitter=False))

    def _resumed(self, name: str, sending: StateLog) -> None:
        sending.up()
        self.errors[name] = None

    async def _send_one(self, route: Route, lanes: _Lanes, sending: StateLog) -> None:
        """One batch from the lane whose turn it is, sent and acknowledged before the next."""
        dest = route.destination
        name = dest.name
        try:
            lane, batch = await self._next_batch(route, lanes)
        except Exception:  # the outbox itself failed (disk): never let the sender die
            log.exception("forward %s: reading the outbox failed", name)
            await asyncio.sleep(1.0)
            return
        if not batch:
            return
        try:
            acked = await dest.send(batch)
        except UnsendableEventError as exc:
            log.error("forward %s: dropping an event it can never take: %s", name, exc)
            self.outbox.drop(name, exc.event)
            lanes.advance(lane, exc.event.seq)
            return
        except Exception as exc:  # unavailable, or a bug: pause and retry, never die
            await self._paused(name, exc, sending)
            return
        self._resumed(name, sending)
        if acked:
            lanes.advance(lane, batch[acked - 1].seq)
            self.outbox.ack(name, batch[:acked])  # committed in the background; the cursor moves on now

    async def _next_batch(self, route: Route, lanes: _Lanes) -> tuple[str, list[OutboundEvent]]:
        """The next batch to send, and its lane. With ``fresh_first``, what was queued while the
        destination was away (the backlog) and what arrived since (live) are served in turn, each in
        order, so a long backlog does not hold fresh data back."""
        name = route.destination.name
        if lanes.backlog_pending and not lanes.live_turn:
            lanes.live_turn = True
            batch = await self.outbox.fetch(name, route.batch_size, lanes.backlog, lanes.boundary)
            if not batch:
                lanes.backlog = lanes.boundary  # the backlog is done
            return "backlog", batch
        lanes.live_turn = not lanes.backlog_pending
        batch = await self.outbox.fetch(name, route.batch_size, lanes.live)
        if not batch and not lanes.backlog_pending:
            await self.outbox.wait_new(name, 1.0)
        return "live", batch

    async def _receiver(self, route: Route) -> None:
        dest = route.destination
        async for message in dest.inbound():
            if message.origin_gateway == self.gateway_id or (message.event_id and message.event_id in self._recent):
                self.echoes_dropped += 1
                continue
            try:
                await self._on_inbound(dest.name, message)
            except Exception:
                log.exception("forward %s: handling an inbound message failed", dest.name)

    def stats(self) -> dict[str, Any]:
        now_ms = int(time.time() * 1000)
        destinations = {
            name: {
                "connected": route.destination.connected, "send_failures": self.send_failures[name],
                "error": self.errors.get(name),
                **self.outbox.stats[name].as_dict(now_ms),
            }
            for name, route in self.routes.items()
        }
        return {"destinations": destinations, "echoes_dropped": self.echoes_dropped}
