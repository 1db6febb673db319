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
import json
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pipeline.db import GroupCommit, SqliteThread, insert_many
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
-- The index on (done, event_id) of earlier versions served only the resend memory's trim, which now
-- runs every TRIM_EVERY done marks: three index updates a message cost more than that scan.
DROP INDEX IF EXISTS journal_pending;
"""


TRIM_EVERY = 2000  # done marks between two trims of the resend memory (a trim walks RESEND_MEMORY index entries)


@dataclass(slots=True)  # not frozen: made for every message, and frozen slots classes init slowly
class _Op:
    append: RawMessage | None = None
    packet_id: int | None = None
    digest: bytes | None = None  # of a QoS 1/2 message from a client: what a resend must match
    done: tuple[str, ...] = ()
    trim: bool = False


def digest(topic: str, payload: bytes) -> bytes:
    """What a resend must match besides (client, packet id): a device that restarts its packet ids
    can reuse one for a different message."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=8).digest()


def _apply(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    rows = [
        (m.event_id, m.topic, m.payload, m.origin, to_ms(m.received_at), op.packet_id, op.digest)
        for op in ops if (m := op.append) is not None
    ]
    insert_many(conn, "INSERT OR IGNORE INTO journal (event_id, topic, payload, origin, received_ms, packet_id, "
                      "digest) VALUES", "", rows)  # many to a statement (pipeline/db.py says why)
    done = [event_id for op in ops for event_id in op.done]
    if done:
        # Done rows keep only what resend detection needs (one statement for all) ...
        conn.execute("UPDATE journal SET done = 1, payload = x'' WHERE event_id IN (SELECT value FROM json_each(?))",
                     (json.dumps(done),))
    if any(op.trim for op in ops):  # ... and the oldest beyond RESEND_MEMORY go, every TRIM_EVERY done marks
        conn.execute(
            "DELETE FROM journal WHERE done = 1 AND event_id < (SELECT event_id FROM journal WHERE done = 1 "
            "ORDER BY event_id DESC LIMIT 1 OFFSET ?)", (RESEND_MEMORY,),
        )


class Journal:
    def __init__(self, data_dir: Path, *, window_s: float = 0.005, interval_s: float = 0.0) -> None:
        """``interval_s``: commits at most this often under light load (``[storage] commit_interval_s``)."""
        self.path = data_dir / JOURNAL_NAME
        self._db = SqliteThread(self.path, mode=0o600)  # raw messages: for the gateway only
        self._commit: GroupCommit[_Op] = GroupCommit(self._db, _apply, window_s=window_s, interval_s=interval_s)
        self.appended = 0
        self.replayed = 0
        self.resends_recognised = 0
        self._resend: OrderedDict[tuple[str, int], tuple[str, bytes]] = OrderedDict()
        self._untrimmed = TRIM_EVERY  # done marks since the last trim (the first ones trim what a last run left)

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
        resend, key = self._resend, (origin, packet_id)
        if key in resend:  # the packet id came round again: newest now
            resend.move_to_end(key)
        resend[key] = (event_id, hashed)
        if len(resend) > RESEND_MEMORY:
            resend.popitem(last=False)

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
        hashed = None
        if packet_id is not None and message.origin is not None:
            hashed = digest(message.topic, message.payload)
            self._remember(message.origin, packet_id, message.event_id, hashed)
        return self._commit.submit(_Op(append=message, packet_id=packet_id, digest=hashed))

    def done(self, event_ids: list[str]) -> asyncio.Future[None]:
        """The pipeline is through with these (one batch): marked on the journal's next commit."""
        self._untrimmed += len(event_ids)
        trim = self._untrimmed >= TRIM_EVERY
        if trim:
            self._untrimmed = 0
        return self._commit.submit(_Op(done=tuple(event_ids), trim=trim))

    def hurry(self) -> None:
        """Commit what is pending without waiting for more to join (pipeline/db.py ``GroupCommit.hurry``)."""
        self._commit.hurry()

    async def flush(self) -> None:
        """Commit what was appended and marked done, now."""
        await self._commit.flush()

    async def committed(self) -> None:
        """Until what was appended so far is committed, on the journal's own cadence."""
        await self._commit.committed()

    async def close(self) -> None:
        await self._commit.stop()
        await self._db.close()

    @property
    def commits(self) -> int:
        return self._commit.commits
