"""MQTT 3.1.1 sessions of the embedded broker: each client's messages (waiting, then in flight), its
subscriptions and its QoS 2 receipts, and the persistent ones on disk.

The broker (gateway/broker/core.py) queues each message for each subscriber here. A
:class:`ClientQueue` sends while its client is connected (:meth:`ClientQueue.attach`) and keeps what
a persistent session (CleanSession 0) must get later. By section of the MQTT 3.1.1 specification:

- [MQTT-3.1.2-5]: QoS 1 and 2 messages for a disconnected client with CleanSession 0 are kept and
  sent when it reconnects; [MQTT-3.1.2-6]: a clean session ends with its connection.
- [MQTT-4.4.0-1], [MQTT-3.3.1-1], [MQTT-4.6.0-2..3]: on reconnect, unacknowledged PUBLISH packets
  are sent again with DUP set, and PUBRELs for QoS 2 messages already received, in their original
  order, before anything new; nothing is given up after a timeout.
- [MQTT-3.8.4-6], section 3.3.5: a message goes out at the lower of its publish QoS and the
  subscription's (the broker works that out); a retained message sent for a new subscription
  carries RETAIN [MQTT-3.3.1-8].
- Section 4.3.3, method A: a QoS 2 PUBLISH is handed on before its PUBREC goes out, and its packet id
  kept (:attr:`ClientQueue.receipts`) until the PUBREL, so the same PUBLISH sent again is answered
  without being handed on twice; persistent sessions keep those ids across a restart.

A session belongs to the username that created it (:attr:`ClientQueue.owner`; None: anonymous), and
its owner and last address survive a restart with it: a restored session is checked against its
owner's ACL rights, and only its owner may resume it (gateway/broker/core.py).

Bounds (``[broker]``, counted): ``max_queued_messages`` per client, waiting and in flight together,
with ``queue_full`` (drop_oldest or drop_new); ``max_queued_bytes`` over all sessions (when it is
reached, the oldest message of the session holding the most bytes goes first); at most
``max_persistent_sessions``; a persistent session whose client stays away ``session_expiry_s`` ends.

Persistent sessions live in ``sessions.sqlite3`` (WAL, group commit, readable by the owner only). A
message for many sessions is stored once (``body``), each session holding a row that refers to it. A
QoS 1 PUBACK to a publisher waits for the commit that holds the message for offline subscribers, as
it waits for the journal; a message delivered and acknowledged within one commit window costs no
write. Retained messages are in the same file (gateway/broker/retained.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from gateway.broker import wire
from gateway.config import BrokerSettings
from pipeline.db import GroupCommit, SqliteThread

log = logging.getLogger(__name__)
SESSIONS_NAME = "sessions.sqlite3"
MAX_PENDING_OPS = 100_000  # writes waiting for a commit before the broker stops reading from clients
_SCHEMA = """
CREATE TABLE IF NOT EXISTS session (
    client_id TEXT PRIMARY KEY, username TEXT, owner_known INTEGER NOT NULL DEFAULT 0, address TEXT,
    last_seen REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscription (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL, PRIMARY KEY (client_id, filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS body (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS queued (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, body INTEGER NOT NULL, qos INTEGER NOT NULL,
    packet_id INTEGER, released INTEGER NOT NULL DEFAULT 0, retain INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipt (
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL, PRIMARY KEY (client_id, packet_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL)
    WITHOUT ROWID;
"""
OpKind = Literal["session", "seen", "drop_session", "subscribe", "unsubscribe", "body", "unbody", "message",
                 "sent", "released", "done", "receipt", "receipt_done", "retain", "unretain"]
_MESSAGE_OPS = frozenset({"message", "sent", "released", "done"})


@dataclass(slots=True, eq=False)
class Body:
    """A message's topic and payload, shared by every session it is queued for."""

    topic: str
    payload: bytes
    id: int = 0  # its row in sessions.sqlite3 once a persistent session holds it
    refs: int = 0  # stored deliveries that refer to it
    size: int = field(init=False)  # what it counts for in max_queued_bytes

    def __post_init__(self) -> None:
        self.size = len(self.topic) + len(self.payload)


@dataclass(slots=True)
class Delivery:
    """One message for one client: waiting, then in flight (``packet_id`` set) until acknowledged."""

    seq: int
    body: Body
    qos: int
    retain: bool = False
    packet_id: int | None = None
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    stored: bool = False  # a row in sessions.sqlite3 holds it


@dataclass(frozen=True, slots=True)
class _Op:
    kind: OpKind
    client_id: str = ""
    seq: int = 0
    text: str | None = None  # a filter, a topic, a username
    qos: int = 0
    payload: bytes = b""
    packet_id: int | None = None
    number: float = 0  # a body id, a time
    address: str | None = None
    flag: bool = False  # a message: retained


@dataclass(slots=True)
class StoredSession:
    username: str | None = None
    owner_known: bool = False
    address: str | None = None
    last_seen: float = 0
    subscriptions: dict[str, int] = field(default_factory=dict)
    messages: list[Delivery] = field(default_factory=list)
    receipts: set[int] = field(default_factory=set)


_Row = list[Any]


class _Batch:
    """Rows a batch adds, kept aside so that what is added and removed within it is never written; and
    the changes to rows of earlier batches, made together at its end."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, int], _Row] = {}
        self.bodies: dict[int, _Row] = {}
        self.sent: list[tuple[int | None, str, int]] = []
        self.released: list[tuple[str, int]] = []
        self.done: list[tuple[str, int]] = []
        self.unbodies: list[tuple[int]] = []


def _apply_session(conn: sqlite3.Connection, op: _Op, batch: _Batch) -> None:
    match op.kind:
        case "session":
            conn.execute("INSERT INTO session (client_id, username, owner_known, address, last_seen) "
                         "VALUES (?, ?, 1, ?, ?) ON CONFLICT (client_id) DO UPDATE SET username = excluded.username,"
                         " owner_known = 1, address = excluded.address, last_seen = excluded.last_seen",
                         (op.client_id, op.text, op.address, op.number))
        case "seen":
            conn.execute("UPDATE session SET last_seen = ? WHERE client_id = ?", (op.number, op.client_id))
        case "drop_session":
            for table in ("session", "subscription", "queued", "receipt"):
                conn.execute(f"DELETE FROM {table} WHERE client_id = ?", (op.client_id,))  # noqa: S608
            for key in [k for k in batch.messages if k[0] == op.client_id]:
                del batch.messages[key]
        case "subscribe":
            conn.execute("INSERT OR REPLACE INTO subscription (client_id, filter, qos) VALUES (?, ?, ?)",
                         (op.client_id, op.text, op.qos))
        case "unsubscribe":
            conn.execute("DELETE FROM subscription WHERE client_id = ? AND filter = ?", (op.client_id, op.text))
        case _:
            _apply_other(conn, op, batch)


def _apply_other(conn: sqlite3.Connection, op: _Op, batch: _Batch) -> None:
    match op.kind:
        case "receipt":
            conn.execute("INSERT OR IGNORE INTO receipt (client_id, packet_id) VALUES (?, ?)",
                         (op.client_id, op.packet_id))
        case "receipt_done":
            conn.execute("DELETE FROM receipt WHERE client_id = ? AND packet_id = ?", (op.client_id, op.packet_id))
        case "retain":
            conn.execute("INSERT OR REPLACE INTO retained (topic, payload, qos) VALUES (?, ?, ?)",
                         (op.text, op.payload, op.qos))
        case "unretain":
            conn.execute("DELETE FROM retained WHERE topic = ?", (op.text,))
        case "body":
            batch.bodies[int(op.number)] = [int(op.number), op.text, op.payload]
        case "unbody":
            if batch.bodies.pop(int(op.number), None) is None:
                batch.unbodies.append((int(op.number),))


def _apply_message(op: _Op, batch: _Batch) -> None:
    key = (op.client_id, op.seq)
    row = batch.messages.get(key)
    match op.kind:
        case "message":
            batch.messages[key] = [op.client_id, op.seq, int(op.number), op.qos, None, 0, int(op.flag)]
        case "sent" if row is not None:
            row[4] = op.packet_id
        case "sent":
            batch.sent.append((op.packet_id, *key))
        case "released" if row is not None:
            row[5] = 1
        case "released":
            batch.released.append(key)
        case "done" if row is not None:
            del batch.messages[key]
        case "done":
            batch.done.append(key)


def _apply(conn: sqlite3.Connection, batches: list[list[_Op]]) -> None:
    """Applies the operations in order; a message (or body) added and removed within them is never written."""
    batch = _Batch()
    for op in itertools.chain.from_iterable(batches):
        if op.kind in _MESSAGE_OPS:
            _apply_message(op, batch)
        else:
            _apply_session(conn, op, batch)
    conn.executemany("UPDATE queued SET packet_id = ? WHERE client_id = ? AND seq = ?", batch.sent)
    conn.executemany("UPDATE queued SET released = 1 WHERE client_id = ? AND seq = ?", batch.released)
    conn.executemany("DELETE FROM queued WHERE client_id = ? AND seq = ?", batch.done)
    conn.executemany("DELETE FROM body WHERE id = ?", batch.unbodies)
    if batch.bodies:
        conn.executemany("INSERT OR REPLACE INTO body (id, topic, payload) VALUES (?, ?, ?)",
                         list(batch.bodies.values()))
    if batch.messages:
        conn.executemany("INSERT OR REPLACE INTO queued (client_id, seq, body, qos, packet_id, released, retain) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", list(batch.messages.values()))


def _migrate(conn: sqlite3.Connection) -> None:
    """Files written before sessions had owners and shared bodies: add the columns, move the messages."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(session)")}
    for name, kind in (("username", "TEXT"), ("owner_known", "INTEGER NOT NULL DEFAULT 0"), ("address", "TEXT"),
                       ("last_seen", "REAL NOT NULL DEFAULT 0")):
        if name not in columns:
            conn.execute(f"ALTER TABLE session ADD COLUMN {name} {kind}")
    old = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
    if "payload" in old:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("SELECT client_id, seq, topic, payload, qos, packet_id, released FROM message").fetchall()
        for client_id, seq, topic, payload, qos, packet_id, released in rows:
            body = conn.execute("INSERT INTO body (topic, payload) VALUES (?, ?)", (topic, payload)).lastrowid
            conn.execute("INSERT INTO queued (client_id, seq, body, qos, packet_id, released) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (client_id, seq, body, qos, packet_id, released))
        conn.execute("DROP TABLE message")
        conn.execute("COMMIT")


@dataclass(slots=True)
class Restored:
    """What :meth:`SessionStore.open` found: the persistent sessions and the retained messages."""

    sessions: dict[str, StoredSession]
    retained: dict[str, tuple[bytes, int]]


class SessionStore:
    """Persistent sessions (and retained messages) in SQLite, written by group commit."""

    def __init__(self, path: Path, *, window_s: float = 0.01) -> None:
        self.path = path
        # A checkpoint every 1 MiB of WAL, and the WAL cut back to 1 MiB after it: the file stays about the
        # size of what it holds (bounded by max_queued_bytes and max_retained_bytes).
        self._db = SqliteThread(self.path, mode=0o600, pragmas=("wal_autocheckpoint=256", "journal_size_limit=1048576"))
        # Operations go to the group commit in lists, one per turn of the event loop (a future each):
        # a message queued for a thousand sessions is a thousand operations, not a thousand futures.
        self._commit: GroupCommit[list[_Op]] = GroupCommit(self._db, _apply, window_s=window_s)
        self._seq = itertools.count(1)
        self._body_ids = itertools.count(1)
        self._ops: list[_Op] = []
        self._ops_done: asyncio.Future[None] | None = None  # resolves when self._ops are committed
        self._uncommitted = 0
        self._last: asyncio.Future[None] | None = None

    async def open(self) -> Restored:
        await self._db.open(_SCHEMA)
        await self._db.run(_migrate)

        def load(conn: sqlite3.Connection) -> tuple[list[Any], ...]:
            return (conn.execute("SELECT client_id, username, owner_known, address, last_seen FROM session").fetchall(),
                    conn.execute("SELECT client_id, filter, qos FROM subscription").fetchall(),
                    conn.execute("SELECT id, topic, payload FROM body").fetchall(),
                    conn.execute("SELECT client_id, seq, body, qos, packet_id, released, retain FROM queued "
                                 "ORDER BY client_id, seq").fetchall(),
                    conn.execute("SELECT client_id, packet_id FROM receipt").fetchall(),
                    conn.execute("SELECT topic, payload, qos FROM retained").fetchall())

        sessions, subscriptions, bodies, messages, receipts, retained = await self._db.run(load)
        stored = {client_id: StoredSession(username, bool(known), address, last_seen)
                  for client_id, username, known, address, last_seen in sessions}
        for client_id, topic_filter, qos in subscriptions:
            stored.setdefault(client_id, StoredSession()).subscriptions[topic_filter] = qos
        by_id = {body_id: Body(topic, bytes(payload), body_id) for body_id, topic, payload in bodies}
        last_seq = 0
        for client_id, seq, body_id, qos, packet_id, released, retain in messages:
            body = by_id.get(body_id)
            if body is None:
                continue  # a row without its body (cannot happen through this code): nothing to send
            body.refs += 1
            stored.setdefault(client_id, StoredSession()).messages.append(
                Delivery(seq, body, qos, bool(retain), packet_id, bool(released), stored=True))
            last_seq = max(last_seq, seq)
        for client_id, packet_id in receipts:
            stored.setdefault(client_id, StoredSession()).receipts.add(packet_id)
        unused = [body.id for body in by_id.values() if not body.refs]
        self._seq = itertools.count(last_seq + 1)
        self._body_ids = itertools.count(max(by_id, default=0) + 1)
        self._commit.start("sessions-commit")
        for body_id in unused:
            self._submit(_Op("unbody", number=body_id))
        return Restored(stored, {topic: (bytes(payload), qos) for topic, payload, qos in retained})

    def next_seq(self) -> int:
        return next(self._seq)

    def submit(self, kind: OpKind, client_id: str = "", **fields: Any) -> asyncio.Future[None]:
        return self._submit(_Op(kind, client_id, **fields))

    def _submit(self, op: _Op) -> asyncio.Future[None]:
        """Queue ``op``; the future resolves once it is committed (with the others of this turn)."""
        self._ops.append(op)
        if self._ops_done is None:
            loop = asyncio.get_running_loop()
            self._ops_done = loop.create_future()
            loop.call_soon(self._hand_over)
        return self._ops_done

    def _hand_over(self) -> None:
        ops, done = self._ops, self._ops_done
        self._ops, self._ops_done = [], None
        if done is None:
            return
        self._uncommitted += len(ops)
        committed = self._commit.submit(ops)
        self._last = committed

        def settle(f: asyncio.Future[None]) -> None:
            self._uncommitted -= len(ops)
            if done.done():
                return
            if f.cancelled():
                done.cancel()
            elif (exc := f.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result(None)

        committed.add_done_callback(settle)

    async def wait_room(self) -> None:
        """Wait while more than :data:`MAX_PENDING_OPS` writes wait for their commit (the broker reads
        no more from its clients meanwhile: a disk slower than the clients holds them back, instead of
        the writes piling up in memory)."""
        while self._uncommitted > MAX_PENDING_OPS and self._last is not None:
            await asyncio.shield(self._last)

    def add(self, client_id: str, d: Delivery) -> asyncio.Future[None]:
        """Store a delivery (and its body, the first time a session holds it)."""
        body = d.body
        if not body.refs:
            if not body.id:
                body.id = next(self._body_ids)
            self._submit(_Op("body", text=body.topic, payload=body.payload, number=body.id))
        body.refs += 1
        d.stored = True
        return self._submit(_Op("message", client_id, d.seq, qos=d.qos, number=body.id, flag=d.retain))

    def remove(self, client_id: str, d: Delivery) -> None:
        if not d.stored:
            return
        d.stored = False
        self._submit(_Op("done", client_id, d.seq))
        d.body.refs -= 1
        if not d.body.refs:
            self._submit(_Op("unbody", number=d.body.id))

    @property
    def commits(self) -> int:
        return self._commit.commits

    async def close(self) -> None:
        self._hand_over()
        await self._commit.stop()
        await self._db.close()


class Outlet(Protocol):
    """A connected client, as its queue sends to it (gateway/broker/core.py ``Connection``)."""

    async def send(self, data: bytes) -> None: ...

    def post(self, data: bytes) -> None: ...


class QueueBudget:
    """``max_queued_bytes`` over every session's messages (topic and payload, waiting or in flight)."""

    def __init__(self, limit: int, queues: dict[str, ClientQueue]) -> None:
        self.limit = limit
        self.used = 0
        self.evicted = 0
        self._queues = queues
        self._full = False

    def make_room(self, size: int) -> bool:
        """Room for ``size`` more bytes; False when there never can be (a message larger than the bound).
        When the bound is reached, the sessions that hold the most lose their oldest messages until 90 %
        of it is used: one sweep (a heap of the sessions by size) pays for many messages."""
        if size > self.limit:
            return False
        if self.used + size <= self.limit:
            if self._full and self.used < self.limit // 2:
                self._full = False
                log.info("MQTT sessions: back under half of max_queued_bytes (%d message(s) evicted so far)",
                         self.evicted)
            return True
        if not self._full:
            self._full = True
            log.warning("MQTT sessions: max_queued_bytes (%d) reached: the sessions holding the most lose their "
                        "oldest messages (counted as queued_bytes_evicted; logged again once under half)", self.limit)
        target = min(self.limit * 9 // 10, self.limit - size)
        heap = [(-q.bytes, i, q) for i, q in enumerate(self._queues.values()) if q.bytes]
        heapq.heapify(heap)
        while self.used > target and heap:
            _, i, victim = heapq.heappop(heap)
            victim.evict_oldest()
            self.evicted += 1
            if victim.bytes:
                heapq.heappush(heap, (-victim.bytes, i, victim))
        return self.used + size <= self.limit


class ClientQueue:
    """One client's session: messages waiting and in flight, subscriptions, QoS 2 receipts, and its
    sender while connected."""

    def __init__(
        self, client_id: str, persistent: bool, settings: BrokerSettings, *, store: SessionStore,
        drops: dict[str, int], budget: QueueBudget, owner: str | None, address: str | None,
    ) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.owner = owner
        self.owner_known = True
        self.address = address
        self.last_seen = time.time()
        self._drops = drops
        self._budget = budget
        self._limit = settings.max_queued_messages
        self._drop_new = settings.queue_full == "drop_new"
        self._window = min(settings.max_inflight, settings.max_queued_messages)
        self._store = store
        self.subscriptions: dict[str, int] = {}
        self.receipts: set[int] = set()  # QoS 2 PUBLISHes answered with PUBREC, not released yet
        self.receipt_gates: dict[int, asyncio.Future[Any]] = {}  # ... whose PUBREC waits for durability
        self.queued: deque[Delivery] = deque()
        self.inflight: OrderedDict[int, Delivery] = OrderedDict()
        self.bytes = 0
        self.dropped = 0
        self._next_id = 0
        self._full = False
        self._dropped_at_full = 0
        self._wake = asyncio.Event()
        self._outlet: Outlet | None = None
        self._task: asyncio.Task[None] | None = None

    def restore(self, stored: StoredSession) -> None:
        self.owner, self.owner_known, self.address = stored.username, stored.owner_known, stored.address
        self.last_seen = stored.last_seen or time.time()
        self.subscriptions = dict(stored.subscriptions)
        self.receipts = set(stored.receipts)
        for d in stored.messages:
            self.bytes += d.body.size
            self._budget.used += d.body.size
            if d.packet_id is not None:
                self.inflight[d.packet_id] = d
            else:
                self.queued.append(d)

    def __len__(self) -> int:
        return len(self.queued) + len(self.inflight)

    @property
    def connected(self) -> bool:
        return self._outlet is not None

    def enqueue(self, body: Body, qos: int, *, retain: bool = False) -> asyncio.Future[None] | None:
        """Queue a message; the future (persistent sessions, QoS 1 and 2) resolves once it is durable."""
        if len(self) >= self._limit:
            self._count_drop()
            if self._drop_new:
                return None
            self._forget(self.queued.popleft() if self.queued else self.inflight.popitem(last=False)[1])
        if not self._budget.make_room(body.size):
            self._count_drop(log_full=False)
            return None
        d = Delivery(self._store.next_seq(), body, qos, retain)
        self.queued.append(d)
        self.bytes += body.size
        self._budget.used += body.size
        self._wake.set()
        if self.persistent and qos:
            return self._store.add(self.client_id, d)
        return None

    def evict_oldest(self) -> None:
        """The total of queued bytes is reached: this session's oldest message goes (the budget logs it)."""
        if self.queued or self.inflight:
            self._count_drop(log_full=False)
            self._forget(self.queued.popleft() if self.queued else self.inflight.popitem(last=False)[1])

    def _count_drop(self, *, log_full: bool = True) -> None:
        self.dropped += 1
        self._drops[self.client_id] = self._drops.get(self.client_id, 0) + 1
        if log_full and not self._full:
            self._full = True
            self._dropped_at_full = self.dropped
            log.warning("MQTT client %s: session queue full (%d messages), dropping the %s from now on",
                        self.client_id, self._limit, "newest" if self._drop_new else "oldest")

    def _forget(self, d: Delivery) -> None:
        self.bytes -= d.body.size
        self._budget.used -= d.body.size
        self._store.remove(self.client_id, d)

    def _settled(self, d: Delivery) -> None:
        if d.packet_id is not None and self.inflight.get(d.packet_id) is d:
            del self.inflight[d.packet_id]
        self._forget(d)
        self._wake.set()
        if self._full and len(self) <= self._limit // 2:
            self._full = False
            log.info("MQTT client %s: session queue has room again (%d message(s) dropped while full)",
                     self.client_id, self.dropped - self._dropped_at_full + 1)

    def clear(self) -> None:
        """Everything this session holds goes (it ends)."""
        for d in [*self.queued, *self.inflight.values()]:
            self._forget(d)
        self.queued.clear()
        self.inflight.clear()
        self.receipts.clear()

    def attach(self, outlet: Outlet) -> None:
        """The client is connected (again): send what is in flight, then what waits."""
        self.detach(None)
        self._outlet = outlet
        self._task = asyncio.create_task(self._send_loop(outlet), name=f"mqtt-out {self.client_id}")

    def detach(self, outlet: Outlet | None) -> None:
        """The connection of ``outlet`` ended (None: whichever is attached)."""
        if outlet is not None and outlet is not self._outlet:
            return  # an older connection, taken over since
        self._outlet = None
        self.last_seen = time.time()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if not self.persistent:  # [MQTT-3.1.2-6]: a clean session's state ends with its connection
            self.clear()

    async def _send_loop(self, outlet: Outlet) -> None:
        try:
            for d in list(self.inflight.values()):  # [MQTT-4.4.0-1], in order [MQTT-4.6.0-2]
                await self._transmit(outlet, d, dup=True)
            while True:
                while self.queued and len(self.inflight) < self._window:
                    d = self.queued.popleft()
                    if d.qos:
                        d.packet_id = self._packet_id()
                        self.inflight[d.packet_id] = d
                        if d.stored:
                            self._store.submit("sent", self.client_id, seq=d.seq, packet_id=d.packet_id)
                    await self._transmit(outlet, d, dup=False)
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection is going away; what is in flight stays for the next one
            log.debug("MQTT client %s: sending stopped: %s", self.client_id, exc)

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id

    async def _transmit(self, outlet: Outlet, d: Delivery, *, dup: bool) -> None:
        if d.qos == 0:
            await outlet.send(wire.publish(d.body.topic, d.body.payload, 0, None, retain=d.retain))
            self._settled(d)
        elif d.released:
            await outlet.send(wire.pubrel(d.packet_id or 0))
        else:
            await outlet.send(wire.publish(d.body.topic, d.body.payload, d.qos, d.packet_id, dup=dup, retain=d.retain))

    def acknowledged(self, kind: Literal["puback", "pubrec", "pubcomp"], packet_id: int) -> None:
        """The client's PUBACK, PUBREC or PUBCOMP."""
        d = self.inflight.get(packet_id)
        if d is None:
            return  # unknown (dropped meanwhile, or the client's mistake)
        if (kind == "puback" and d.qos == 1) or (kind == "pubcomp" and d.released):
            self._settled(d)
        elif kind == "pubrec" and d.qos == 2:
            if not d.released:
                d.released = True  # [MQTT-4.3.3-1]: the PUBLISH is not sent again, the PUBREL is
                if d.stored:
                    self._store.submit("released", self.client_id, seq=d.seq)
            if self._outlet is not None:
                self._outlet.post(wire.pubrel(packet_id))

    # -- QoS 2 receipts (a publisher's PUBLISHes answered with PUBREC) ---------------------------------

    def receive(self, packet_id: int) -> asyncio.Future[None] | None:
        self.receipts.add(packet_id)
        return self._store.submit("receipt", self.client_id, packet_id=packet_id) if self.persistent else None

    def release(self, packet_id: int) -> asyncio.Future[None] | None:
        """The PUBREL: forget the id (durably, before the PUBCOMP lets the client use it again)."""
        if packet_id not in self.receipts:
            return None
        self.receipts.discard(packet_id)
        return self._store.submit("receipt_done", self.client_id, packet_id=packet_id) if self.persistent else None


class Sessions:
    """Every client's :class:`ClientQueue`, and the store behind the persistent ones."""

    def __init__(self, settings: BrokerSettings, data_dir: Path | None) -> None:
        self.settings = settings
        # No data directory (a broker on its own, in tests): persistent sessions last as long as the process.
        self.store = SessionStore(data_dir / SESSIONS_NAME if data_dir is not None else Path(":memory:"))
        self.queues: dict[str, ClientQueue] = {}
        self.drops: dict[str, int] = {}  # client id -> messages dropped from its session (while it lasts)
        self._dropped_before = 0  # ... from sessions that have ended
        self.budget = QueueBudget(settings.max_queued_bytes, self.queues)
        self.refused = 0  # new persistent sessions refused: max_persistent_sessions reached
        self.expired = 0
        self._persistent = 0

    async def open(self) -> Restored:
        """Load the persistent sessions (:attr:`queues`); what was restored comes back too (its
        subscriptions go into the broker's index, its retained messages to the retained store)."""
        restored = await self.store.open()
        for client_id, stored in restored.sessions.items():
            queue = self._new(client_id, persistent=True, owner=stored.username, address=stored.address)
            queue.restore(stored)
        if self.queues:
            log.info("restored %d persistent MQTT session(s) holding %d message(s)", len(self.queues),
                     sum(len(q) for q in self.queues.values()))
        return restored

    async def close(self) -> None:
        for queue in self.queues.values():
            queue.detach(None)
        await self.store.close()

    def _new(self, client_id: str, *, persistent: bool, owner: str | None, address: str | None) -> ClientQueue:
        queue = self.queues[client_id] = ClientQueue(client_id, persistent, self.settings, store=self.store,
                                                     drops=self.drops, budget=self.budget, owner=owner, address=address)
        self._persistent += persistent
        return queue

    def create(self, client_id: str, *, persistent: bool, owner: str | None, address: str | None
               ) -> ClientQueue | None:
        """A new session (any old one under this client id must be forgotten first); None when it
        would be one persistent session more than ``max_persistent_sessions``."""
        if persistent and self._persistent >= self.settings.max_persistent_sessions:
            self.refused += 1
            return None
        queue = self._new(client_id, persistent=persistent, owner=owner, address=address)
        if persistent:
            self.claimed(queue, owner, address)
        return queue

    def claimed(self, queue: ClientQueue, owner: str | None, address: str | None) -> None:
        """A client resumes ``queue`` (or creates it) as ``owner``, from ``address``."""
        queue.owner, queue.owner_known, queue.address = owner, True, address
        if queue.persistent:
            self.store.submit("session", queue.client_id, text=owner, address=address, number=time.time())

    def disconnected(self, queue: ClientQueue) -> None:
        if queue.persistent and self.queues.get(queue.client_id) is queue:
            self.store.submit("seen", queue.client_id, number=queue.last_seen)

    def forget(self, client_id: str) -> ClientQueue | None:
        """A session ends: a clean one when its connection does, a persistent one when the client
        connects with CleanSession 1 [MQTT-3.1.2-6] or it expires."""
        queue = self.queues.pop(client_id, None)
        if queue is None:
            return None
        queue.detach(None)
        queue.clear()
        self._dropped_before += self.drops.pop(client_id, 0)
        self._persistent -= queue.persistent
        if queue.persistent:
            self.store.submit("drop_session", client_id)
        return queue

    def expire(self, now: float) -> list[ClientQueue]:
        """End the persistent sessions whose client has been away ``session_expiry_s``."""
        horizon = now - self.settings.session_expiry_s
        gone = [q for q in self.queues.values() if q.persistent and not q.connected and q.last_seen < horizon]
        for queue in gone:
            self.forget(queue.client_id)
        if gone:
            self.expired += len(gone)
            log.info("%d persistent MQTT session(s) expired (away more than %g s)", len(gone),
                     self.settings.session_expiry_s)
        return gone

    def subscribed(self, queue: ClientQueue, topic_filter: str, qos: int) -> None:
        queue.subscriptions[topic_filter] = qos
        if queue.persistent:
            self.store.submit("subscribe", queue.client_id, text=topic_filter, qos=qos)

    def unsubscribed(self, queue: ClientQueue, filters: Iterable[str]) -> list[str]:
        removed = []
        for topic_filter in filters:
            if queue.subscriptions.pop(topic_filter, None) is not None:
                removed.append(topic_filter)
                if queue.persistent:
                    self.store.submit("unsubscribe", queue.client_id, text=topic_filter)
        return removed

    def stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.queues),
            "persistent": self._persistent,
            "connected": sum(q.connected for q in self.queues.values()),
            "queued": sum(len(q) for q in self.queues.values()),
            "bytes": self.budget.used,
            "dropped": dict(self.drops),
            "dropped_total": self._dropped_before + sum(self.drops.values()),
            "commits": self.store.commits,
        }
