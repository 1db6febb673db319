"""Where every message enters: what the broker calls for each publish, and what drivers publish into.

:class:`Ingest` is called by the broker for every message (gateway/broker/embedded.py ``Ingest``),
from MQTT clients and in-process publishers alike. A raw-stage message is written to the journal and
queued for the pipeline (the queue is bounded: a full one holds the broker back); any message a
forward destination wants is queued in that destination's outbox. The futures it returns resolve
once those writes are durable, and a device's QoS 1 PUBACK waits for them.

:class:`DriverSink` is what drivers (drivers/) publish into: a reading becomes a raw-stage message
on the broker, as a device on MQTT would have sent it; an undecodable frame becomes a reject.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from drivers.base import DriverReading
from gateway.broker.embedded import Resend
from gateway.journal import Journal
from gateway.publish import Broker, dumps
from gateway.status import JournalStatus, QueueStatus
from pipeline.dialects import DialectSet
from pipeline.model import new_event_id
from pipeline.queue import BatchQueue
from pipeline.stage import RawMessage, Reject
from pipeline.topics import SeenTopics, TopicTemplate

log = logging.getLogger(__name__)
FRAME_METRIC = "_frame"  # the metric level under which undecodable frames are rejected


class Outboxes(Protocol):
    """Where forwarded messages are queued (gateway/destinations.py)."""

    def wants(self, topic: str, origin: str | None) -> bool: ...

    async def route(self, topic: str, payload: bytes, *, event_id: str, key: str, origin: str | None
                    ) -> list[asyncio.Future[None]]: ...


class Ingest:
    """Journal, queue and outboxes for every broker message; see the module docstring."""

    def __init__(self, template: TopicTemplate, journal: Journal, queue: BatchQueue[RawMessage],
                 outboxes: Outboxes, dialects: DialectSet | None = None) -> None:
        """``dialects``: the foreign topics a client's message is read on too (pipeline/dialects.py)."""
        self._template = template
        self._raw = SeenTopics(template.stage_filter("raw"))  # topics repeat: each matched once
        self._dialects = dialects or None
        self._journal = journal
        self._queue = queue
        self._outboxes = outboxes

    async def __call__(
        self, topic: str, payload: bytes, origin: str | None, event_id: str | None, resend: Resend | None
    ) -> list[asyncio.Future[None]]:
        futures: list[asyncio.Future[None]] = []
        if resend is not None and resend.dup and origin is not None and event_id is None:
            event_id = self._journal.resent_id(origin, resend.packet_id, topic, payload)  # the same event again
        if self._raw.matches(topic) or (
            origin is not None and self._dialects is not None and self._dialects.wants(topic)
        ):
            message = RawMessage(topic, payload, origin, datetime.now(UTC), event_id or new_event_id())
            event_id = message.event_id
            futures.append(self._journal.append(message, resend.packet_id if resend else None))
            await self._queue.put(message)
        if self._outboxes.wants(topic, origin):
            fields = self._template.parse(topic)
            futures += await self._outboxes.route(
                topic, payload, event_id=event_id or new_event_id(), key=fields.device_id if fields else "",
                origin=origin,
            )
        return futures

    async def replay(self, recovered: list[RawMessage]) -> None:
        """What the journal held at start (accepted before the last stop, not done): queued again, with
        the event ids it had, before any new message, so per-device order holds across the crash."""
        if recovered:
            log.warning("replaying %d message(s) accepted before the last stop", len(recovered))
        for message in recovered:
            await self._queue.put(message)

    def queue_status(self) -> QueueStatus:
        queue = self._queue
        return QueueStatus(depth=len(queue), max=queue.maxsize, high_water=queue.high_water,
                           producer_waits=queue.put_waits)

    def journal_status(self) -> JournalStatus:
        journal = self._journal
        return JournalStatus(appended=journal.appended, replayed=journal.replayed,
                             resends_recognised=journal.resends_recognised, commits=journal.commits)


class DriverSink:
    """What drivers publish into (drivers/base.py ``Sink``): the raw stage of the broker, in-process."""

    def __init__(self, broker: Broker, raw_topic: Callable[[str, str], str],
                 rejects: Callable[[list[Reject]], Awaitable[None]]) -> None:
        """``raw_topic(device_id, metric)``: where a device's readings go; ``rejects``: publishes rejects."""
        self._broker = broker
        self._raw_topic = raw_topic
        self._rejects = rejects

    async def reading(self, reading: DriverReading) -> None:
        body: dict[str, Any] = {"value": reading.value, "unit": reading.unit}
        if reading.device_ts is not None:
            body["ts"] = reading.device_ts.timestamp()
        if reading.seq is not None:
            body["seq"] = reading.seq
        await self._broker.publish(self._raw_topic(reading.device_id, reading.metric), dumps(body))

    async def error(self, device_id: str, reason: str, detail: str, raw: bytes) -> None:
        await self._rejects([Reject("driver", reason, detail, self._raw_topic(device_id, FRAME_METRIC), raw)])
