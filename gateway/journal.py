"""The ingest journal: every raw message is written here before its device is acknowledged, and
marked done once the pipeline has committed what it produced (readings in the store, events in the
outboxes). After a crash or a ``kill -9`` the messages not done are replayed, with the event ids they
were first given, so nothing acknowledged is lost and a replay duplicates nothing downstream but by
the same event id.

The journal also remembers, for the last :data:`RESEND_MEMORY` QoS 1 messages, which MQTT client
and packet id each came with. A device that did not get its PUBACK (the gateway died first) sends
the message again with the DUP flag; :meth:`Journal.resent_id` gives it the event id it already has,
so the far side sees one event, perhaps twice, never two."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pipeline.db import GroupCommit, SqliteThread
from pipeline.model import to_ms, utc_from_ms
from pipeline.stage import RawMessage

JOURNAL_NAME = "journal.sqlite3"
RESEND_MEMORY = 20_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    event_id    TEXT PRIMARY KEY,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    origin      TEXT,
    received_ms INTEGER NOT NULL,
    packet_id   INTEGER,
    digest      BLOB,
    done        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_pending ON journal (done, event_id);
"""


@dataclass(frozen=True, slots=True)
class _Op:
    append: RawMessage | None = None
    packet_id: int | None = None
    done: tuple[str, ...] = ()


def digest(topic: str, payload: bytes) -> bytes:
    """What a resend must match besides (client, packet id): a device that restarts its packet ids
    can reuse one for a different message."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=8).digest()


def _apply(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    rows = [
        (m.event_id, m.topic, m.payload, m.origin, to_ms(m.received_at), op.packet_id, digest(m.topic, m.payload))
        for op in ops if (m := op.append) is not None
    ]
    if rows:
        conn.executemany("INSERT OR IGNORE INTO journal (event_id, topic, payload, origin, received_ms, packet_id, "
                         "digest) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    done = [(event_id,) for op in ops for event_id in op.done]
    if done:
        # Done rows keep only what resend detection needs; the oldest beyond RESEND_MEMORY go.
        conn.executemany("UPDATE journal SET done = 1, payload = x'' WHERE event_id = ?", done)
        conn.execute(
            "DELETE FROM journal WHERE done = 1 AND event_id < (SELECT event_id FROM journal WHERE done = 1 "
            "ORDER BY event_id DESC LIMIT 1 OFFSET ?)", (RESEND_MEMORY,),
        )


class Journal:
    def __init__(self, data_dir: Path, *, window_s: float = 0.005) -> None:
        self.path = data_dir / JOURNAL_NAME
        self._db = SqliteThread(self.path, mode=0o600)  # raw messages: for the gateway only
        self._commit: GroupCommit[_Op] = GroupCommit(self._db, _apply, window_s=window_s)
        self.appended = 0
        self.replayed = 0
        self.resends_recognised = 0
        self._resend: OrderedDict[tuple[str, int], tuple[str, bytes]] = OrderedDict()

    async def open(self) -> list[RawMessage]:
        """Open, and return what a previous run accepted but did not finish, oldest first."""
        await self._db.open(_SCHEMA)
        rows = await self._db.run(
            lambda c: c.execute(
                "SELECT event_id, topic, payload, origin, received_ms, packet_id, digest, done FROM journal "
                "ORDER BY event_id"
            ).fetchall()
        )
        self._commit.start("journal-commit")
        recovered = []
        for event_id, topic, payload, origin, received_ms, packet_id, hashed, done in rows:
            if packet_id is not None and origin is not None and hashed is not None:
                self._remember(origin, packet_id, event_id, bytes(hashed))
            if not done:
                recovered.append(RawMessage(topic, bytes(payload), origin, utc_from_ms(received_ms), event_id))
        self.replayed = len(recovered)
        return recovered

    def _remember(self, origin: str, packet_id: int, event_id: str, hashed: bytes) -> None:
        self._resend[(origin, packet_id)] = (event_id, hashed)
        self._resend.move_to_end((origin, packet_id))
        if len(self._resend) > RESEND_MEMORY:
            self._resend.popitem(last=False)

    def resent_id(self, origin: str, packet_id: int, topic: str, payload: bytes) -> str | None:
        """The event id of the same message (topic and payload) this client last sent under this
        packet id, if remembered; None for anything else."""
        known = self._resend.get((origin, packet_id))
        if known is None or known[1] != digest(topic, payload):
            return None
        self.resends_recognised += 1
        return known[0]

    def append(self, message: RawMessage, packet_id: int | None = None) -> asyncio.Future[None]:
        """Resolved once the message is durable."""
        self.appended += 1
        if packet_id is not None and message.origin is not None:
            self._remember(message.origin, packet_id, message.event_id, digest(message.topic, message.payload))
        return self._commit.submit(_Op(append=message, packet_id=packet_id))

    def done(self, event_ids: list[str]) -> asyncio.Future[None]:
        return self._commit.submit(_Op(done=tuple(event_ids)))

    async def flush(self) -> None:
        await self._commit.flush()

    async def close(self) -> None:
        await self._commit.stop()
        await self._db.close()

    @property
    def commits(self) -> int:
        return self._commit.commits
