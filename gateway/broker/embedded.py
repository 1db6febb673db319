"""The embedded MQTT broker (amqtt) and the tap that feeds the pipeline in-process.

Every message published to the broker, by a TCP client or by an in-process driver, passes
through :meth:`_TappedBroker._broadcast_message`. Messages whose topic matches the tap filter
(the ``raw`` stage) are put on the pipeline's bounded queue there. When that queue is full the put
waits, and every client's socket reader waits too, so a slow pipeline slows ingestion instead of
growing memory.

Patches carried for MQTT 3.1.1 (amqtt 0.12.1 falls short; see gateway/broker/sessions.py and
gateway/broker/firewall.py for the details and the spec sections):

- delivery goes through :class:`gateway.sessions.Sessions` instead of amqtt's broadcast queue:
  min(publish, subscription) QoS [MQTT-3.8.4-6], offline queueing for CleanSession 0
  [MQTT-3.1.2-5], redelivery on reconnect [MQTT-4.4.0-1], bounded per-client queues, persistence;
- every socket is read through :class:`gateway.firewall.PacketFirewall` (malformed packets close
  the connection and are counted; keep-alive expiry closes it, so the will is published
  [MQTT-3.1.2-24], [MQTT-3.1.2-8]);
- retained messages go to a client only for the subscription it has just made [MQTT-3.3.1-6];
  amqtt also sends, on every connect, those matching any filter any client subscribed to;
- subscribing again to a filter replaces its QoS [MQTT-3.8.4-3] (amqtt kept the old one);
- a QoS 2 PUBCOMP to a publisher waits for durability like a QoS 1 PUBACK, and a PUBREL the
  broker does not know (sent again after a restart) is still answered [MQTT-4.3.3-2];
- amqtt's session monitor discards a disconnected CleanSession 0 session after a second when its
  client authenticated anonymously; here only clean sessions end with their connection
  [MQTT-3.1.2-4].
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import amqtt.broker as amqtt_broker_module
from amqtt.adapters import (
    ReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
)
from amqtt.broker import Action, Broker
from amqtt.errors import BrokerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.session import INCOMING, Session

from gateway.broker.auth import BrokerSecurity, SecureBrokerMixin, broker_plan
from gateway.broker.firewall import PacketFirewall
from gateway.broker.sessions import ClientQueue, Sessions
from gateway.config import BrokerSettings
from gateway.errors import GatewayError, PortInUseError
from pipeline.topics import topic_matches

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.02
_SUBSCRIBE_REFUSED = 0x80  # the SUBACK return code of a refused filter


class Ingest(Protocol):
    """What the broker hands every message to. It returns futures that resolve once the message is
    durable (journal, outboxes); a QoS 1 PUBACK goes out only after they have."""

    async def __call__(
        self, topic: str, payload: bytes, origin: str | None, event_id: str | None, resend: Resend | None
    ) -> Sequence[asyncio.Future[None]]: ...


class Traffic(Protocol):
    """Told about every publish and subscription, for the event catalog to learn producers and consumers
    (pipeline.traffic.TrafficLearner). Called on the broker's path: must be cheap and must not block."""

    def published(self, topic: str, origin: str | None) -> None: ...

    def subscribed(self, client: str, topic_filter: str) -> None: ...

    def unsubscribed(self, client: str, topic_filter: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Resend:
    """A QoS 1/2 message's packet id, and whether the client marked it as sent before (DUP)."""

    packet_id: int
    dup: bool


@dataclass(frozen=True, slots=True)
class _PublishMeta:
    origin: str | None
    event_id: str | None


_PUBLISH_META: ContextVar[_PublishMeta | None] = ContextVar("iotgw_publish_meta", default=None)
_DELIVERING: ContextVar[Any] = ContextVar("iotgw_delivering", default=None)
_SUBSCRIBING: ContextVar[bool] = ContextVar("iotgw_subscribing", default=False)
_AWAITING_DURABILITY: dict[int, asyncio.Future[None]] = {}  # id(incoming QoS 1 message) -> its PUBACK gate


class _DurableHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """Sends the PUBACK of an incoming QoS 1 message only once the gateway has it durably.

    amqtt acknowledges as soon as the message is in its in-memory session queue; a crash then loses
    it although the device was told it arrived. Here the message carries a future that the broker
    resolves when what it was handed to (journal, outboxes) has committed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pubcomp_gates: dict[int, asyncio.Future[None]] = {}

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != INCOMING:
            await super()._handle_qos1_message_flow(app_message)
            return
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _AWAITING_DURABILITY[id(app_message)] = durable  # amqtt's messages have __slots__: keep it aside
        try:
            await self.session.delivered_message_queue.put(app_message)
            await durable
        finally:
            _AWAITING_DURABILITY.pop(id(app_message), None)
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        """Likewise for QoS 2: the PUBCOMP waits until the message is durable (amqtt hands it over
        at PUBREL; what is lost before that is a message the client still holds until PUBCOMP)."""
        if app_message.direction != INCOMING:
            await super()._handle_qos2_message_flow(app_message)
            return
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _AWAITING_DURABILITY[id(app_message)] = durable
        self._pubcomp_gates[app_message.packet_id] = durable
        try:
            await super()._handle_qos2_message_flow(app_message)
        finally:
            _AWAITING_DURABILITY.pop(id(app_message), None)
            if self._pubcomp_gates.get(app_message.packet_id) is durable:
                del self._pubcomp_gates[app_message.packet_id]

    async def handle_pubrel(self, pubrel: Any) -> None:
        """[MQTT-4.3.3-2]: a PUBREL is answered with PUBCOMP, known packet id or not. amqtt ignores
        one it does not know (a QoS 2 flow from before a restart), and the client's flow never ends."""
        if pubrel.packet_id in self._pubrel_waiters:
            await super().handle_pubrel(pubrel)
        else:
            await self._send_packet(PubcompPacket.build(pubrel.packet_id))

    async def _send_packet(self, packet: Any) -> None:
        if isinstance(packet, PubcompPacket) and (gate := self._pubcomp_gates.get(packet.packet_id)) is not None:
            await gate
        await super()._send_packet(packet)


amqtt_broker_module.BrokerProtocolHandler = _DurableHandler  # a patch carried by the project (see above)


def _settle(durable: asyncio.Future[None], futures: Sequence[asyncio.Future[None]]) -> None:
    """Resolve ``durable`` when every future has (with the first failure, if any)."""
    if not futures:
        if not durable.done():
            durable.set_result(None)
        return

    def done(gathered: asyncio.Future[Any]) -> None:
        if durable.done():
            return
        if gathered.cancelled():
            durable.cancel()
        elif (exc := gathered.exception()) is not None:
            durable.set_exception(exc)
        else:
            durable.set_result(None)

    # the usual case, a raw message's journal write alone, without a gather (a future and a task each)
    (futures[0] if len(futures) == 1 else asyncio.gather(*futures)).add_done_callback(done)


class _GatedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A client socket reader that pauses while the pipeline is full or the broker is draining."""

    def __init__(self, inner: ReaderAdapter, broker: _TappedBroker) -> None:
        self._inner = inner
        self._broker = broker

    async def read(self, n: int = -1) -> bytes:
        await self._broker.wait_read_allowed()
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _BatchingWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A client socket's writer that sends what is written in one turn of the event loop at once.

    A journal commit releases the PUBACKs of many messages together; one ``send`` each (a system call,
    and a release of the GIL that the SQLite threads then hold) was a fifth of the broker's time under
    load (bench/broker_ingest.py). Order is kept: every packet goes through here.
    """

    _FLUSH_BYTES = 65_536

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self._FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending and not self.is_closed:
            self._writer.write(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0

    async def close(self) -> None:
        self._flush()
        await super().close()


class _TappedBroker(SecureBrokerMixin, Broker):  # type: ignore[misc]  # amqtt is untyped
    def __init__(
        self, config: dict[str, Any], ingest: Ingest, room: Callable[[], Awaitable[None]], *,
        settings: BrokerSettings, sessions: Sessions, traffic: Traffic | None = None,
    ) -> None:
        super().__init__(config)
        self._ingest = ingest
        self._room = room
        self._traffic = traffic
        self._settings = settings
        self.mqtt_sessions = sessions
        self.in_tap = 0
        self.draining = asyncio.Event()
        self.tapped = 0
        self.offences: dict[str, int] = {}
        self._restored: dict[str, ClientQueue] = {}

    def count_offence(self, reason: str) -> None:
        if reason not in self.offences:
            log.warning("MQTT connection closed: %s (further ones are counted in the stats)", reason)
        self.offences[reason] = self.offences.get(reason, 0) + 1

    async def wait_read_allowed(self) -> None:
        if self.draining.is_set():
            await asyncio.Future()  # read nothing more; the connection ends with the broker
        await self._room()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        firewall = PacketFirewall(
            reader, writer, max_packet_bytes=self._settings.max_packet_bytes,
            connect_timeout_s=self._settings.connect_timeout_s, gate=self.wait_read_allowed,
            offence=self.count_offence,
        )
        await self._client_connected(listener_name, firewall, _BatchingWriter(writer))

    # --- sessions (gateway/broker/sessions.py) -------------------------------------------------------

    def restore(self, queues: dict[str, ClientQueue]) -> None:
        """Persistent sessions from the last run, put back once amqtt has cleared its tables."""
        self._restored = queues

    async def _start_listeners(self) -> None:
        for client_id, queue in self._restored.items():
            handler, session = self.create_offline_session(client_id)
            session.clean_session = False
            self._sessions[client_id] = (session, handler)
            for topic_filter, qos in queue.subscriptions.items():
                self._subscriptions.setdefault(topic_filter, []).append((session, qos))
        await super()._start_listeners()

    async def _session_monitor(self) -> None:
        """[MQTT-3.1.2-4]: a disconnected CleanSession 0 session stays, anonymous or not."""
        while True:
            for client_id, (session, _) in list(self._sessions.items()):
                if session.transitions.state == "disconnected" and session.clean_session:
                    await self._cleanup_session(client_id)
            await asyncio.sleep(1)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # Called by amqtt once a client's CONNACK is out and its handler runs: start sending.
        queue = self.mqtt_sessions.queue(session.client_id, persistent=not session.clean_session)
        queue.attach(self._get_handler(session))

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        queue = self.mqtt_sessions.queues.get(client_session.client_id)
        if queue is not None:
            queue.detach(handler)
            if not queue.persistent and not queue.connected:
                self.mqtt_sessions.forget(client_session.client_id)

    async def _cleanup_session(self, client_id: str) -> None:
        queue = self.mqtt_sessions.queues.get(client_id)
        if queue is not None:
            queue.detach(None)
            if not queue.persistent:
                self.mqtt_sessions.forget(client_id)
        await super()._cleanup_session(client_id)

    async def _delete_session(self, client_id: str) -> None:
        # A CleanSession 1 CONNECT ends any previous session of that client id [MQTT-3.1.2-6]; only
        # once amqtt has really deleted it (an authentication hook may defer that until it accepts).
        await super()._delete_session(client_id)
        if client_id not in self._sessions:
            self.mqtt_sessions.forget(client_id)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted: int = await super().add_subscription(subscription, session)
        if granted != _SUBSCRIBE_REFUSED:
            # [MQTT-3.8.4-3]: a repeated filter replaces the subscription; amqtt keeps the old QoS
            # (while its SUBACK grants the new one).
            subscriptions = self._subscriptions.get(subscription[0], [])
            for index, (subscriber, _) in enumerate(subscriptions):
                if subscriber.client_id == session.client_id:
                    subscriptions[index] = (subscriber, granted)
        if granted != _SUBSCRIBE_REFUSED and not session.clean_session:
            self.mqtt_sessions.subscribed(session.client_id, subscription[0], granted)
        if self._traffic is not None and granted != _SUBSCRIBE_REFUSED:  # the catalog learns its consumers
            self._traffic.subscribed(f"mqtt:{session.client_id}", subscription[0])
        return granted

    async def _handle_unsubscription(self, client_session: Session, handler: Any, unsubscribe_waiter: Any) -> None:
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)
        self.mqtt_sessions.unsubscribed(client_session.client_id, unsubscribe_waiter.result().topics)

    async def _handle_subscription(self, client_session: Session, handler: Any, subscribe_waiter: Any) -> None:
        token = _SUBSCRIBING.set(True)
        try:
            await super()._handle_subscription(client_session, handler, subscribe_waiter)
        finally:
            _SUBSCRIBING.reset(token)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if _SUBSCRIBING.get():  # [MQTT-3.3.1-6]: for a new subscription only
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _route(self, topic: str, data: bytes, qos: int) -> list[asyncio.Future[None]]:
        """Queue a message for every client subscribed to its topic, once each, at
        min(publish QoS, the highest granted QoS among its matching subscriptions)."""
        targets: dict[str, tuple[Session, int]] = {}
        for topic_filter, subscriptions in self._subscriptions.items():
            if subscriptions and topic_matches(topic, topic_filter):
                for session, granted in subscriptions:
                    known = targets.get(session.client_id)
                    if known is None or granted > known[1]:
                        targets[session.client_id] = (session, granted)
        futures: list[asyncio.Future[None]] = []
        for client_id, (session, granted) in targets.items():
            # Always asked (amqtt answers at once when no topic plugin is loaded): a security hook
            # overriding _topic_filtering must see every delivery.
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            effective = min(qos, granted)
            # Connected or not by our own record: amqtt marks a session disconnected when a
            # connection it took over ends, though the new one is up.
            queue = self.mqtt_sessions.queues.get(client_id)
            if queue is None or (not queue.connected and (not queue.persistent or effective == 0)):
                continue  # [MQTT-3.1.2-5]: only QoS 1 and 2 wait for a disconnected persistent session
            if (future := queue.enqueue(topic, data, effective)) is not None:
                futures.append(future)
        return futures

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        await self._client_connected(listener_name, _GatedReader(WebSocketsReader(websocket), self),
                                     WebSocketsWriter(websocket))

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        token = _DELIVERING.set(message)
        try:
            result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            _DELIVERING.reset(token)
            unclaimed = _AWAITING_DURABILITY.pop(id(message), None)
            if unclaimed is not None and not unclaimed.done():
                unclaimed.set_result(None)  # not handed to the gateway (refused by ACL, say): nothing to wait for
        return result

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if topic is None or data is None:
            return
        meta = _PUBLISH_META.get()
        origin = meta.origin if meta else (f"mqtt:{session.client_id}" if session else None)
        if self._traffic is not None:
            self._traffic.published(topic, origin)
        message = _DELIVERING.get() if session is not None else None
        qos = force_qos if force_qos is not None else (message.qos if message is not None else 0)
        routed = await self._route(topic, bytes(data), qos or 0)
        resend = None
        if message is not None and message.packet_id is not None and message.publish_packet is not None:
            resend = Resend(message.packet_id, bool(message.publish_packet.dup_flag))
        self.in_tap += 1
        try:
            futures = [*await self._ingest(topic, bytes(data), origin, meta.event_id if meta else None, resend),
                       *routed]
            self.tapped += 1
        except BaseException as exc:
            # Not taken: the device must not be told otherwise (no PUBACK; it will send again).
            gate = _AWAITING_DURABILITY.pop(id(message), None) if message is not None else None
            if gate is not None and not gate.done():
                gate.set_exception(exc if isinstance(exc, Exception) else GatewayError("ingest cancelled"))
            raise
        finally:
            self.in_tap -= 1
        durable = _AWAITING_DURABILITY.pop(id(message), None) if message is not None else None
        if durable is not None:
            _settle(durable, futures)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        if self._traffic is not None and deleted:
            self._traffic.unsubscribed(f"mqtt:{session.client_id}", a_filter)
        return deleted

    def pending_deliveries(self) -> int:
        """Messages read from clients (and maybe acknowledged) that have not reached the queue yet."""
        queued = sum(int(session.delivered_message_queue.qsize()) for session, _ in self._sessions.values())
        return self.in_tap + queued

    def bound_port(self) -> int:
        server = self._servers["default"].instance
        sockets = getattr(server, "sockets", None) or ()
        if not sockets:
            return 0
        port: int = sockets[0].getsockname()[1]
        return port

    def stop_listening(self) -> None:
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()


class _HideStartupTraceback(logging.Filter):
    """amqtt logs a traceback when a listener cannot bind; we report that ourselves, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "startup failed" not in record.getMessage()


class _QuietConnectionEnds(logging.Filter):
    """amqtt logs an ERROR for every connection that ends before its CONNECT (the firewall's
    refusals included); the firewall counts those by reason, and logs the first of each."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("No data from ", "Failed to initialize client session"))


class EmbeddedBroker:
    """``async with EmbeddedBroker(...) as broker``: listening on exit of ``__aenter__``."""

    def __init__(
        self, settings: BrokerSettings, ingest: Ingest, room: Callable[[], Awaitable[None]], *, port_option: str,
        traffic: Traffic | None = None,
        data_dir: Path | None = None,
    ) -> None:
        """``data_dir`` holds the persistent MQTT sessions (None: in memory, for this process only)."""
        self._settings = settings
        self._traffic = traffic
        self._port_option = port_option
        self._ingest = ingest
        self._room = room
        self._broker: _TappedBroker | None = None
        self.sessions = Sessions(settings, data_dir)
        self._quiet = _QuietConnectionEnds()
        self.port = settings.port
        self.security: BrokerSecurity | None = None

    async def __aenter__(self) -> Self:
        self.security = BrokerSecurity(self._settings)  # a ConfigError when [broker] is unusable
        plan = broker_plan(self._settings, self.security)
        restored = await self.sessions.open()
        self._broker = _TappedBroker(
            plan.config, self._ingest, self._room, settings=self._settings, sessions=self.sessions,
            traffic=self._traffic,
        )
        self._broker.listener_ssl = plan.ssl_contexts
        self._broker.security = self.security
        self._broker.restore(restored)
        logging.getLogger("amqtt.broker").addFilter(self._quiet)
        quiet = _HideStartupTraceback()
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(quiet)
        try:
            await self._broker.start()
        except BrokerError as exc:
            logging.getLogger("amqtt.broker").removeFilter(self._quiet)
            await self.sessions.close()
            if _is_addr_in_use(exc):
                raise PortInUseError(self._settings.host, self._settings.port, self._port_option) from None
            raise GatewayError(f"the MQTT broker did not start: {exc}") from exc
        finally:
            amqtt_log.removeFilter(quiet)
        self.port = self._broker.bound_port() or self._settings.port
        log.info("MQTT broker listening on %s:%d", self._settings.host, self.port)
        for name, where in plan.names.items():
            if name != "default":
                log.info("MQTT broker listening (%s)", where)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._running.shutdown()
        finally:
            logging.getLogger("amqtt.broker").removeFilter(self._quiet)
            await self.sessions.close()

    def stats(self) -> dict[str, Any]:
        """Sessions (queued, dropped per client) and connections closed for bad input, by reason."""
        broker = self._broker
        return {"sessions": self.sessions.stats(), "offences": dict(broker.offences) if broker else {}}

    @property
    def _running(self) -> _TappedBroker:
        if self._broker is None:
            raise GatewayError("the broker is not running")
        return self._broker

    async def publish(
        self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None, qos: int = 0
    ) -> None:
        """Publish in-process, as if a client had: subscribers and the ingest see it. ``origin`` names
        where it came from (None: this gateway) and ``event_id`` keeps the id it already has."""
        token = _PUBLISH_META.set(_PublishMeta(origin, event_id))
        try:
            await self._running.internal_message_broadcast(topic, payload, qos)
        finally:
            _PUBLISH_META.reset(token)

    def has_subscriber(self, topic: str) -> bool:
        broker = self._running
        return any(topic_matches(topic, f) and subs for f, subs in broker._subscriptions.items())

    def pending_deliveries(self) -> int:
        """Messages the broker has read from clients that are not on the pipeline's queue yet."""
        return self._broker.pending_deliveries() if self._broker else 0

    @property
    def serving(self) -> bool:
        """Started and taking clients on every listener (false before start, while draining for a stop,
        or if a listener closed): what ``/readyz`` and the systemd watchdog check."""
        broker = self._broker
        if broker is None or broker.transitions.state != "started" or broker.draining.is_set():
            return False
        return all(s.instance is not None and s.instance.is_serving() for s in broker._servers.values())

    @property
    def tapped(self) -> int:
        return self._broker.tapped if self._broker else 0

    @property
    def clients(self) -> int:
        """Connected clients."""
        broker = self._broker
        if broker is None:
            return 0
        return sum(1 for session, _ in broker._sessions.values() if session.transitions.state == "connected")

    async def drain(self, timeout_s: float) -> int:
        """Stop reading from clients, then wait until what was read has reached the queue.

        Returns how many messages were still pending at the deadline (0 when fully drained).
        """
        broker = self._running
        broker.draining.set()
        broker.stop_listening()
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(_DRAIN_POLL_S)  # let packets already read finish their handling
        # amqtt's session queues signal nothing when they empty: poll them.
        while (pending := broker.pending_deliveries()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_S)
        return pending


def _is_addr_in_use(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
