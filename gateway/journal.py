"""The ingest journal: every raw message is written here before its device is acknowledged, and
removed once the pipeline has committed what it produced (readings in the store, events in the
outboxes). After a crash or a ``kill -9`` the messages still in the journal are replayed, with the
event ids they were first given, so nothing acknowledged is lost and a replay duplicates nothing
downstream but by the same event id."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pipeline.db import GroupCommit, SqliteThread
from pipeline.model import to_ms, utc_from_ms
from pipeline.stage import RawMessage

JOURNAL_NAME = "journal.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    event_id    TEXT PRIMARY KEY,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    origin      TEXT,
    received_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class _Op:
    append: RawMessage | None = None
    done: tuple[str, ...] = ()


def _apply(conn: sqlite3.Connection, ops: list[_Op]) -> None:
    rows = [
        (m.event_id, m.topic, m.payload, m.origin, to_ms(m.received_at)) for op in ops if (m := op.append) is not None
    ]
    if rows:
        conn.executemany("INSERT OR IGNORE INTO journal VALUES (?, ?, ?, ?, ?)", rows)
    done = [(event_id,) for op in ops for event_id in op.done]
    if done:
        conn.executemany("DELETE FROM journal WHERE event_id = ?", done)


class Journal:
    def __init__(self, data_dir: Path, *, window_s: float = 0.005) -> None:
        self.path = data_dir / JOURNAL_NAME
        self._db = SqliteThread(self.path)
        self._commit: GroupCommit[_Op] = GroupCommit(self._db, _apply, window_s=window_s)
        self.appended = 0
        self.replayed = 0

    async def open(self) -> list[RawMessage]:
        """Open, and return what a previous run accepted but did not finish, oldest first."""
        await self._db.open(_SCHEMA)
        rows = await self._db.run(
            lambda c: c.execute("SELECT event_id, topic, payload, origin, received_ms FROM journal ORDER BY event_id")
            .fetchall()
        )
        self._commit.start("journal-commit")
        recovered = [
            RawMessage(topic, bytes(payload), origin, utc_from_ms(received_ms), event_id)
            for event_id, topic, payload, origin, received_ms in rows
        ]
        self.replayed = len(recovered)
        return recovered

    def append(self, message: RawMessage) -> asyncio.Future[None]:
        """Resolved once the message is durable."""
        self.appended += 1
        return self._commit.submit(_Op(append=message))

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
