"""The embedded broker's own logic: who may connect, which session a connection gets, what a client
may publish, subscribe and receive, where each message goes, and every bound on what clients can make
it hold. amqtt only reads the CONNECT (gateway/broker/amqtt_adapter.py); the gateway reads the later
packets (gateway/broker/packets.py) and writes every packet (gateway/broker/wire.py).

One decision per question, for every path a message can take: :class:`BrokerSecurity` (gateway/broker/
auth.py) answers for publishes and wills (write), subscriptions, and every delivery (read: live,
retained, or queued for an offline session, checked against the session owner's rights).

Connections. A connection is admitted only under ``max_connections`` (all listeners) and
``max_connections_per_address``; it must then send its whole CONNECT within ``connect_timeout_s``
(the packet firewall). A login waits for the password hash behind at most ``max_logins_per_address``
others from its address. A CONNECT is refused (CONNACK) when: its credentials are bad (5); its will is
on a topic the client may not publish to (5); its client id names a session that belongs to another
user (2, identifier rejected; a session created anonymously belongs to nobody, and without a password
file usernames prove nothing); it would make one persistent session more than
``max_persistent_sessions`` (3, server unavailable). A CONNECT of the session's owner ends the
connection that has the client id [MQTT-3.1.4-2] (its will is published, as for any connection the
server closes), then resumes or replaces the session.

Messages. :meth:`BrokerCore.publish` queues a message for each subscribed session (the subscription
index in :class:`pipeline.topics.TopicIndex`: the cost grows with the topic's levels and the
matches, not the number of filters; at most ``max_filters_per_client`` per client), once per client at
min(publish QoS, the highest granted QoS of its matching filters) [MQTT-3.3.5-1], [MQTT-3.8.4-6];
retains it (gateway/broker/retained.py); and hands it to the gateway's ingest. A QoS 1 PUBACK (QoS 2
PUBREC) is sent once what it was handed to is durable: journal, outboxes, offline sessions, retained.
A connection's packets are handled in order, one at a time. Nothing more is read from it while the
pipeline's queue is full, while sessions.sqlite3 has more writes waiting than it commits, while the
connection has :data:`INBOX_MAX` packets waiting, or :data:`UNACKED_MAX` QoS 1/2 messages whose
acknowledgement waits for durability: memory follows the bounds, not the clients' pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.broker import wire
from gateway.broker.auth import BrokerSecurity
from gateway.broker.firewall import PacketFirewall, Source
from gateway.broker.retained import RetainedStore
from gateway.broker.sessions import Body, ClientQueue, Restored, Sessions
from gateway.config import BrokerSettings
from pipeline.errors import TopicError
from pipeline.retry import stop_task
from pipeline.topics import TopicIndex, mqtt_filter

log = logging.getLogger(__name__)
LIMITS = ("connections_refused", "connections_refused_per_address", "logins_throttled", "filters_refused",
          "sessions_refused", "sessions_expired", "queued_bytes_evicted", "retained_refused")  # status: broker.limits
INBOX_MAX = 16  # packets read from one connection and not handled yet; then its reads wait
_WRITE_POLL_S = 0.05  # how often a connection whose client does not read is looked at again
UNACKED_MAX = 100  # QoS 1/2 PUBLISHes of one connection waiting for durability before their PUBACK/PUBREC; ditto
_TAKEOVER_WAIT_S = 5.0
_CLOSE_WAIT_S = 2.0


@dataclass(slots=True)  # not frozen: made for every QoS 1/2 message, and frozen slots classes init slowly
class Resend:
    """A QoS 1/2 message's packet id, and whether the client marked it as sent before (DUP)."""

    packet_id: int
    dup: bool


class Ingest(Protocol):
    """What the broker hands every message to. It returns futures that resolve once the message is
    durable (journal, outboxes); a QoS 1 PUBACK goes out only after they have."""

    async def __call__(
        self, topic: str, payload: bytes, origin: str | None, event_id: str | None, resend: Resend | None
    ) -> Sequence[asyncio.Future[None]]: ...


class Traffic(Protocol):
    """Told about every publish and subscription, for the event catalog to learn producers and consumers
    (pipeline.traffic.TrafficLearner). Called on the broker's path: must be cheap and must not block."""

    def published(self, topic: str, origin: str | None, count: int = 1) -> None: ...

    def subscribed(self, client: str, topic_filter: str) -> None: ...

    def unsubscribed(self, client: str, topic_filter: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What a CONNECT asks for."""

    client_id: str
    clean: bool
    username: str | None
    password: str | None
    keep_alive: int
    will: Will | None


class PacketSink(Protocol):
    """Where the packets a client sends after its CONNECT go (called by the protocol reader, in order)."""

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int | None, dup: bool
                ) -> None: ...

    def pubrel(self, packet_id: int) -> None: ...

    def subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> None: ...

    def unsubscribe(self, packet_id: int, filters: list[str]) -> None: ...

    def acknowledged(self, kind: Literal["puback", "pubrec", "pubcomp"], packet_id: int) -> None: ...

    def ping(self) -> None: ...

    def disconnect(self) -> None: ...

    def closed(self) -> None: ...


class Channel(Protocol):
    """A connection's packet reader once its CONNECT is accepted."""

    async def start(self, sink: PacketSink) -> None: ...

    async def stop(self) -> None: ...


class ProtocolReader(Protocol):
    """Reads a connection's CONNECT (gateway/broker/amqtt_adapter.py ``AmqttProtocol``), and gives the
    channel its later packets come through."""

    async def read_connect(self, reader: PacketFirewall, transport: wire.Transport
                           ) -> tuple[ConnectRequest, Channel] | None: ...


# -- what a connection sends, as its queue of work ---------------------------------------------------------


@dataclass(slots=True)  # not frozen: made for every message (frozen slots classes init slowly)
class _Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int | None
    dup: bool


@dataclass(frozen=True, slots=True)
class _Pubrel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class _Subscribe:
    packet_id: int
    filters: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class _Unsubscribe:
    packet_id: int
    filters: list[str]


class _End:
    pass


_DISCONNECT, _CLOSED = _End(), _End()
_Item = _Publish | _Pubrel | _Subscribe | _Unsubscribe | _End


class _Claim:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class ConnectionLimits:
    """``max_connections`` and ``max_connections_per_address``, counted when hit."""

    def __init__(self, settings: BrokerSettings) -> None:
        self._max = settings.max_connections
        self._max_per_address = settings.max_connections_per_address
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refused = 0
        self.refused_per_address = 0
        self._logged: set[str] = set()

    def admit(self, address: str) -> bool:
        if self.open >= self._max:
            self.refused += 1
            self._log("total", f"{self._max} connections are open (max_connections)")
            return False
        if self.by_address.get(address, 0) >= self._max_per_address:
            self.refused_per_address += 1
            self._log(address, f"{self._max_per_address} connections from {address} are open "
                               "(max_connections_per_address)")
            return False
        self.open += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        left = self.by_address[address] - 1
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]
            self._logged.discard(address)
        if self.open < self._max:
            self._logged.discard("total")

    def _log(self, key: str, why: str) -> None:
        if key not in self._logged:  # once per run of refusals
            self._logged.add(key)
            log.warning("MQTT connection refused: %s; further refusals are counted", why)


class Connection:
    """One client connected under a session: the packets it sent, handled in order; and the outlet its
    session's queue sends through."""

    def __init__(self, core: BrokerCore, transport: wire.Transport, *, request: ConnectRequest, queue: ClientQueue,
                 username: str | None, address: str, channel: Channel) -> None:
        self.core = core
        self.transport = transport
        self.request = request
        self.client_id = request.client_id
        self.origin = f"mqtt:{request.client_id}"
        self.queue = queue
        self.username = username  # as the ACL sees it (None: anonymous)
        self.address = address
        self.channel = channel
        self.inbox: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.graceful = False  # ended by DISCONNECT: no will [MQTT-3.1.2-10]
        self.kicked = False
        self.ended = False
        self.finished = asyncio.Event()
        self.unacked = 0
        self._acked = asyncio.Event()
        self._flush: asyncio.Future[None] | None = None
        self._buffered = isinstance(transport, wire.WebSocketTransport)

    # -- the outlet (gateway/broker/sessions.py Outlet) -----------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.transport.write(data)
        await self.transport.drain()

    def post(self, data: bytes) -> None:
        """Write without waiting (acknowledgements)."""
        if self.ended:
            return
        self.transport.write(data)
        if self._buffered and (self._flush is None or self._flush.done()):
            self._flush = asyncio.ensure_future(self.transport.drain())

    # -- the packet sink (called by the protocol reader) ---------------------------------------------------

    def _put(self, item: _Item) -> None:
        self.inbox.append(item)
        self._arrived.set()
        if len(self.inbox) >= INBOX_MAX:
            self._room.clear()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int | None, dup: bool
                ) -> None:
        self._put(_Publish(topic, payload, qos, retain, packet_id, dup))

    def pubrel(self, packet_id: int) -> None:
        self._put(_Pubrel(packet_id))

    def subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> None:
        self._put(_Subscribe(packet_id, filters))

    def unsubscribe(self, packet_id: int, filters: list[str]) -> None:
        self._put(_Unsubscribe(packet_id, filters))

    def acknowledged(self, kind: Literal["puback", "pubrec", "pubcomp"], packet_id: int) -> None:
        if not self.ended:
            self.queue.acknowledged(kind, packet_id)

    def ping(self) -> None:
        self.post(wire.PINGRESP)

    def disconnect(self) -> None:
        self._put(_DISCONNECT)

    def closed(self) -> None:
        self._put(_CLOSED)

    async def wait_room(self) -> None:
        while not self._room.is_set():
            await self._room.wait()
        while self.unacked >= UNACKED_MAX:
            self._acked.clear()
            await self._acked.wait()
        if self.transport.buffered() > self.core.settings.max_write_buffer_bytes:
            await self._wait_written()

    async def _wait_written(self) -> None:
        """The client does not take what it is sent (PINGRESPs, PUBACKs, ... answer its own packets):
        read nothing more from it until it does; closed (offence ``write_stalled``) if it has not within
        ``write_stall_timeout_s``."""
        settings = self.core.settings
        try:
            async with asyncio.timeout(settings.write_stall_timeout_s):
                while self.transport.buffered() > settings.max_write_buffer_bytes and not self.ended:
                    await self.transport.drain()
                    if self.transport.buffered() > settings.max_write_buffer_bytes:
                        await asyncio.sleep(_WRITE_POLL_S)
        except TimeoutError:
            self.core.count_offence("write_stalled")
            self.transport.abort()
        except (ConnectionError, OSError):
            self.transport.abort()

    def kick(self) -> None:
        """End this connection from the broker's side (a takeover, a shutdown)."""
        self.kicked = True
        self.transport.abort()
        self._put(_CLOSED)

    # -- handling, in order ----------------------------------------------------------------------------------

    async def run(self) -> None:
        while not self.kicked:
            if not self.inbox:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            item = self.inbox.popleft()
            if len(self.inbox) < INBOX_MAX // 2:
                self._room.set()
            if isinstance(item, _End):
                self.graceful = item is _DISCONNECT
                return
            if isinstance(item, _Publish):
                await self._publish(item)
            elif isinstance(item, _Pubrel):
                self._ack_after([f] if (f := self.queue.release(item.packet_id)) else [], wire.pubcomp(item.packet_id))
            elif isinstance(item, _Subscribe):
                await self._subscribe(item)
            else:
                removed = self.core.unsubscribe(self, item.filters)
                log.debug("client %s unsubscribed from %d filter(s)", self.client_id, len(removed))
                self.post(wire.unsuback(item.packet_id))

    async def _publish(self, p: _Publish) -> None:
        pid = p.packet_id or 0
        if p.qos == 2 and pid in self.queue.receipts:  # sent again: already handed on [MQTT-4.3.3-2, method A]
            pending = self.queue.receipt_gates.get(pid)
            self._ack_after([pending] if pending is not None and not pending.done() else [], wire.pubrec(pid))
            return
        futures: list[asyncio.Future[None]] = []
        if self.core.security.allowed("write", p.topic, self.client_id, self.username):
            try:
                futures = await self.core.publish(
                    p.topic, p.payload, p.qos, retain=p.retain, origin=self.origin,
                    resend=Resend(pid, p.dup) if p.qos else None)
            except Exception as exc:  # not taken: no acknowledgement, the client sends it again
                log.warning("MQTT client %s: a message on %r was not taken: %s", self.client_id, p.topic[:200], exc)
                return
        if p.qos == 1:
            self._ack_after(futures, wire.puback(pid))
        elif p.qos == 2:
            if (stored := self.queue.receive(pid)) is not None:
                futures.append(stored)
            gate = self._ack_after(futures, wire.pubrec(pid), on_fail=lambda: self.queue.receipts.discard(pid))
            if gate is not None:
                self.queue.receipt_gates[pid] = gate
                gate.add_done_callback(lambda _: self.queue.receipt_gates.pop(pid, None))

    def _ack_after(self, futures: Sequence[asyncio.Future[None]], ack: bytes,
                   on_fail: Callable[[], None] | None = None) -> asyncio.Future[Any] | None:
        """Send ``ack`` once every future has resolved (none: now); not at all if one fails."""
        if not futures:
            self.post(ack)
            return None
        # One future (the journal's, mostly) is waited on as it is: a gather a message cost a twentieth
        # of the broker's time (bench/broker_ingest.py).
        gathered = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
        self.unacked += 1

        def done(g: asyncio.Future[Any]) -> None:
            self.unacked -= 1
            self._acked.set()
            if g.cancelled() or g.exception() is not None:
                if on_fail is not None:
                    on_fail()
                return
            self.post(ack)

        gathered.add_done_callback(done)
        return gathered

    async def _subscribe(self, s: _Subscribe) -> None:
        codes = [self.core.subscribe(self, topic_filter, qos) for topic_filter, qos in s.filters]
        await self.send(wire.suback(s.packet_id, codes))
        for (topic_filter, _), granted in zip(s.filters, codes, strict=True):
            if granted != wire.SUBACK_FAILURE:  # [MQTT-3.3.1-6], [MQTT-3.8.4-3]: for this subscription
                self.core.send_retained(self.queue, topic_filter, granted)


class BrokerCore:
    """Connections, sessions, subscriptions and routing; see the module docstring."""

    def __init__(
        self, settings: BrokerSettings, security: BrokerSecurity, sessions: Sessions, *, reader: ProtocolReader,
        ingest: Ingest, room: Callable[[], Awaitable[None]], traffic: Traffic | None = None,
    ) -> None:
        self.settings = settings
        self.security = security
        self.sessions = sessions
        self.retained = RetainedStore(settings, sessions.store)
        self._reader = reader
        self._ingest = ingest
        self._room = room
        self._traffic = traffic
        self.index: TopicIndex[str, int] = TopicIndex()
        self.connections: dict[str, Connection] = {}
        self.limits = ConnectionLimits(settings)
        self.filters_refused = 0
        self.offences: dict[str, int] = {}
        self.draining = asyncio.Event()
        self.in_tap = 0
        self.tapped = 0
        self._claims: dict[str, _Claim] = {}
        self._tasks: dict[asyncio.Task[Any], wire.Transport] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- start and stop -----------------------------------------------------------------------------------

    def restore(self, restored: Restored) -> None:
        """Persistent sessions and retained messages from the last run (after :meth:`Sessions.open`)."""
        for client_id, queue in self.sessions.queues.items():
            for topic_filter, qos in queue.subscriptions.items():
                try:
                    self.index.add(topic_filter, client_id, qos)
                except TopicError:
                    log.warning("session %s: dropped the stored subscription %r (no MQTT filter)", client_id,
                                topic_filter)
        self.retained.restore(restored.retained)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="mqtt session expiry")

    async def close(self) -> None:
        """End every connection (no will: the gateway is stopping) and wait for them, briefly."""
        self.draining.set()
        await stop_task(self._sweeper)
        for conn in list(self.connections.values()):
            conn.kick()
        for transport in self._tasks.values():  # those still before their CONNECT
            transport.abort()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_CLOSE_WAIT_S)

    async def _sweep(self) -> None:
        interval = min(60.0, max(0.25, self.settings.session_expiry_s / 4))
        while True:
            await asyncio.sleep(interval)
            for queue in self.sessions.expire(time.time()):
                self._unindex(queue)

    async def wait_read_allowed(self) -> None:
        if self.draining.is_set():
            await asyncio.Future()  # read nothing more; the connection ends with the broker
        await self._room()
        await self.sessions.store.wait_room()

    def count_offence(self, reason: str) -> None:
        if reason not in self.offences:
            log.warning("MQTT connection closed: %s (further ones are counted in the stats)", reason)
        self.offences[reason] = self.offences.get(reason, 0) + 1

    def pending_deliveries(self) -> int:
        """Messages read from clients (and maybe acknowledged) that have not reached the ingest yet."""
        return self.in_tap + sum(len(conn.inbox) for conn in self.connections.values())

    # -- connections --------------------------------------------------------------------------------------

    async def accept(self, source: Source, transport: wire.Transport) -> None:
        """Serve one connection, from its first byte to its end (a listener's callback)."""
        peer = transport.get_peer_info()
        address = peer[0] if peer else ""
        if self.draining.is_set() or not self.limits.admit(address):
            transport.abort()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = transport
        conn: Connection | None = None
        holder: list[Connection] = []

        async def gate() -> None:  # before each packet: the pipeline's room, then this connection's
            await self.wait_read_allowed()
            if holder:
                await holder[0].wait_room()

        reader = PacketFirewall(source, transport.abort, max_packet_bytes=self.settings.max_packet_bytes,
                                connect_timeout_s=self.settings.connect_timeout_s, gate=gate,
                                offence=self.count_offence)
        try:
            connected = await self._reader.read_connect(reader, transport)
            if connected is not None:
                request, channel = connected
                conn = await self._connect(request, channel, transport, address=address, holder=holder)
                if conn is not None:
                    await self._serve(conn)
        except Exception:
            log.exception("MQTT connection from %s failed", address)
        finally:
            reader.close()
            transport.abort()
            self.limits.release(address)
            if task is not None:
                self._tasks.pop(task, None)

    async def _refuse(self, transport: wire.Transport, code: int) -> None:
        transport.write(wire.connack(False, code))
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await transport.drain()
        await transport.close()

    @contextlib.asynccontextmanager
    async def _claim(self, client_id: str) -> AsyncIterator[None]:
        """One CONNECT at a time per client id."""
        claim = self._claims.setdefault(client_id, _Claim())
        claim.users += 1
        try:
            async with claim.lock:
                yield
        finally:
            claim.users -= 1
            if not claim.users:
                del self._claims[client_id]

    async def _connect(self, request: ConnectRequest, channel: Channel, transport: wire.Transport, *, address: str,
                       holder: list[Connection]) -> Connection | None:
        security, client_id = self.security, request.client_id
        login = await security.authenticate(client_id, request.username, request.password, address)
        if login != "ok":
            await self._refuse(transport, wire.SERVER_UNAVAILABLE if login == "throttled" else wire.NOT_AUTHORIZED)
            return None
        username = security.client_username(request.username)
        will = request.will
        if will is not None and not security.allowed("write", will.topic, client_id, username, counter="will"):
            await self._refuse(transport, wire.NOT_AUTHORIZED)
            return None
        async with self._claim(client_id):
            queue = self.sessions.queues.get(client_id)
            if queue is not None and not self._may_resume(queue, username):
                security.refused("client_id", client_id, client_id, username)
                await self._refuse(transport, wire.IDENTIFIER_REJECTED)
                return None
            if (old := self.connections.get(client_id)) is not None:  # [MQTT-3.1.4-2]
                log.info("MQTT client %s connected again: its previous connection is closed", client_id)
                old.kick()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_TAKEOVER_WAIT_S):
                        await old.finished.wait()
            queue = self.sessions.queues.get(client_id)
            if queue is not None and (request.clean or not queue.persistent):  # [MQTT-3.1.2-6]
                self._end_session(client_id)
                queue = None
            present = queue is not None
            if queue is None:
                queue = self.sessions.create(client_id, persistent=not request.clean, owner=username, address=address)
                if queue is None:
                    log.warning("MQTT client %s refused: %d persistent sessions are kept (max_persistent_sessions)",
                                client_id, self.settings.max_persistent_sessions)
                    await self._refuse(transport, wire.SERVER_UNAVAILABLE)
                    return None
            else:
                self.sessions.claimed(queue, username, address)
            conn = Connection(self, transport, request=request, queue=queue, username=username, address=address,
                              channel=channel)
            holder.append(conn)
            self.connections[client_id] = conn
            await conn.send(wire.connack(present, wire.ACCEPTED))
            await channel.start(conn)
            queue.attach(conn)
            return conn

    def _may_resume(self, queue: ClientQueue, username: str | None) -> bool:
        """Whether a client logged in as ``username`` may have ``queue``'s client id: its owner, or anyone
        when the session has no identity to protect (created anonymously, stored before sessions had
        owners, or the broker has no password file: usernames prove nothing then)."""
        return (queue.owner == username or queue.owner is None or not queue.owner_known
                or self.security.password_file is None)

    async def _serve(self, conn: Connection) -> None:
        try:
            await conn.run()
        finally:
            conn.ended = True
            if self.connections.get(conn.client_id) is conn:
                del self.connections[conn.client_id]
            queue = conn.queue
            queue.detach(conn)
            will = conn.request.will
            if will is not None and not conn.graceful and not self.draining.is_set():
                await self._publish_will(conn, will)
            if self.sessions.queues.get(conn.client_id) is queue:
                if queue.persistent:
                    self.sessions.disconnected(queue)
                else:
                    self._end_session(conn.client_id)
            await conn.channel.stop()
            conn.finished.set()

    async def _publish_will(self, conn: Connection, will: Will) -> None:
        """[MQTT-3.1.2-8]: checked again, as any PUBLISH (the rules may have changed since the CONNECT)."""
        if not self.security.allowed("write", will.topic, conn.client_id, conn.username, counter="will"):
            return
        try:
            await self.publish(will.topic, will.payload, will.qos, retain=will.retain, origin=conn.origin)
        except Exception as exc:
            log.warning("MQTT client %s: its will on %r was not published: %s", conn.client_id, will.topic[:200], exc)

    def _end_session(self, client_id: str) -> None:
        queue = self.sessions.forget(client_id)
        if queue is not None:
            self._unindex(queue)

    def _unindex(self, queue: ClientQueue) -> None:
        for topic_filter in queue.subscriptions:
            if self.index.remove(topic_filter, queue.client_id) and self._traffic is not None:
                self._traffic.unsubscribed(f"mqtt:{queue.client_id}", topic_filter)

    # -- subscriptions ------------------------------------------------------------------------------------

    def subscribe(self, conn: Connection, topic_filter: str, qos: int) -> int:
        """The SUBACK return code for one filter: the QoS granted, or 0x80."""
        try:
            mqtt_filter(topic_filter)
        except TopicError:
            return wire.SUBACK_FAILURE
        if not self.security.allowed("subscribe", topic_filter, conn.client_id, conn.username):
            return wire.SUBACK_FAILURE
        queue = conn.queue
        if topic_filter not in queue.subscriptions and len(queue.subscriptions) >= self.settings.max_filters_per_client:
            self.filters_refused += 1
            if self.filters_refused == 1 or not self.filters_refused % 1000:
                log.warning("MQTT client %s: more than %d subscriptions refused (max_filters_per_client; %d refused "
                            "so far)", conn.client_id, self.settings.max_filters_per_client, self.filters_refused)
            return wire.SUBACK_FAILURE
        granted = min(qos, 2)
        self.index.add(topic_filter, conn.client_id, granted)  # a repeated filter replaces its QoS [MQTT-3.8.4-3]
        self.sessions.subscribed(queue, topic_filter, granted)
        if self._traffic is not None:  # the catalog learns its consumers
            self._traffic.subscribed(conn.origin, topic_filter)
        return granted

    def unsubscribe(self, conn: Connection, filters: list[str]) -> list[str]:
        removed = self.sessions.unsubscribed(conn.queue, filters)
        for topic_filter in removed:
            self.index.remove(topic_filter, conn.client_id)
            if self._traffic is not None:
                self._traffic.unsubscribed(conn.origin, topic_filter)
        return removed

    def send_retained(self, queue: ClientQueue, topic_filter: str, granted: int) -> None:
        for topic, message in self.retained.matching(topic_filter):
            if self.security.allowed("read", topic, queue.client_id, queue.owner):
                queue.enqueue(Body(topic, message.payload), min(granted, message.qos), retain=True)

    def has_subscriber(self, topic: str) -> bool:
        return self.index.matched(topic)

    # -- messages -----------------------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False, origin: str | None = None,
                      event_id: str | None = None, resend: Resend | None = None) -> list[asyncio.Future[None]]:
        """Route a message (already allowed) to its subscribers, retain it if asked, and hand it to the
        ingest; the futures resolve once all of that is durable."""
        if self._traffic is not None:
            self._traffic.published(topic, origin)
        futures = self._route(Body(topic, payload), qos)
        if retain and (kept := self.retained.set(topic, payload, qos)) is not None:
            futures.append(kept)
        self.in_tap += 1
        try:
            futures += await self._ingest(topic, payload, origin, event_id, resend)
            self.tapped += 1
        finally:
            self.in_tap -= 1
        return futures

    def retain(self, topic: str, payload: bytes, qos: int) -> list[asyncio.Future[None]]:
        """A retained message of the gateway's own (its status, Home Assistant's discovery): to the
        subscribers and the retained messages, not to the ingest (it is no reading); an empty payload
        clears the topic. The futures resolve once it is durable."""
        futures = self._route(Body(topic, payload), qos)
        if (kept := self.retained.set(topic, payload, qos)) is not None:
            futures.append(kept)
        return futures

    def _route(self, body: Body, qos: int) -> list[asyncio.Future[None]]:
        """Queue a message for every session subscribed to its topic, once each, at min(publish QoS, the
        highest QoS granted among its matching filters), if its owner may read it."""
        targets: dict[str, int] = {}
        for client_id, granted in self.index.match(body.topic):
            if granted > targets.get(client_id, -1):
                targets[client_id] = granted
        futures: list[asyncio.Future[None]] = []
        last = None  # the sessions' writes of one turn share one future
        queues = self.sessions.queues
        for client_id, granted in targets.items():
            queue = queues.get(client_id)
            if queue is None:
                continue
            effective = min(qos, granted)
            if not queue.connected and (not queue.persistent or effective == 0):
                continue  # [MQTT-3.1.2-5]: only QoS 1 and 2 wait for a disconnected persistent session
            if not self.security.allowed("read", body.topic, client_id, queue.owner):
                continue
            if (future := queue.enqueue(body, effective)) is not None and future is not last:
                futures.append(future)
                last = future
        return futures

    # -- status -------------------------------------------------------------------------------------------

    def limit_counts(self) -> dict[str, int]:
        return {
            "connections_refused": self.limits.refused,
            "connections_refused_per_address": self.limits.refused_per_address,
            "logins_throttled": self.security.stats.logins_throttled,
            "filters_refused": self.filters_refused,
            "sessions_refused": self.sessions.refused,
            "sessions_expired": self.sessions.expired,
            "queued_bytes_evicted": self.sessions.budget.evicted,
            "retained_refused": self.retained.refused,
        }
