"""NATS JetStream destination (nats-py).

Topics become subjects (``/`` -> ``.``, see :mod:`pipeline.topics`). Every message carries
``Nats-Msg-Id`` = the event id, so JetStream's duplicate window drops a replay, and an event is
taken off the outbox only after its PubAck. Publishes are pipelined in order
(``publish_async``), so a batch costs one round trip, not one per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from gateway.forward.base import (
    DestinationConfigError,
    DestinationUnavailableError,
    InboundMessage,
    OutboundEvent,
    UnsendableEventError,
    acknowledged_prefix,
)
from pipeline.errors import TopicError
from pipeline.queue import DropOldestQueue
from pipeline.retry import backoff_delay, stop_task, until_done
from pipeline.topics import compile_filter, filter_to_subjects, subject_to_topic, topic_to_subject

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on
GATEWAY_HEADER = "Iotgw-Gateway"
TOPIC_HEADER = "Iotgw-Topic"
_SUBJECT_CACHE = 4096


def _retry_delay(attempt: int) -> float:
    """Before the next attempt to connect or to prepare the streams: jittered, at most 10 s."""
    return backoff_delay(attempt, base_s=0.5, cap_s=10.0)


@dataclass(frozen=True, slots=True)
class NatsSettings:
    url: str
    gateway_id: str
    stream: str | None = None  # when set, publishes must land in this stream
    create_stream: bool = False  # create ``stream`` over the forwarded topics if it does not exist
    topics: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    ack_timeout_s: float = 10.0
    inbound_queue: int = 1000


class NatsDestination:
    def __init__(self, name: str, settings: NatsSettings) -> None:
        self.name = name
        self._settings = settings
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._inbound: DropOldestQueue[InboundMessage] = DropOldestQueue(settings.inbound_queue)
        self._ready = False
        self._subjects: dict[str, str] = {}
        self.sent = 0
        self.acked = 0

    @property
    def connected(self) -> bool:
        return self._ready and self._nc is not None and self._nc.is_connected

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect_forever(), name=f"forward {self.name} connect")

    async def _connect_forever(self) -> None:
        url = self._settings.url
        nc = await until_done(self._connect, what=f"forward {self.name}: connecting to {url}", log=log,
                              retry_on=(OSError, nats.errors.Error, TimeoutError), delay=_retry_delay,
                              level=logging.WARNING)
        self._nc, self._js = nc, nc.jetstream(publish_async_max_pending=4000)
        # streams and subscriptions: retried until they are in place
        await until_done(self._prepare, what=f"forward {self.name}: preparing {url}", log=log,
                         retry_on=(nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError),
                         delay=_retry_delay, level=logging.WARNING)
        log.warning("forward %s: connected to %s", self.name, url)

    async def _connect(self) -> NatsClient:
        return await nats.connect(
            self._settings.url, name=f"iotgw-{self._settings.gateway_id}", max_reconnect_attempts=-1,
            reconnect_time_wait=1, connect_timeout=2, allow_reconnect=True,
            disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
        )

    async def _prepare(self) -> None:
        nc, js = self._nc, self._js
        if nc is None or js is None:
            return
        s = self._settings
        if s.stream and s.create_stream:
            subjects = sorted({subj for t in s.topics for subj in filter_to_subjects(compile_filter(t))})
            try:
                await js.stream_info(s.stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=s.stream, subjects=subjects)
        for pattern in s.subscribe:
            for subject in filter_to_subjects(compile_filter(pattern)):
                await nc.subscribe(subject, cb=self._on_message)
        self._ready = True

    async def _disconnected(self) -> None:
        log.warning("forward %s: lost %s", self.name, self._settings.url)

    async def _reconnected(self) -> None:
        log.warning("forward %s: reconnected to %s", self.name, self._settings.url)

    async def _on_message(self, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        try:
            topic = headers.get(TOPIC_HEADER) or subject_to_topic(msg.subject)
        except ValueError:
            return
        message = InboundMessage(topic, msg.data, headers.get("Nats-Msg-Id"), headers.get(GATEWAY_HEADER), headers)
        self._inbound.offer(message)

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        return await (await self.submit(batch))

    def _subject(self, topic: str) -> str:
        """The subject of a topic (memoised: a device's topics repeat)."""
        subject = self._subjects.get(topic)
        if subject is None:
            if len(self._subjects) >= _SUBJECT_CACHE:
                self._subjects.clear()
            subject = self._subjects[topic] = topic_to_subject(topic)
        return subject

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        """Publish ``batch`` now (``publish_async``: pipelined); the future counts the PubAcks (see
        :class:`~gateway.forward.base.Pipelined`)."""
        js = self._js
        if js is None or not self.connected:
            raise DestinationUnavailableError(f"{self.name}: not connected")
        futures: list[asyncio.Future[Any]] = []
        try:
            for event in batch:
                try:
                    subject = self._subject(event.topic)
                except TopicError as exc:  # an empty level, say: no NATS subject can carry it
                    if not futures:
                        raise UnsendableEventError(event, str(exc)) from None
                    break  # send what precedes it; it comes first in the next batch
                headers = {"Nats-Msg-Id": event.event_id, GATEWAY_HEADER: self._settings.gateway_id,
                           TOPIC_HEADER: event.topic}
                # No wait_stall: with one, nats-py runs every publish through a timed wait_for (a task
                # each). Past publish_async_max_pending it waits for PubAcks, or for the batches before
                # to time out (their futures are cancelled then, which frees room).
                futures.append(await js.publish_async(
                    subject, event.payload, headers=headers, stream=self._settings.stream))
                self.sent += 1
        except (nats.errors.Error, OSError) as exc:
            log.debug("forward %s: publish stopped: %s", self.name, exc)
        return asyncio.ensure_future(self._acknowledged(futures, batch[0].topic if batch else ""))

    async def _acknowledged(self, futures: list[asyncio.Future[Any]], first_topic: str) -> int:
        try:
            acked = await acknowledged_prefix(self.name, futures, self._settings.ack_timeout_s,
                                              (nats.errors.Error, nats.js.errors.Error))
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except DestinationUnavailableError:
            first = futures[0] if futures else None
            if first is not None and first.done() and not first.cancelled():
                refused = self._refusal(self._subject(first_topic), first.exception())
                if refused is not None:
                    raise refused from None
            raise
        self.acked += acked
        return acked

    def _refusal(self, subject: str, exc: BaseException | None) -> DestinationConfigError | None:
        """What JetStream's refusal of ``subject`` means and how to fix it (None: not a config matter)."""
        s = self._settings
        if isinstance(exc, nats.js.errors.NoStreamResponseError):  # 503: no stream listens on the subject
            subjects = " ".join(sorted({subj for t in s.topics for subj in filter_to_subjects(compile_filter(t))}))
            name = s.stream or "IOTGW"
            return DestinationConfigError(
                f"no JetStream stream captures subject {subject!r}"
                + (f" (stream {s.stream!r} does not exist or does not take it)" if s.stream else "")
                + f"; create one (nats stream add {name} --subjects '{subjects}') or set stream = {name!r} and"
                " create_stream = true on this [[forward]]"
            )
        if isinstance(exc, nats.js.errors.APIError) and exc.code is not None and 400 <= exc.code < 500:
            return DestinationConfigError(f"JetStream refuses subject {subject!r}: {exc.description}"
                                          + (f" (expected stream {s.stream!r})" if s.stream else ""))
        return None

    async def inbound(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self._inbound.get()

    async def close(self) -> None:
        await stop_task(self._task)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
