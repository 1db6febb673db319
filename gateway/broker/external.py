"""The site's own MQTT broker (Mosquitto beside Home Assistant, say), attached to as a client instead of
embedding one (``[broker] mode = "external"``).

The gateway subscribes at QoS 1, with a persistent session, to the raw stage of its taxonomy, the topics
of its dialects (pipeline/dialects.py) and any ``subscribe`` filters (as ``$share/<group>/...`` when
several gateways share the load). The client is the gateway's own, on the event loop
(gateway/broker/mqtt_client.py: MQTT 3.1.1 and 5, no thread). Each delivery goes through an inbox to
:class:`~gateway.broker.embedded.Ingest`, like a message the embedded broker read. Its PUBACK goes out only
once the futures ingest returned have resolved: the message is in the journal (and in the outboxes that
forward it); once what arrived is ingested, the journal is asked to commit without waiting for more
(``commit_soon``), since the broker may send nothing more until those PUBACKs. A ``kill -9`` at any moment
leaves every unacknowledged message with the broker, which sends it again (DUP, same packet id, so the
journal gives it the event id it already had). When the pipeline falls behind, the inbox fills to
``max_inflight`` and the socket is no longer read; the broker holds the rest (under MQTT 5 it is also told
``max_inflight`` as the Receive Maximum: how many deliveries it may send ahead of their PUBACKs). Retained
messages are old values re-sent on subscribing, not readings: they are skipped (counted); so are messages
over ``max_packet_bytes``, which are never buffered.

What the gateway publishes (its pipeline's events, alerts, commands for devices) goes to that broker, and
through ingest to the outboxes, as the embedded broker's in-process publishes do. A driver's reading is
ingested without going out to the broker: the gateway's own subscription would read it back.

The connection is watched like any peer: lost and regained are logged once each; the gateway's retained
online/offline status is its birth message and last will.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self

from gateway.broker.embedded import Ingest, Resend, Traffic
from gateway.broker.mqtt_client import MqttClient, Publish, Will
from gateway.config import ExternalBrokerSettings
from gateway.forward.mqtt.connect import Presence, tls_context
from pipeline.retry import stop_task
from pipeline.topics import SeenTopics, TopicFilter

log = logging.getLogger(__name__)
CONNECT_WAIT_S = 5.0  # at start, how long to wait for the first CONNACK before going on without it
GOODBYE_WAIT_S = 2.0  # at stop, how long the offline status may take to be acknowledged
_DRAIN_POLL_S = 0.02
_ACK_GROUP = 64  # deliveries of a burst whose PUBACKs wait on one callback (see ExternalBroker._ack_group)


class ExternalBroker:
    """``async with ExternalBroker(...)``: subscribed (or connecting, if the broker is away) on exit of
    ``__aenter__``; what the composition root asks of a broker (gateway/broker/base.py)."""

    def __init__(
        self, settings: ExternalBrokerSettings, ingest: Ingest, *, client_id: str, filters: Sequence[str],
        raw_filter: str, presence: Presence | None = None, traffic: Traffic | None = None,
        commit_soon: Callable[[], None] | None = None,
    ) -> None:
        """``filters``: what the pipeline reads (the raw stage, the dialects' topics); ``raw_filter``: the raw
        stage, which in-process publishes do not echo to the broker; ``commit_soon``: called when what arrived
        is all ingested and its PUBACKs wait for the journal (gateway/journal.py ``Journal.hurry``)."""
        self._settings = settings
        self._ingest = ingest
        self._client_id = client_id
        wanted = dict.fromkeys([*filters, *settings.subscribe])
        group = settings.shared_group
        self.subscriptions = [f"$share/{group}/{f}" if group else f for f in wanted]
        self._raw = SeenTopics(TopicFilter(raw_filter, "mqtt"))  # topics repeat: each matched once
        self._presence = presence
        self._traffic = traffic
        self._commit_soon = commit_soon
        self._origin = f"mqtt:{settings.host}:{settings.port}"
        self._link: _Link | None = None
        # Deliveries on their way to ingest, in order: appended by the link as packets are read, taken by one
        # consumer task woken once per burst.
        self._inbox: collections.deque[Publish] = collections.deque()
        self._wake = asyncio.Event()
        self._ingesting = False
        self._consumer: asyncio.Task[None] | None = None
        self._draining = False
        self._closing = False
        self._connected = False
        self._first_connect = asyncio.Event()
        self._refusal: str | None = None
        self._on_connected: list[Callable[[], Awaitable[None]]] = []
        self.port = settings.port
        self.security = None
        self.received = 0
        self.acknowledged = 0
        self.retained_skipped = 0
        self.oversized_skipped = 0
        self.tapped = 0
        self.published = 0
        self._send_failures = 0
        self.ingest_failures = 0
        self.disconnects = 0

    @property
    def protocol_in_use(self) -> str:
        return self._link.protocol_in_use if self._link is not None else ""

    @property
    def publish_failures(self) -> int:
        """Publishes not sent for want of a connection, and QoS 1 ones the broker refused (MQTT 5)."""
        return self._send_failures + (self._link.publishes_refused if self._link is not None else 0)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._consumer = asyncio.create_task(self._consume(), name="external broker: ingest")
        self._link = _Link(self, self._settings, self._client_id, self._presence)
        self._link.start()
        try:
            async with asyncio.timeout(CONNECT_WAIT_S):
                await self._first_connect.wait()
        except TimeoutError:
            log.warning("external broker %s:%d not reachable yet; the gateway runs and keeps trying",
                        self._settings.host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._draining = True
        self._closing = True
        try:
            await stop_task(self._consumer)
        finally:  # the connection closes (with its goodbye) whatever the consumer's stop raised
            if self._link is not None:
                await self._link.close(goodbye=self._connected)
            self._connected = False

    def when_connected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` (on the event loop) after every (re)connection: retained messages of the
        gateway's own (Home Assistant's discovery) are published again."""
        self._on_connected.append(callback)

    # --- what the link tells it --------------------------------------------------------------------------

    def _screen(self, *, retain: bool, oversized: bool = False) -> Literal["take", "ack", "leave"]:
        """What to do with a message the broker delivered: ingest it, only acknowledge it, or leave it unacknowledged
        (the broker sends it again when the gateway is back)."""
        self.received += 1
        if self._draining:
            return "leave"
        if retain:  # an old value sent because we subscribed, not a reading
            self.retained_skipped += 1
            return "ack"
        if oversized:  # never readable here: refusing it would have the broker send it again forever
            self.oversized_skipped += 1
            if self.oversized_skipped == 1:
                log.warning("external broker: a message over max_packet_bytes (%d) skipped (counted from now on)",
                            self._settings.max_packet_bytes)
            return "ack"
        return "take"

    def _wake_up(self) -> None:
        self._wake.set()

    def _refused(self, why: str) -> None:
        if why != self._refusal:
            log.warning("external broker %s:%d: %s (retrying)", self._settings.host, self.port, why)
        self._refusal = why

    def _set_connected(self, connected: bool, session_present: bool, why: str = "") -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            self._refusal = None
            self._first_connect.set()
            log.warning("external broker: connected to %s:%d (MQTT %s, %s session); reading %s",
                        self._settings.host, self.port, self.protocol_in_use,
                        "resumed" if session_present else "new", ", ".join(self.subscriptions))
            for callback in self._on_connected:
                asyncio.ensure_future(callback())  # noqa: RUF006  (each logs its own failure)
        elif not self._closing:
            self.disconnects += 1
            log.warning("external broker: lost %s:%d (%s); reconnecting", self._settings.host, self.port, why)

    # --- the event loop ---------------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Deliveries to ingest, in the order they arrived; each acknowledged once what ingest wrote is durable."""
        inbox = self._inbox
        ingest, origin = self._ingest, self._origin
        while True:
            await self._wake.wait()
            self._wake.clear()
            link = self._link
            waiting = False  # for PUBACKs: the broker may send no more until they go out
            topics: dict[str, int] = {}  # messages taken, by topic: counted as traffic once a burst
            group: list[tuple[Publish, Sequence[asyncio.Future[None]]]] = []  # taken, to acknowledge once durable
            try:
                while inbox:
                    delivery = inbox.popleft()
                    self._ingesting = True
                    try:
                        futures = await ingest(delivery.topic, delivery.payload, origin, None,
                                               Resend(delivery.packet_id, delivery.dup) if delivery.qos else None)
                    except Exception:
                        self._not_taken(delivery, link)
                        continue
                    finally:
                        self._ingesting = False
                        if link is not None:
                            link.taken()
                    self.tapped += 1
                    topics[delivery.topic] = topics.get(delivery.topic, 0) + 1
                    if delivery.qos:
                        waiting = True
                        if not futures:
                            self._ack(delivery, None)
                        else:
                            group.append((delivery, futures))
                            if len(group) >= _ACK_GROUP:  # a long burst (a full queue holds us here)
                                self._ack_group(group)
                                group = []
                                self._count_traffic(topics)
            finally:  # stopped mid-burst too: what was taken is acknowledged once durable, and counted
                if group:
                    self._ack_group(group)
                self._count_traffic(topics)
            if waiting and self._commit_soon is not None:  # the broker may send no more till the PUBACKs go
                self._commit_soon()

    def _count_traffic(self, topics: dict[str, int]) -> None:
        """The traffic learner is told the topics taken since it was last told, with their counts."""
        if self._traffic is not None:
            for topic, count in topics.items():
                self._traffic.published(topic, self._origin, count)
        topics.clear()

    def _not_taken(self, delivery: Publish, link: _Link | None) -> None:
        """Ingest refused a delivery (raised): no PUBACK; the connection is dropped so that the broker sends it
        again (it would hold an in-flight slot until the next reconnect)."""
        self.ingest_failures += 1
        if self.ingest_failures == 1:
            log.exception("external broker: could not take a message on %s (reconnecting; traceback once)",
                          delivery.topic)
        if delivery.qos and link is not None:
            link.drop(delivery.generation, "a message could not be taken")

    def _ack_group(self, group: list[tuple[Publish, Sequence[asyncio.Future[None]]]]) -> None:
        """PUBACKs for deliveries taken one after the other, once the last one's first write is durable: the
        journal's, for a raw-stage message (gateway/ingest.py), and the journal commits in order, so one callback
        mostly serves the whole group. Not its last write: an outbox's, on the outbox's own cadence, would hold
        the whole group back. A delivery whose writes are not all durable by then waits for them on its own."""
        group[-1][1][0].add_done_callback(partial(self._acked_group, group))

    def _acked_group(self, group: list[tuple[Publish, Sequence[asyncio.Future[None]]]], _: object) -> None:
        for delivery, futures in group:
            durable = _durable(futures)
            if durable is None:
                self._ack_when(delivery, futures)
            elif durable:
                self._ack(delivery, None)
            # else a write failed: no PUBACK (the broker sends it again)

    def _ack_when(self, delivery: Publish, futures: Sequence[asyncio.Future[None]]) -> None:
        """The PUBACK once ``futures`` (one at least) are all durable."""
        if len(futures) == 1:
            futures[0].add_done_callback(partial(self._ack, delivery))
        else:
            asyncio.gather(*futures).add_done_callback(partial(self._ack, delivery))

    def _ack(self, delivery: Publish, durable: asyncio.Future[Any] | None) -> None:
        if durable is not None and (durable.cancelled() or durable.exception() is not None):
            return  # not durable: no PUBACK (the broker sends it again)
        link = self._link
        if link is not None and link.ack(delivery.packet_id, delivery.generation):
            self.acknowledged += 1

    # --- what the gateway publishes ---------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None, qos: int = 0
    ) -> None:
        """As the embedded broker's in-process publish: ingest sees it (a driver's reading is journaled, an
        event routed to the outboxes); then it goes to the broker, but for a driver's raw reading."""
        await self._ingest(topic, payload, origin, event_id, None)
        if self._traffic is not None:
            self._traffic.published(topic, origin)
        if not self._raw.matches(topic):
            self._send(topic, payload, max(qos, self._settings.publish_qos), retain=False)

    async def publish_many(self, topic: str, payloads: Sequence[bytes], event_ids: Sequence[str]) -> None:
        """Events of the gateway's own on one topic (a batch's valid events), each as :meth:`publish` takes it,
        with what depends only on the topic done once: counted as traffic once, written to the broker at once."""
        ingest = self._ingest
        for payload, event_id in zip(payloads, event_ids, strict=True):
            await ingest(topic, payload, None, event_id, None)
        if self._traffic is not None:
            self._traffic.published(topic, None, len(payloads))
        if self._raw.matches(topic) or not payloads:
            return
        link = self._link
        sent = link.send_many(topic, payloads, self._settings.publish_qos) if link is not None and self._connected \
            else 0
        self.published += sent
        self._send_failures += len(payloads) - sent

    async def publish_retained(self, topic: str, payload: bytes) -> bool:
        """A retained message of the gateway's own (QoS 1), straight to the broker; False when not connected
        (publish it again from a :meth:`when_connected` callback)."""
        return self._send(topic, payload, 1, retain=True)

    def _send(self, topic: str, payload: bytes, qos: int, *, retain: bool) -> bool:
        link = self._link
        if link is None or not self._connected or not link.send(topic, payload, qos, retain=retain):
            self._send_failures += 1
            return False
        self.published += 1
        return True

    def has_subscriber(self, topic: str) -> bool:
        """Not known on a broker we do not run: a command for a device is taken as delivered once published."""
        return True

    # --- stop and status ---------------------------------------------------------------------------------

    def pending_deliveries(self) -> int:
        return len(self._inbox) + int(self._ingesting)

    async def drain(self, timeout_s: float) -> int:
        """Take no more deliveries (those that come are not acknowledged: the broker keeps them for the next
        run), and wait until what arrived has reached the pipeline. Returns what was left at the deadline."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while (pending := self.pending_deliveries()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_S)
        return pending

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def serving(self) -> bool:
        """Connected to the broker (``/readyz``); an outage is reported there, not as a watchdog failure."""
        return self._connected and not self._draining

    @property
    def clients(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {
            "mode": "external",
            "external": {
                "url": self._settings.url, "client_id": self._client_id, "connected": self._connected,
                "protocol": self.protocol_in_use, "subscriptions": list(self.subscriptions),
                "received": self.received, "acknowledged": self.acknowledged,
                "retained_skipped": self.retained_skipped, "oversized_skipped": self.oversized_skipped,
                "pending": self.pending_deliveries(), "published": self.published,
                "publish_failures": self.publish_failures, "disconnects": self.disconnects,
                "subscriptions_refused": self._link.subscriptions_refused if self._link is not None else 0,
                "subscriptions_at_qos0": self._link.subscriptions_at_qos0 if self._link is not None else 0,
            },
            # The embedded broker's sections, empty: the site's broker keeps its own sessions and bounds.
            "connections": 0,
            "sessions": {"clients": 0, "persistent": 0, "connected": 0, "queued": 0, "bytes": 0, "dropped": {},
                         "dropped_total": 0, "commits": 0},
            "retained": {"messages": 0, "bytes": 0},
            "limits": dict.fromkeys(("connections_refused", "connections_refused_per_address", "logins_throttled",
                                     "filters_refused", "sessions_refused", "sessions_expired",
                                     "queued_bytes_evicted", "retained_refused"), 0),
            "offences": {},
        }


def _durable(futures: Sequence[asyncio.Future[None]]) -> bool | None:
    """Whether writes are durable: True, all of them; False, one failed; None, one is still under way."""
    failed = False
    for future in futures:
        if not future.done():
            return None
        failed = failed or future.cancelled() or future.exception() is not None
    return not failed


class _Link:
    """The broker's session, through the gateway's own client (gateway/broker/mqtt_client.py). When the inbox
    holds ``max_inflight`` deliveries the socket is no longer read; reading resumes once it is half empty."""

    def __init__(self, broker: ExternalBroker, settings: ExternalBrokerSettings, client_id: str,
                 presence: Presence | None) -> None:
        self._broker = broker
        self._presence = presence
        self._high = settings.max_inflight
        self._low = settings.max_inflight // 2
        tls = settings.tls
        self._client = MqttClient(
            self, settings.host, settings.port, client_id=client_id, subscriptions=broker.subscriptions,
            protocol=settings.protocol, session_expiry_s=settings.session_expiry_s,
            receive_maximum=settings.max_inflight, keepalive_s=settings.keepalive_s, username=settings.username,
            password=settings.password.get_secret_value() if settings.username and settings.password else None,
            will=Will(presence.topic, presence.offline.encode()) if presence is not None else None,
            tls=tls_context(tls.ca_file if tls else None, tls.cert_file if tls else None, tls.key_file if tls else None)
            if settings.tls_on else None,
            max_packet_bytes=settings.max_packet_bytes,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def protocol_in_use(self) -> str:
        return self._client.protocol_in_use

    def start(self) -> None:
        self._task = asyncio.create_task(self._client.run(), name="external broker: connection")

    # what the client tells it (mqtt_client.ClientHandler)

    def message(self, message: Publish) -> None:
        broker = self._broker
        what = broker._screen(retain=message.retain, oversized=message.oversized)
        if what == "take":
            inbox = broker._inbox
            inbox.append(message)
            if len(inbox) >= self._high and not self._client.paused:
                self._client.pause_reading()  # the pipeline is behind: the broker holds the rest
            broker._wake_up()
        elif what == "ack" and message.qos:
            self._client.ack(message.packet_id, message.generation)

    def connected(self, session_present: bool) -> None:
        if self._presence is not None:
            self._client.publish(self._presence.topic, self._presence.online.encode(), 1, retain=True)
        self._broker._set_connected(True, session_present)

    def lost(self, why: str) -> None:
        self._broker._set_connected(False, False, why)

    def refused(self, why: str) -> None:
        self._broker._refused(why)

    # what ExternalBroker asks of it

    def ack(self, packet_id: int, generation: int) -> bool:
        """PUBACK on connection ``generation``, if it is still the one (else the broker sends the message again)."""
        return self._client.ack(packet_id, generation)

    @property
    def publishes_refused(self) -> int:
        return self._client.publishes_refused

    @property
    def subscriptions_refused(self) -> int:
        return self._client.subscribe_failures

    @property
    def subscriptions_at_qos0(self) -> int:
        return self._client.subscriptions_at_qos0

    def drop(self, generation: int, why: str) -> None:
        """Close connection ``generation`` if it is still the one (it reconnects, with the usual wait)."""
        self._client.drop(generation, why)

    def send(self, topic: str, payload: bytes, qos: int, *, retain: bool) -> bool:
        return self._client.publish(topic, payload, qos, retain=retain) is not None

    def send_many(self, topic: str, payloads: Sequence[bytes], qos: int) -> int:
        return self._client.publish_many(topic, payloads, qos)

    def taken(self) -> None:
        if self._client.paused and len(self._broker._inbox) <= self._low:
            self._client.resume_reading()

    async def close(self, *, goodbye: bool) -> None:
        """Stop; with ``goodbye``, publish the offline status first (a clean disconnect sends no will)."""
        client = self._client
        if goodbye and self._presence is not None:
            packet_id = client.publish(self._presence.topic, self._presence.offline.encode(), 1, retain=True)
            if packet_id:
                await client.published(packet_id, GOODBYE_WAIT_S)
        await client.disconnect()
        await stop_task(self._task)
