"""The site's own MQTT broker (Mosquitto beside Home Assistant, say), attached to as a client instead of
embedding one (``[broker] mode = "external"``).

The gateway subscribes at QoS 1, with a persistent session, to the raw stage of its taxonomy, the topics
of its dialects (pipeline/dialects.py) and any ``subscribe`` filters (as ``$share/<group>/...`` when
several gateways share the load). paho's network loop runs in its own thread; each delivery is handed to
the event loop through a bounded inbox and given to :class:`~gateway.broker.embedded.Ingest`, like a
message the embedded broker read. Its PUBACK (paho ``manual_ack``) goes out only once the futures ingest
returned have resolved: the message is in the journal (and in the outboxes that forward it). A ``kill -9``
at any moment leaves every unacknowledged message with the broker, which sends it again (DUP, same packet
id, so the journal gives it the event id it already had). When the pipeline falls behind, the inbox fills,
paho's thread waits in its callback and stops reading the socket; the broker holds the rest (an MQTT 5
Receive Maximum bounds what it sends ahead). Retained messages are old values re-sent on subscribing,
not readings: they are skipped (counted).

What the gateway publishes (its pipeline's events, alerts, commands for devices) goes to that broker, and
through ingest to the outboxes, as the embedded broker's in-process publishes do. A driver's reading is
ingested without going out to the broker: the gateway's own subscription would read it back.

The connection is watched like any peer: lost and regained are logged once each; the gateway's retained
online/offline status is its birth message and last will (gateway/forward/mqtt/connect.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.broker.embedded import Ingest, Resend, Traffic
from gateway.config import ExternalBrokerSettings
from gateway.forward.mqtt.connect import Presence, announce, protocol_name, session_properties, set_will, tls_context
from pipeline.topics import TopicFilter

log = logging.getLogger(__name__)
CONNECT_WAIT_S = 5.0  # at start, how long to wait for the first CONNACK before going on without it
GOODBYE_WAIT_S = 2.0  # at stop, how long the offline status may take to be acknowledged
_DRAIN_POLL_S = 0.02
_PROTOCOL_REFUSED = (1, 0x84)  # 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"


@dataclass(frozen=True, slots=True)
class _Delivery:
    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    generation: int  # which connection it came on: a PUBACK is only valid on that one


class ExternalBroker:
    """``async with ExternalBroker(...)``: subscribed (or connecting, if the broker is away) on exit of
    ``__aenter__``; what the composition root asks of a broker (gateway/broker/base.py)."""

    def __init__(
        self, settings: ExternalBrokerSettings, ingest: Ingest, *, client_id: str, filters: Sequence[str],
        raw_filter: str, presence: Presence | None = None, traffic: Traffic | None = None,
    ) -> None:
        """``filters``: what the pipeline reads (the raw stage, the dialects' topics); ``raw_filter``: the raw
        stage, which in-process publishes do not echo to the broker."""
        self._settings = settings
        self._ingest = ingest
        self._client_id = client_id
        wanted = dict.fromkeys([*filters, *settings.subscribe])
        group = settings.shared_group
        self.subscriptions = [f"$share/{group}/{f}" if group else f for f in wanted]
        self._raw = TopicFilter(raw_filter, "mqtt")
        self._presence = presence
        self._traffic = traffic
        self._origin = f"mqtt:{settings.host}:{settings.port}"
        self._version = (MQTTProtocolVersion.MQTTv311 if settings.protocol == "3.1.1"
                         else MQTTProtocolVersion.MQTTv5)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        # The hand-off from paho's thread: a deque, a wake-up scheduled once per burst, and a bound.
        self._inbox: collections.deque[_Delivery] = collections.deque()
        self._room = threading.BoundedSemaphore(settings.max_inflight)
        self._wake = asyncio.Event()
        self._scheduled = False
        self._ingesting = False
        self._consumer: asyncio.Task[None] | None = None
        self._generation = 0
        self._draining = False
        self._closing = False
        self._connected = False
        self._first_connect = asyncio.Event()
        self._refusal: str | None = None
        self._on_connected: list[Callable[[], Awaitable[None]]] = []
        self.protocol_in_use = ""
        self.port = settings.port
        self.security = None
        self.received = 0
        self.acknowledged = 0
        self.retained_skipped = 0
        self.tapped = 0
        self.published = 0
        self.publish_failures = 0
        self.ingest_failures = 0
        self.disconnects = 0

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._consumer = asyncio.create_task(self._consume(), name="external broker: ingest")
        self._connect()
        try:
            await asyncio.wait_for(self._first_connect.wait(), CONNECT_WAIT_S)
        except TimeoutError:
            log.warning("external broker %s:%d not reachable yet; the gateway runs and keeps trying",
                        self._settings.host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._draining = True
        self._closing = True
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        client = self._client
        if client is None:
            return
        if self._connected:  # a clean disconnect sends no will: say so ourselves
            info = announce(client, self._presence, online=False)
            if info is not None:
                await asyncio.to_thread(info.wait_for_publish, GOODBYE_WAIT_S)
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._connected = False

    def _connect(self) -> None:
        s = self._settings
        v5 = self._version == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=self._version,
            clean_session=None if v5 else False, manual_ack=True,
        )
        if s.username:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls_on:
            tls = s.tls
            client.tls_set_context(tls_context(tls.ca_file if tls else None, tls.cert_file if tls else None,
                                               tls.key_file if tls else None))
        set_will(client, self._presence)
        client.max_inflight_messages_set(100)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if v5:
            client.connect_async(s.host, s.port, keepalive=s.keepalive_s, clean_start=False,
                                 properties=session_properties(s.session_expiry_s, s.max_inflight))
        else:
            client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client = client
        client.loop_start()

    def when_connected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` (on the event loop) after every (re)connection: retained messages of the
        gateway's own (Home Assistant's discovery) are published again."""
        self._on_connected.append(callback)

    # --- paho's thread ------------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            if (reason.value in _PROTOCOL_REFUSED and self._settings.protocol == "auto"
                    and self._version == MQTTProtocolVersion.MQTTv5):
                self._version = MQTTProtocolVersion.MQTTv311
                self._call(self._reconnect_as_311)
                return
            self._call(self._refused, str(reason))
            return
        self._generation += 1  # PUBACKs for deliveries of an earlier connection are not sent on this one
        self.protocol_in_use = protocol_name(self._version)
        if self._version == MQTTProtocolVersion.MQTTv5:
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            client.subscribe([(f, options) for f in self.subscriptions])
        else:
            client.subscribe([(f, 1) for f in self.subscriptions])
        announce(client, self._presence, online=True)
        self._call(self._set_connected, True, bool(getattr(flags, "session_present", False)))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._call(self._refused, "cannot connect")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if (not self.protocol_in_use and self._settings.protocol == "auto"
                and self._version == MQTTProtocolVersion.MQTTv5 and not self._closing):
            # Closed before a CONNACK we could read: a 3.1.1-only broker answers an MQTT 5 CONNECT so.
            self._version = MQTTProtocolVersion.MQTTv311
            self._call(self._reconnect_as_311)
        self._call(self._set_connected, False, False, str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        if self._draining:
            return  # not acknowledged: the broker sends it again when the gateway is back
        if msg.retain:  # an old value sent because we subscribed, not a reading
            self.retained_skipped += 1
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        while not self._room.acquire(timeout=0.5):  # the pipeline is behind: stop reading the socket
            if self._closing:
                return
        self._inbox.append(_Delivery(msg.topic, bytes(msg.payload), msg.mid, msg.qos, msg.dup, self._generation))
        if not self._scheduled:
            self._scheduled = True
            self._call(self._wake.set)

    # --- the event loop ---------------------------------------------------------------------------------

    def _reconnect_as_311(self) -> None:
        log.warning("external broker %s:%d does not speak MQTT 5; using 3.1.1", self._settings.host, self.port)
        old = self._client
        if old is not None:
            old.disconnect()
            threading.Thread(target=old.loop_stop, daemon=True).start()  # never join paho's thread from itself
        self._connect()

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

    async def _consume(self) -> None:
        """Deliveries to ingest, in the order they arrived; each acknowledged once what ingest wrote is durable."""
        inbox = self._inbox
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._scheduled = False
            while inbox:
                delivery = inbox.popleft()
                self._ingesting = True
                try:
                    futures = await self._ingest(
                        delivery.topic, delivery.payload, self._origin, None,
                        Resend(delivery.mid, delivery.dup) if delivery.qos else None,
                    )
                except Exception:  # not taken: no PUBACK, so the broker sends it again after a reconnect
                    self.ingest_failures += 1
                    log.exception("external broker: could not take a message on %s", delivery.topic)
                    continue
                finally:
                    self._ingesting = False
                    self._room.release()
                self.tapped += 1
                if self._traffic is not None:
                    self._traffic.published(delivery.topic, self._origin)
                if delivery.qos:
                    self._ack_when(delivery, futures)

    def _ack_when(self, delivery: _Delivery, futures: Sequence[asyncio.Future[None]]) -> None:
        if not futures:
            self._ack(delivery, None)
        elif len(futures) == 1:
            futures[0].add_done_callback(partial(self._ack, delivery))
        else:
            asyncio.gather(*futures).add_done_callback(partial(self._ack, delivery))

    def _ack(self, delivery: _Delivery, durable: asyncio.Future[Any] | None) -> None:
        if durable is not None and (durable.cancelled() or durable.exception() is not None):
            return  # not durable: no PUBACK (the broker sends it again)
        client = self._client
        if client is None or delivery.generation != self._generation:
            return  # that connection is gone; the broker sends the message again on this one
        client.ack(delivery.mid, delivery.qos)
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

    async def publish_retained(self, topic: str, payload: bytes) -> bool:
        """A retained message of the gateway's own (QoS 1), straight to the broker; False when not connected
        (publish it again from a :meth:`when_connected` callback)."""
        return self._send(topic, payload, 1, retain=True)

    def _send(self, topic: str, payload: bytes, qos: int, *, retain: bool) -> bool:
        client = self._client
        if client is None or not self._connected:
            self.publish_failures += 1
            return False
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.publish_failures += 1
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
                "retained_skipped": self.retained_skipped, "pending": self.pending_deliveries(),
                "published": self.published, "publish_failures": self.publish_failures,
                "disconnects": self.disconnects,
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
