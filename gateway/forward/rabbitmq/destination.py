"""RabbitMQ destination (aiormq, AMQP 0-9-1).

Events go to a durable topic exchange as persistent messages on a channel in confirm mode; an event
leaves the outbox only once the broker confirmed it (``basic.ack``: for a persistent message routed
to durable queues, after it is written to disk). Publishes are pipelined in outbox order on one
channel, so a batch costs about one round trip and per-device order holds.

Each message is the CloudEvent as it is (structured content mode, ``application/cloudevents+json``).
Its attributes are AMQP properties where AMQP has one -- ``message_id`` = ``id``, ``type`` = ``type``,
``timestamp`` = ``time`` (whole seconds) -- and headers named as in the CloudEvents AMQP binding where
it has none: ``cloudEvents:specversion``, ``cloudEvents:source``, ``cloudEvents:subject`` (and
``cloudEvents:dataschema`` when set); ``app_id`` is ``iotgw`` and the header ``iotgw-gateway`` names
the gateway (a mesh drops its own echoes by it). Routing keys are the taxonomy in AMQP's form
(:mod:`.routing`). ``queue`` declares a durable queue bound to the forwarded topics, for events that
must wait for consumers not connected yet (as on any topic exchange, a message no queue is bound
for is confirmed and gone).

No event id twice: AMQP 0-9-1 has no deduplication of its own, and an event is sent again when its
confirmation was lost (a connection dropped mid-batch) or not yet recorded (a ``kill -9`` right after
it, a journal replay). So the gateway publishes to a fanout exchange of its own,
``iotgw.<gateway_id>.<name>.out``, bound to the topic exchange and to a *ledger*: a durable queue
``iotgw.<gateway_id>.<name>.sent`` holding the newest ``dedupe_window`` messages (``x-max-length``,
oldest dropped). One publish reaches both in one routing decision, confirmed together. On every
(re)connection the ledger is read without being consumed (the messages return to it when the reading
channel closes), and an event whose id it holds, or that this connection already had confirmed, is
not published again: it counts as acknowledged. ``dedupe_window = 0`` publishes straight to the topic
exchange, with no ledger.

Downlink: a durable queue (``downlink_queue``) bound to the ``subscribe`` filters is consumed with
manual acknowledgements; what arrives is checked against the filters themselves (some have only a
broader AMQP binding) and handed to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast

import aiormq
import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from yarl import URL

from gateway.forward.base import (
    DestinationUnavailableError,
    InboundMessage,
    OutboundEvent,
    UnsendableEventError,
    acknowledged_prefix,
)
from gateway.forward.rabbitmq.routing import binding_key, routing_key_to_topic, topic_to_routing_key
from pipeline.errors import TopicError
from pipeline.queue import DropOldestQueue
from pipeline.retry import backoff_delay, stop_task, until_done
from pipeline.topics import compile_filter

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on
GATEWAY_HEADER: Final = "iotgw-gateway"
CE_PREFIX: Final = "cloudEvents:"
CE_CONTENT_TYPE: Final = "application/cloudevents+json"
CE_HEADERS: Final = ("specversion", "source", "subject", "dataschema")  # the rest are properties or in the body
PERSISTENT: Final = 2
CONNECT_TIMEOUT_S: Final = 5.0
ROUTING_KEY_CACHE: Final = 4096
# What a failing publish or connection raises: the connection or channel is gone, or the broker nacked.
AMQP_FAILURES: Final = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError,
                        OSError)


def _retry_delay(attempt: int) -> float:
    """Before the next attempt to connect: jittered, at most 10 s."""
    return backoff_delay(attempt, base_s=0.5, cap_s=10.0)


@dataclass(frozen=True, slots=True)
class RabbitSettings:
    url: str
    gateway_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr or a log
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    exchange: str = "iotgw"
    declare_exchange: bool = True
    queue: str | None = None  # a durable queue bound to ``topics``
    topics: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    own_prefix: str = "iotgw"  # the gateway's own exchange and queues: <prefix>.out, <prefix>.sent
    downlink_queue: str = ""
    dedupe_window: int = 10_000  # ids in the ledger; 0: no ledger
    confirm_timeout_s: float = 10.0
    heartbeat_s: int = 30
    prefetch: int = 100
    inbound_queue: int = 1000


def amqp_url(settings: RabbitSettings) -> URL:
    """The URL aiormq connects to: credentials, TLS files and heartbeat folded in."""
    url = URL(settings.url)
    if settings.ca_file or settings.cert_file:
        url = url.with_scheme("amqps")
    if settings.username is not None:
        url = url.with_user(settings.username)
    if settings.password is not None:
        url = url.with_password(settings.password)
    query = {"heartbeat": str(settings.heartbeat_s)}
    for key, value in (("cafile", settings.ca_file), ("certfile", settings.cert_file), ("keyfile", settings.key_file)):
        if value:
            query[key] = value
    return url.update_query(query)


def message_properties(event: OutboundEvent, gateway_id: str) -> Basic.Properties:
    """The AMQP properties of an event: persistent, its id as ``message_id``, and, for a CloudEvent,
    its attributes as properties and ``cloudEvents:`` headers (each header costs the publisher about
    4 µs to encode: only those AMQP has no property for)."""
    headers: dict[str, Any] = {GATEWAY_HEADER: gateway_id}
    content_type = "application/octet-stream"
    ce_type: str | None = None
    timestamp: datetime | None = None
    if event.payload[:1] == b"{":
        try:
            body = json.loads(event.payload)
        except ValueError:
            body = None
        if isinstance(body, dict):
            content_type = "application/json"
            if "specversion" in body and "type" in body:
                content_type = CE_CONTENT_TYPE
                for name in CE_HEADERS:
                    value = body.get(name)
                    if isinstance(value, str):
                        headers[CE_PREFIX + name] = value
                ce_type = body["type"] if isinstance(body["type"], str) else None
                timestamp = _time(body.get("time"))
    return Basic.Properties(
        content_type=content_type, delivery_mode=PERSISTENT, message_id=event.event_id, message_type=ce_type,
        timestamp=timestamp or datetime.fromtimestamp(event.created_ms / 1000, UTC), app_id="iotgw",
        headers=headers,
    )


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a publish's outcome as seen (a failure after the batch gave up on it is expected)."""
    if not task.cancelled():
        task.exception()


class RabbitDestination:
    def __init__(self, name: str, settings: RabbitSettings) -> None:
        self.name = name
        self._settings = settings
        self._url = amqp_url(settings)
        self._shown = str(URL(settings.url).with_user(None).with_query(None))  # no credentials in logs
        self._filters = tuple(compile_filter(f) for f in settings.subscribe)
        self._connection: aiormq.Connection | None = None
        self._channel: aiormq.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._inbound: DropOldestQueue[InboundMessage] = DropOldestQueue(settings.inbound_queue)
        self._out = f"{settings.own_prefix}.out"
        self._ledger = f"{settings.own_prefix}.sent"
        self._published: OrderedDict[str, None] = OrderedDict()  # ids the broker has, newest last
        # Published on this connection, in outbox order, not yet remembered: only a confirmed prefix is.
        self._unconfirmed: deque[tuple[str, asyncio.Future[Any]]] = deque()
        self._gap: str | None = None  # refused (or given up on): nothing after it is remembered till it is sent again
        self._keys: dict[str, str] = {}  # topic -> routing key: a gateway sends on the same topics again and again
        self._ready = False
        self._closing = False
        self.sent = 0
        self.acked = 0
        self.duplicates = 0  # events not published again: the broker had them

    @property
    def connected(self) -> bool:
        return self._ready and self._channel is not None and not self._channel.is_closed

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"forward {self.name} connection")

    async def _run(self) -> None:
        """Connect, prepare, serve until the connection or channel closes; again, forever."""
        while True:
            connection, channel = await until_done(
                self._open, what=f"forward {self.name}: connecting to {self._shown}", log=log,
                retry_on=(*AMQP_FAILURES, TimeoutError), delay=_retry_delay, level=logging.WARNING,
            )
            self._unconfirmed.clear()  # what the last connection published is failed or done
            self._gap = None
            self._connection, self._channel, self._ready = connection, channel, True
            log.warning("forward %s: connected to %s", self.name, self._shown)
            closings = [connection.closing, channel.closing]
            try:
                await asyncio.wait(closings, return_when=asyncio.FIRST_COMPLETED)
                for closing in closings:
                    if closing.done():
                        _retrieve(closing)  # why it closed is not news: the outage is logged below
            finally:
                self._ready = False
                with contextlib.suppress(Exception):
                    await connection.close()
            if not self._closing:
                log.warning("forward %s: lost %s", self.name, self._shown)

    async def _open(self) -> tuple[aiormq.Connection, aiormq.Channel]:
        connection = aiormq.Connection(self._url)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await connection.connect(client_properties={
                    "connection_name": f"iotgw {self._settings.gateway_id} {self.name}"})
                # the concrete channel: its basic_publish can skip waiting for the socket (``wait``)
                channel = cast(aiormq.Channel, await connection.channel(publisher_confirms=True))
                await self._prepare(channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection, channel

    async def _prepare(self, channel: aiormq.Channel) -> None:
        s = self._settings
        await channel.exchange_declare(s.exchange, exchange_type="topic", durable=True,
                                       passive=not s.declare_exchange)
        if s.dedupe_window:
            await channel.exchange_declare(self._out, exchange_type="fanout", durable=True)
            await channel.exchange_bind(s.exchange, self._out)
            await channel.queue_declare(self._ledger, durable=True, arguments={
                "x-max-length": s.dedupe_window, "x-overflow": "drop-head"})
            await channel.queue_bind(self._ledger, self._out)
            await self._read_ledger(channel)
        if s.queue:
            await channel.queue_declare(s.queue, durable=True)
            for pattern in s.topics:
                await channel.queue_bind(s.queue, s.exchange, routing_key=binding_key(compile_filter(pattern)).key)
        if self._filters:
            await channel.basic_qos(prefetch_count=s.prefetch)
            await channel.queue_declare(s.downlink_queue, durable=True)
            for f in self._filters:
                await channel.queue_bind(s.downlink_queue, s.exchange, routing_key=binding_key(f).key)
            await channel.basic_consume(s.downlink_queue, self._on_message, no_ack=False)

    async def _read_ledger(self, channel: aiormq.Channel) -> None:
        """The ids of what the broker already has: every message of the ledger, read on a channel of its
        own and left in place (unacknowledged messages return to their queue, in order, when it closes)."""
        connection = channel.connection
        reader = await connection.channel()
        try:
            waiting = (await reader.queue_declare(self._ledger, passive=True)).message_count or 0
            if not waiting:
                return
            ids: list[str] = []
            complete = asyncio.Event()

            async def take(message: DeliveredMessage) -> None:
                ids.append(message.header.properties.message_id or "")
                if len(ids) >= waiting:
                    complete.set()

            await reader.basic_qos(prefetch_count=0)
            await reader.basic_consume(self._ledger, take, no_ack=False)
            async with asyncio.timeout(max(CONNECT_TIMEOUT_S, waiting / 1000)):
                await complete.wait()
            self._remember(ids)
            log.info("forward %s: the broker has the last %d event(s) sent", self.name, len(ids))
        finally:
            with contextlib.suppress(Exception):
                await reader.close()

    def _remember(self, ids: Iterable[str]) -> None:
        published = self._published
        for event_id in ids:
            published[event_id] = None
            published.move_to_end(event_id)
        while len(published) > self._settings.dedupe_window:
            published.popitem(last=False)

    async def _on_message(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        headers = {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in (props.headers or {}).items()}
        try:
            topic = routing_key_to_topic(message.routing_key or "")
        except TopicError:
            topic = ""
        if topic and any(f.matches(topic) for f in self._filters):
            self._inbound.offer(InboundMessage(topic, message.body, props.message_id, headers.get(GATEWAY_HEADER),
                                               headers))
        if message.delivery_tag is not None:
            await message.channel.basic_ack(message.delivery_tag)

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        return await (await self.submit(batch))

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        """Publish ``batch`` now, pipelined in order on the channel (what is submitted next is published
        after it: the channel's lock serves the publishes in the order they were made); the future counts
        the confirms (see :class:`~gateway.forward.base.Pipelined`). Events are remembered as the broker's
        only as a confirmed prefix in outbox order, across pipelined batches: one confirmed after a gap
        before it (a nack, a timeout) is published again after the gap is, so the queue's last copy of
        each event is in per-device order (the consumer deduplicates by event id)."""
        channel = self._channel
        if channel is None or not self.connected:
            raise DestinationUnavailableError(f"{self.name}: not connected")
        s = self._settings
        exchange = self._out if s.dedupe_window else s.exchange
        loop = asyncio.get_running_loop()
        publishes: list[asyncio.Future[Any]] = []
        for event in batch:
            if event.event_id in self._published:  # the broker has it already
                done = loop.create_future()
                done.set_result(None)
                publishes.append(done)
                self.duplicates += 1
                continue
            try:
                key = self._routing_key(event.topic)
            except TopicError as exc:  # too long for a routing key: no AMQP form
                if not publishes:
                    raise UnsendableEventError(event, str(exc)) from None
                break  # send what precedes it; it comes first in the next batch
            publish = asyncio.ensure_future(channel.basic_publish(
                event.payload, exchange=exchange, routing_key=key, wait=False,
                properties=message_properties(event, s.gateway_id),
            ))
            if s.dedupe_window and event.event_id == self._gap:
                self._gap = None  # sent again: what follows it is in order once more
            if s.dedupe_window and self._gap is None:
                self._unconfirmed.append((event.event_id, publish))
                publish.add_done_callback(self._confirmed)
            else:
                publish.add_done_callback(_retrieve)
            publishes.append(publish)
            self.sent += 1
        return asyncio.ensure_future(self._acknowledged(publishes))

    def _confirmed(self, publish: asyncio.Future[Any]) -> None:
        """Remember the confirmed prefix of what was published; a failure ends it until it is sent again."""
        _retrieve(publish)
        unconfirmed = self._unconfirmed
        while unconfirmed and unconfirmed[0][1].done():
            event_id, head = unconfirmed.popleft()
            if head.cancelled() or head.exception() is not None:
                self._gap = event_id
                unconfirmed.clear()  # confirmed or not, published again after the gap
                return
            self._remember((event_id,))

    async def _acknowledged(self, publishes: list[asyncio.Future[Any]]) -> int:
        acked = await acknowledged_prefix(self.name, publishes, self._settings.confirm_timeout_s, AMQP_FAILURES)
        self.acked += acked
        return acked

    def _routing_key(self, topic: str) -> str:
        key = self._keys.get(topic)
        if key is None:
            key = topic_to_routing_key(topic)
            if len(self._keys) >= ROUTING_KEY_CACHE:
                self._keys.clear()
            self._keys[topic] = key
        return key

    async def inbound(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self._inbound.get()

    async def close(self) -> None:
        self._closing = True
        await stop_task(self._task)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._ready = False
