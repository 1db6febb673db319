"""The durable outbox: one SQLite file, one ordered queue per destination.

An event enters when it is published on the embedded broker under a topic a destination forwards,
and leaves only when that destination has acknowledged it. Each destination's queue is bounded by
bytes; when it is full the configured policy applies: ``drop_oldest`` deletes the oldest events
(counted, and raised as an alert by the caller), ``refuse`` makes the publisher wait, which pushes
back through the pipeline to the broker and the devices.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.forward.base import OutboundEvent
from pipeline.db import GroupCommit, SqliteThread

OUTBOX_NAME = "outbox.sqlite3"
WhenFull = Literal["drop_oldest", "refuse"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    dest       TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    topic      TEXT NOT NULL,
    key        TEXT NOT NULL,
    payload    BLOB NOT NULL,
    size       INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    UNIQUE (dest, event_id)
);
CREATE INDEX IF NOT EXISTS outbox_by_dest ON outbox (dest, seq);
"""


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    when_full: WhenFull


@dataclass(slots=True)
class QueueStats:
    """What an operator needs to see of one destination's queue."""

    depth: int = 0
    bytes: int = 0
    enqueued: int = 0
    delivered: int = 0
    dropped: int = 0
    refused_waits: int = 0
    oldest_ms: int | None = None
    last_lag_ms: int | None = None  # enqueue -> acknowledged, for the last delivered event

    def as_dict(self, now_ms: int) -> dict[str, object]:
        return {
            "depth": self.depth, "bytes": self.bytes, "enqueued": self.enqueued, "delivered": self.delivered,
            "dropped": self.dropped, "refused_waits": self.refused_waits,
            "oldest_age_s": round((now_ms - self.oldest_ms) / 1000, 3) if self.oldest_ms and self.depth else 0.0,
            "delivery_lag_s": round(self.last_lag_ms / 1000, 3) if self.last_lag_ms is not None else None,
        }


@dataclass(slots=True)
class _Op:
    """One operation of a group commit; ``freed``/``removed`` are filled in on the database thread."""

    kind: Literal["insert", "drop", "ack"]
    dest: str
    row: tuple[str, str, str, bytes, int, int] | None = None  # event_id, topic, key, payload, size, created
    need: int = 0
    seqs: tuple[int, ...] = ()  # ack: the first and last sequence of the run
    count: int = 0  # ack: events in the run
    size: int = 0  # ack: their bytes, as enqueue counted them
    freed: int = 0
    removed: int = 0
    created: list[int] = field(default_factory=list)


def _apply(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    for op in ops:
        if op.kind == "insert" and op.row is not None:
            conn.execute(
                "INSERT OR IGNORE INTO outbox (dest, event_id, topic, key, payload, size, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (op.dest, *op.row),
            )
            if conn.execute("SELECT changes()").fetchone()[0] == 0:  # a replay of an event still queued
                op.freed = op.row[4]
        elif op.kind == "drop":
            for seq, size in conn.execute(
                "SELECT seq, size FROM outbox WHERE dest = ? ORDER BY seq LIMIT 10000", (op.dest,)
            ).fetchall():
                if op.freed >= op.need:
                    break
                conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                op.freed += size
                op.removed += 1
        elif op.kind == "ack" and op.seqs:
            # The acknowledged events are a run of their destination's queue: one statement removes them.
            run = (op.dest, op.seqs[0], op.seqs[-1])
            if conn.execute("SELECT count(*) FROM outbox WHERE dest = ? AND seq BETWEEN ? AND ?", run).fetchone()[0] \
                    == op.count:  # all still there (the usual case): the sender knows their sizes
                conn.execute("DELETE FROM outbox WHERE dest = ? AND seq BETWEEN ? AND ?", run)
                op.freed, op.removed = op.size, op.count
                continue
            for size, created in conn.execute(  # some were dropped meanwhile: count what goes now
                "DELETE FROM outbox WHERE dest = ? AND seq BETWEEN ? AND ? RETURNING size, created_ms", run,
            ).fetchall():
                op.freed += size
                op.removed += 1
                op.created.append(created)


def _size(event: OutboundEvent) -> int:
    """What an event counts against its queue's bound (as :meth:`Outbox.enqueue` counts it)."""
    return len(event.payload) + len(event.topic) + len(event.event_id) + len(event.key)


class Outbox:
    def __init__(
        self, data_dir: Path, limits: dict[str, Limits], *, on_drop: Callable[[str, int], None] | None = None,
        window_s: float = 0.005, interval_s: float = 0.0,
    ) -> None:
        """``interval_s``: commits at most this often under light load (``[storage] commit_interval_s``)."""
        self.path = data_dir / OUTBOX_NAME
        self._db = SqliteThread(self.path)
        self._commit: GroupCommit[_Op] = GroupCommit(self._db, _apply, window_s=window_s, interval_s=interval_s)
        self._limits = limits
        self._on_drop = on_drop
        self.stats = {dest: QueueStats() for dest in limits}
        self._reserved = dict.fromkeys(limits, 0)  # bytes pending drops will free
        self._room = {dest: asyncio.Condition() for dest in limits}
        self._new = {dest: asyncio.Event() for dest in limits}

    async def open(self) -> None:
        await self._db.open(_SCHEMA)
        for dest in self._limits:
            await self._load(dest)
        self._commit.start("outbox-commit")

    async def _load(self, dest: str) -> None:
        """What the file already holds for ``dest`` (left by an earlier run, or before a reload)."""
        depth, size, oldest = await self._db.run(
            lambda c: c.execute("SELECT count(*), coalesce(sum(size), 0), min(created_ms) FROM outbox "
                                "WHERE dest = ?", (dest,)).fetchone()
        )
        self.stats[dest] = QueueStats(depth=depth, bytes=size, oldest_ms=oldest)
        if depth:
            self._new[dest].set()

    async def add(self, dest: str, limits: Limits) -> None:
        """A destination added by a reload (its queue, if one is left in the file, resumes)."""
        self._limits[dest] = limits
        self._reserved.setdefault(dest, 0)
        self._room.setdefault(dest, asyncio.Condition())
        self._new.setdefault(dest, asyncio.Event())
        await self._load(dest)

    async def close(self) -> None:
        await self._commit.stop()
        await self._db.close()

    async def enqueue(self, dest: str, event_id: str, topic: str, key: str, payload: bytes) -> asyncio.Future[None]:
        """Queue an event for ``dest``; the future resolves when it is durable."""
        stats, limits = self.stats[dest], self._limits[dest]
        size = len(payload) + len(topic) + len(event_id) + len(key)  # as _size counts it
        now_ms = int(time.time() * 1000)
        if size > limits.max_bytes:  # can never fit: counted as a drop, never silently
            stats.dropped += 1
            if self._on_drop:
                self._on_drop(dest, 1)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        over = stats.bytes - self._reserved[dest] + size - limits.max_bytes
        if over > 0 and limits.when_full == "refuse":
            stats.refused_waits += 1
            async with self._room[dest]:
                await self._room[dest].wait_for(lambda: stats.bytes + size <= limits.max_bytes)
        elif over > 0:
            self._reserved[dest] += over
            drop = _Op("drop", dest, need=over)
            self._commit.submit(drop).add_done_callback(lambda f: self._dropped(drop, f))
        stats.bytes += size
        stats.depth += 1
        stats.enqueued += 1
        stats.oldest_ms = stats.oldest_ms or now_ms
        insert = _Op("insert", dest, row=(event_id, topic, key, payload, size, now_ms))
        future = self._commit.submit(insert)
        future.add_done_callback(lambda f: self._inserted(insert, f))
        return future

    def _inserted(self, op: _Op, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        stats = self.stats[op.dest]
        if op.freed:  # already queued (a replay): undo the optimistic count
            stats.bytes -= op.freed
            stats.depth -= 1
            stats.enqueued -= 1
        self._new[op.dest].set()

    def _dropped(self, op: _Op, future: asyncio.Future[None]) -> None:
        self._reserved[op.dest] -= op.need
        if future.cancelled() or future.exception() is not None:
            return
        stats = self.stats[op.dest]
        stats.bytes -= op.freed
        stats.depth -= op.removed
        stats.dropped += op.removed
        if op.removed and self._on_drop:
            self._on_drop(op.dest, op.removed)

    async def flush(self) -> None:
        await self._commit.flush()

    async def committed(self) -> None:
        """Until what was queued so far is committed, on the outbox's own cadence."""
        await self._commit.committed()

    async def wait_new(self, dest: str, timeout_s: float) -> None:
        event = self._new[dest]
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return
        event.clear()

    async def fetch(self, dest: str, limit: int, after_seq: int = 0, upto_seq: int | None = None
                    ) -> list[OutboundEvent]:
        """The oldest committed events for ``dest`` with ``after_seq < seq <= upto_seq``, in order."""
        upto = upto_seq if upto_seq is not None else 2**62
        rows = await self._db.run(
            lambda c: c.execute(
                "SELECT seq, event_id, topic, key, payload, created_ms FROM outbox WHERE dest = ? AND seq > ? "
                "AND seq <= ? ORDER BY seq LIMIT ?", (dest, after_seq, upto, limit),
            ).fetchall()
        )
        return [OutboundEvent(seq, eid, topic, key, bytes(payload), created) for seq, eid, topic, key, payload, created
                in rows]

    def drop(self, dest: str, event: OutboundEvent) -> None:
        """Remove an event its destination can never take: counted as dropped, and alerted."""
        op = _Op("ack", dest, seqs=(event.seq, event.seq), count=1, size=_size(event))

        def dropped(future: asyncio.Future[None]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            stats = self.stats[dest]
            stats.bytes -= op.freed
            stats.depth -= op.removed
            stats.dropped += op.removed
            if op.removed and self._on_drop:
                self._on_drop(dest, op.removed)

        self._commit.submit(op).add_done_callback(dropped)

    async def max_seq(self, dest: str) -> int:
        row = await self._db.run(lambda c: c.execute("SELECT max(seq) FROM outbox WHERE dest = ?", (dest,)).fetchone())
        return int(row[0] or 0)

    def ack(self, dest: str, events: list[OutboundEvent]) -> asyncio.Future[None]:
        """The destination has them (a run of ``dest``'s events, in order): remove them. Resolved once
        the removal is committed; a sender that fetches by sequence need not wait for it."""
        if not events:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        op = _Op("ack", dest, seqs=(events[0].seq, events[-1].seq), count=len(events),
                 size=sum(map(_size, events)), created=[events[-1].created_ms])
        future = self._commit.submit(op)
        future.add_done_callback(lambda f: self._acked(op, events, f))
        return future

    def _acked(self, op: _Op, events: list[OutboundEvent], future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None or not events:
            return
        dest = op.dest
        stats = self.stats[dest]
        stats.bytes -= op.freed
        stats.depth -= op.removed
        stats.delivered += op.removed
        now_ms = int(time.time() * 1000)
        if op.created:
            stats.last_lag_ms = now_ms - max(op.created)
        if stats.depth == 0:
            stats.oldest_ms = None
        elif stats.oldest_ms is None or events[0].created_ms <= stats.oldest_ms:
            stats.oldest_ms = events[-1].created_ms  # approximate: the next oldest is at least this young
        asyncio.get_running_loop().create_task(self._notify_room(dest))

    async def _notify_room(self, dest: str) -> None:
        async with self._room[dest]:
            self._room[dest].notify_all()
