"""MQTT 3.1.1 sessions for the embedded broker: what amqtt 0.12.1 does not do, done here.

The broker (gateway/broker/embedded.py) hands every message to :meth:`Sessions.route` instead of amqtt's
broadcast queue. Each client has a :class:`ClientQueue` (messages waiting, then in flight) and a
sender task while it is connected. What this fixes, by section of the MQTT 3.1.1 specification:

- [MQTT-3.1.2-5]: QoS 1 and 2 messages for a disconnected client with CleanSession 0 are kept and
  sent when it reconnects. amqtt drops them for every client that authenticated anonymously and
  loses the session one second after it disconnects (its session monitor).
- [MQTT-4.4.0-1], [MQTT-3.3.1-1], [MQTT-4.6.0-2..3]: on reconnect, unacknowledged PUBLISH packets
  are sent again with DUP set, and PUBRELs for QoS 2 messages already received, in their original
  order, before anything new. amqtt waits 5 s for an acknowledgement, then forgets the message.
- [MQTT-3.8.4-6], section 3.3.5: a message goes out at the minimum of the QoS it was published
  with and the QoS granted to the subscription (amqtt uses the subscription's QoS); overlapping
  subscriptions of one client give one copy, at the highest matching QoS [MQTT-3.3.5-1].
- [MQTT-3.3.1-6] with [MQTT-3.1.2-4]: retained messages are sent for a new subscription, not for
  every filter any client subscribed to whenever someone connects (see gateway/broker/embedded.py).
- A session's messages are bounded: ``[broker] max_queued_messages`` waiting and in flight
  together, ``[broker] queue_full`` (drop_oldest or drop_new) when full, drops counted per client
  and logged when a queue becomes full and when it has room again.
- Persistent sessions (subscriptions and messages of CleanSession 0 clients) survive a restart,
  ``kill -9`` included: they live in ``sessions.sqlite3`` (WAL, group commit). A QoS 1 PUBACK to a
  publisher waits for the commit that holds the message for offline subscribers, as it waits for
  the journal. A message delivered and acknowledged within one commit window costs no write.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrel import PubrelPacket

from gateway.config import BrokerSettings
from gateway.errors import GatewayError
from pipeline.db import GroupCommit, SqliteThread

log = logging.getLogger(__name__)
SESSIONS_NAME = "sessions.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS session (client_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscription (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL, PRIMARY KEY (client_id, filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, packet_id INTEGER, released INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (client_id, seq)
) WITHOUT ROWID;
"""
OpKind = Literal["session", "drop_session", "subscribe", "unsubscribe", "message", "sent", "released", "done"]


@dataclass(slots=True)
class Delivery:
    """One message for one client: waiting, then in flight (``packet_id`` set) until acknowledged."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None = None
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent


@dataclass(frozen=True, slots=True)
class _Op:
    kind: OpKind
    client_id: str
    seq: int = 0
    text: str = ""  # a filter or a topic
    qos: int = 0
    payload: bytes = b""
    packet_id: int | None = None


@dataclass(slots=True)
class StoredSession:
    subscriptions: dict[str, int] = field(default_factory=dict)
    messages: list[Delivery] = field(default_factory=list)


_Row = list[Any]  # a message row not written yet: client_id, seq, topic, payload, qos, packet_id, released


def _apply_session(conn: sqlite3.Connection, op: _Op, new: dict[tuple[str, int], _Row]) -> None:
    match op.kind:
        case "session":
            conn.execute("INSERT OR IGNORE INTO session (client_id) VALUES (?)", (op.client_id,))
        case "drop_session":
            for table in ("session", "subscription", "message"):
                conn.execute(f"DELETE FROM {table} WHERE client_id = ?", (op.client_id,))  # noqa: S608
            for key in [k for k in new if k[0] == op.client_id]:
                del new[key]
        case "subscribe":
            conn.execute("INSERT OR REPLACE INTO subscription (client_id, filter, qos) VALUES (?, ?, ?)",
                         (op.client_id, op.text, op.qos))
        case "unsubscribe":
            conn.execute("DELETE FROM subscription WHERE client_id = ? AND filter = ?", (op.client_id, op.text))


def _apply_message(conn: sqlite3.Connection, op: _Op, new: dict[tuple[str, int], _Row]) -> None:
    key = (op.client_id, op.seq)
    row = new.get(key)
    match op.kind:
        case "message":
            new[key] = [op.client_id, op.seq, op.text, op.payload, op.qos, None, 0]
        case "sent" if row is not None:
            row[5] = op.packet_id
        case "sent":
            conn.execute("UPDATE message SET packet_id = ? WHERE client_id = ? AND seq = ?", (op.packet_id, *key))
        case "released" if row is not None:
            row[6] = 1
        case "released":
            conn.execute("UPDATE message SET released = 1 WHERE client_id = ? AND seq = ?", key)
        case "done" if row is not None:
            del new[key]
        case "done":
            conn.execute("DELETE FROM message WHERE client_id = ? AND seq = ?", key)


def _apply(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    """Applies a batch in order; a message added and done within the batch is never written."""
    new: dict[tuple[str, int], _Row] = {}
    for op in ops:
        if op.kind in ("message", "sent", "released", "done"):
            _apply_message(conn, op, new)
        else:
            _apply_session(conn, op, new)
    if new:
        conn.executemany("INSERT OR REPLACE INTO message (client_id, seq, topic, payload, qos, packet_id, released) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", list(new.values()))


class SessionStore:
    """Persistent sessions in SQLite, written by group commit."""

    def __init__(self, path: Path, *, window_s: float = 0.01) -> None:
        self.path = path
        self._db = SqliteThread(self.path)
        self._commit: GroupCommit[_Op] = GroupCommit(self._db, _apply, window_s=window_s)
        self._seq = itertools.count(1)

    async def open(self) -> dict[str, StoredSession]:
        await self._db.open(_SCHEMA)

        def load(conn: sqlite3.Connection) -> tuple[list[Any], list[Any], list[Any]]:
            return (conn.execute("SELECT client_id FROM session").fetchall(),
                    conn.execute("SELECT client_id, filter, qos FROM subscription").fetchall(),
                    conn.execute("SELECT client_id, seq, topic, payload, qos, packet_id, released FROM message "
                                 "ORDER BY client_id, seq").fetchall())

        sessions, subscriptions, messages = await self._db.run(load)
        stored = {client_id: StoredSession() for (client_id,) in sessions}
        for client_id, topic_filter, qos in subscriptions:
            stored.setdefault(client_id, StoredSession()).subscriptions[topic_filter] = qos
        last = 0
        for client_id, seq, topic, payload, qos, packet_id, released in messages:
            stored.setdefault(client_id, StoredSession()).messages.append(
                Delivery(seq, topic, bytes(payload), qos, packet_id, bool(released)))
            last = max(last, seq)
        self._seq = itertools.count(last + 1)
        self._commit.start("sessions-commit")
        return stored

    def next_seq(self) -> int:
        return next(self._seq)

    def submit(self, kind: OpKind, client_id: str, **fields: Any) -> asyncio.Future[None]:
        return self._commit.submit(_Op(kind, client_id, **fields))

    def add(self, client_id: str, d: Delivery) -> asyncio.Future[None]:
        return self._commit.submit(_Op("message", client_id, d.seq, d.topic, d.qos, d.payload))

    @property
    def commits(self) -> int:
        return self._commit.commits

    async def close(self) -> None:
        await self._commit.stop()
        await self._db.close()


class ClientQueue:
    """One client's session state: messages waiting and in flight, and its sender while connected."""

    def __init__(
        self, client_id: str, persistent: bool, settings: BrokerSettings, store: SessionStore, drops: dict[str, int]
    ) -> None:
        self.client_id = client_id
        self._drops = drops
        self.persistent = persistent
        self._limit = settings.max_queued_messages
        self._drop_new = settings.queue_full == "drop_new"
        self._window = min(settings.max_inflight, settings.max_queued_messages)
        self._store = store
        self.subscriptions: dict[str, int] = {}
        self.queued: deque[Delivery] = deque()
        self.inflight: OrderedDict[int, Delivery] = OrderedDict()
        self.dropped = 0
        self._full = False
        self._dropped_at_full = 0
        self._wake = asyncio.Event()
        self._handler: Any = None
        self._task: asyncio.Task[None] | None = None

    def restore(self, stored: StoredSession) -> None:
        self.subscriptions = dict(stored.subscriptions)
        for d in stored.messages:
            if d.packet_id is not None:
                self.inflight[d.packet_id] = d
            else:
                self.queued.append(d)

    def __len__(self) -> int:
        return len(self.queued) + len(self.inflight)

    @property
    def connected(self) -> bool:
        return self._handler is not None

    def enqueue(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[None] | None:
        """Queue a message; the future (persistent sessions, QoS 1 and 2) resolves once it is durable."""
        if len(self) >= self._limit:
            if self._drop_new:
                self._count_drop()
                return None
            victim = self.queued.popleft() if self.queued else self.inflight.popitem(last=False)[1]
            self._count_drop()
            self._forget(victim)
        d = Delivery(self._store.next_seq(), topic, payload, qos)
        self.queued.append(d)
        self._wake.set()
        if self.persistent and qos:
            return self._store.add(self.client_id, d)
        return None

    def _count_drop(self) -> None:
        self.dropped += 1
        self._drops[self.client_id] = self._drops.get(self.client_id, 0) + 1
        if not self._full:
            self._full = True
            self._dropped_at_full = self.dropped
            log.warning("MQTT client %s: session queue full (%d messages), dropping the %s from now on",
                        self.client_id, self._limit, "newest" if self._drop_new else "oldest")

    def _forget(self, d: Delivery) -> None:
        if self.persistent and d.qos:
            self._store.submit("done", self.client_id, seq=d.seq)

    def _settled(self, d: Delivery) -> None:
        if d.packet_id is not None and self.inflight.get(d.packet_id) is d:
            del self.inflight[d.packet_id]
        self._forget(d)
        self._wake.set()
        if self._full and len(self) <= self._limit // 2:
            self._full = False
            log.info("MQTT client %s: session queue has room again (%d message(s) dropped while full)",
                     self.client_id, self.dropped - self._dropped_at_full + 1)

    def attach(self, handler: Any) -> None:
        """The client is connected (again): send what is in flight, then what waits."""
        self.detach(None)
        self._handler = handler
        self._task = asyncio.create_task(self._send_loop(handler), name=f"mqtt-out {self.client_id}")

    def detach(self, handler: Any) -> None:
        """The connection of ``handler`` ended (None: whichever is attached)."""
        if handler is not None and handler is not self._handler:
            return  # an older connection, taken over since
        self._handler = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not self.persistent:  # [MQTT-3.1.2-6]: a clean session's state ends with its connection
            self.queued.clear()
            self.inflight.clear()

    async def _send_loop(self, handler: Any) -> None:
        try:
            for d in list(self.inflight.values()):  # [MQTT-4.4.0-1], in order [MQTT-4.6.0-2]
                await self._transmit(handler, d, dup=True)
            while True:
                while self.queued and len(self.inflight) < self._window:
                    d = self.queued.popleft()
                    if d.qos:
                        d.packet_id = self._next_packet_id(handler)
                        self.inflight[d.packet_id] = d
                        if self.persistent:
                            self._store.submit("sent", self.client_id, seq=d.seq, packet_id=d.packet_id)
                    await self._transmit(handler, d, dup=False)
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection is going away; what is in flight stays for the next one
            log.debug("MQTT client %s: sending stopped: %s", self.client_id, exc)

    def _next_packet_id(self, handler: Any) -> int:
        while True:  # shares amqtt's counter (retained messages go out through amqtt)
            packet_id: int = handler.session.next_packet_id
            if packet_id not in self.inflight:
                return packet_id

    async def _transmit(self, handler: Any, d: Delivery, *, dup: bool) -> None:
        if d.qos == 0:
            await handler._send_packet(PublishPacket.build(d.topic, d.payload, None, False, 0, False))
            self._settled(d)
            return
        packet_id = d.packet_id
        if packet_id is None:
            raise GatewayError(f"a QoS {d.qos} message for {self.client_id} was sent without a packet id")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # amqtt's reader resolves these waiters when the acknowledgements arrive.
        if d.released:
            handler._pubcomp_waiters[packet_id] = waiter
            waiter.add_done_callback(lambda f: self._on_ack(f, handler, d, "pubcomp"))
            await handler._send_packet(PubrelPacket.build(packet_id))
            return
        waiters = handler._puback_waiters if d.qos == 1 else handler._pubrec_waiters
        waiters[packet_id] = waiter
        waiter.add_done_callback(lambda f: self._on_ack(f, handler, d, "puback" if d.qos == 1 else "pubrec"))
        await handler._send_packet(PublishPacket.build(d.topic, d.payload, packet_id, dup, d.qos, False))

    def _on_ack(self, waiter: asyncio.Future[Any], handler: Any, d: Delivery, kind: str) -> None:
        for waiters in (handler._puback_waiters, handler._pubrec_waiters, handler._pubcomp_waiters):
            if d.packet_id is not None and waiters.get(d.packet_id) is waiter:
                del waiters[d.packet_id]
        if waiter.cancelled() or waiter.exception() is not None:
            return  # the connection ended: still in flight, sent again on reconnect
        if d.packet_id is None or self.inflight.get(d.packet_id) is not d:
            return  # dropped (queue full) meanwhile
        if kind != "pubrec":
            self._settled(d)
            return
        d.released = True  # [MQTT-4.3.3-1]: the PUBLISH is not sent again, the PUBREL is
        if self.persistent:
            self._store.submit("released", self.client_id, seq=d.seq)
        if handler is self._handler:
            task = asyncio.ensure_future(self._transmit(handler, d, dup=False))
            task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("PUBREL not sent: %s", exc)


class Sessions:
    """Every client's :class:`ClientQueue`, and the store behind the persistent ones."""

    def __init__(self, settings: BrokerSettings, data_dir: Path | None) -> None:
        self.settings = settings
        # No data directory (a broker on its own, in tests): persistent sessions last as long as the process.
        self.store = SessionStore(data_dir / SESSIONS_NAME if data_dir is not None else Path(":memory:"))
        self.queues: dict[str, ClientQueue] = {}
        self.drops: dict[str, int] = {}  # client id -> messages dropped from its full queue, ever

    async def open(self) -> dict[str, ClientQueue]:
        """Load the persistent sessions; returns them (their subscriptions go back into the broker)."""
        for client_id, stored in (await self.store.open()).items():
            queue = ClientQueue(client_id, True, self.settings, self.store, self.drops)
            queue.restore(stored)
            self.queues[client_id] = queue
        if self.queues:
            log.info("restored %d persistent MQTT session(s) holding %d message(s)", len(self.queues),
                     sum(len(q) for q in self.queues.values()))
        return dict(self.queues)

    async def close(self) -> None:
        for queue in self.queues.values():
            queue.detach(None)
        await self.store.close()

    def queue(self, client_id: str, persistent: bool) -> ClientQueue:
        queue = self.queues.get(client_id)
        if queue is None or queue.persistent != persistent:
            if queue is not None:
                self.forget(client_id)
            queue = self.queues[client_id] = ClientQueue(client_id, persistent, self.settings, self.store, self.drops)
            if persistent:
                self.store.submit("session", client_id)
        return queue

    def forget(self, client_id: str) -> None:
        """A session ends: a clean one when its connection does, a persistent one when the client
        connects with CleanSession 1 [MQTT-3.1.2-6]."""
        queue = self.queues.pop(client_id, None)
        if queue is None:
            return
        queue.detach(None)
        if queue.persistent:
            self.store.submit("drop_session", client_id)

    def subscribed(self, client_id: str, topic_filter: str, qos: int) -> None:
        queue = self.queues.get(client_id)
        if queue is not None and queue.persistent:
            queue.subscriptions[topic_filter] = qos
            self.store.submit("subscribe", client_id, text=topic_filter, qos=qos)

    def unsubscribed(self, client_id: str, filters: Iterable[str]) -> None:
        queue = self.queues.get(client_id)
        if queue is not None and queue.persistent:
            for topic_filter in filters:
                if queue.subscriptions.pop(topic_filter, None) is not None:
                    self.store.submit("unsubscribe", client_id, text=topic_filter)

    def stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.queues),
            "persistent": sum(q.persistent for q in self.queues.values()),
            "connected": sum(q.connected for q in self.queues.values()),
            "queued": sum(len(q) for q in self.queues.values()),
            "dropped": dict(self.drops),
            "commits": self.store.commits,
        }
