"""Learning from traffic: who produces and who consumes each event type of the catalog.

The embedded broker tells a :class:`TrafficLearner` about every publish (topic and origin) and every
subscription (client and filter); see ``gateway.broker.Traffic``. A publish is attributed to the
type its topic belongs to: a raw reading to the type that validates it (its producer is the MQTT
client, or ``driver:<device id>`` for an in-process driver), any other topic to the most specific
type whose pattern matches (in-process publishes are the gateway's, ``gateway:<id>``; its relay of
readings onto ``valid`` is not counted again). A subscription consumes every type whose pattern its
filter overlaps; its last seen is refreshed at each write while the subscription lasts, and it is
marked inactive when the client unsubscribes, its session ends or the gateway stops.

What was learned is kept in memory and written to ``catalog.db`` in the data directory at most once
per ``flush_interval_s`` (and on exit), so ``iotgw catalog`` can read it while or after the gateway
runs. Losing the last few seconds of it in a power cut loses counts, not data: the file is written
with ``synchronous=NORMAL``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pipeline.catalog import Catalog, EventType
from pipeline.db import SqliteThread, in_transaction
from pipeline.errors import TopicError
from pipeline.retry import StateLog, stop_task
from pipeline.topics import compile_filter

log = logging.getLogger(__name__)
DB_NAME: Final = "catalog.db"
_CACHE_SIZE: Final = 4096
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS producers (
    type_key TEXT NOT NULL, client TEXT NOT NULL, first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
    messages INTEGER NOT NULL, PRIMARY KEY (type_key, client)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumers (
    type_key TEXT NOT NULL, client TEXT NOT NULL, filter TEXT NOT NULL, first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL, active INTEGER NOT NULL, PRIMARY KEY (type_key, client, filter)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Producer:
    type_key: str
    client: str
    first_seen_ms: int
    last_seen_ms: int
    messages: int


@dataclass(frozen=True, slots=True)
class Consumer:
    type_key: str
    client: str
    filter: str
    first_seen_ms: int
    last_seen_ms: int
    active: bool


@dataclass(frozen=True, slots=True)
class _TopicInfo:
    type_key: str | None  # None: no type of the catalog (nothing to learn)
    driver: str | None  # raw topics: the producer when an in-process driver published
    relay: bool  # a reading on valid: the gateway's own republication, not a new producer


class TrafficLearner:
    """``async with TrafficLearner(...)``: learns in memory, writes to ``catalog.db`` in the background."""

    def __init__(
        self, catalog: Catalog, data_dir: Path, *, gateway_id: str, flush_interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self._template = catalog.template
        self._gateway = f"gateway:{gateway_id}"
        self._interval = flush_interval_s
        self._clock = clock
        self._db = SqliteThread(Path(data_dir) / DB_NAME, synchronous="NORMAL")
        self._topics: dict[str, _TopicInfo] = {}
        self._pending: dict[tuple[str, str], list[int]] = {}  # (type, producer) -> [first, last, count]
        self._subs: dict[tuple[str, str], tuple[int, tuple[str, ...]]] = {}  # (client, filter) -> (first, types)
        self._ended: list[tuple[str, str, int, tuple[str, ...]]] = []  # (client, filter, first, types)
        self._task: asyncio.Task[None] | None = None
        self._writing = StateLog(
            log, str(self._db.path), down="catalog traffic: cannot write %(name)s, will retry: %(reason)s",
            up="catalog traffic: writing %(name)s again", up_level=logging.INFO,
        )
        self.flushes = 0

    def set_catalog(self, catalog: Catalog) -> None:
        """A reload changed the catalog: topics are looked up afresh (subscriptions keep the types
        they were matched to when made)."""
        self.catalog = catalog
        self._topics.clear()

    async def __aenter__(self) -> Self:
        await self._db.open(SCHEMA)
        await self._db.run(lambda conn: conn.execute("UPDATE consumers SET active = 0"))  # a new broker: no one
        self._task = asyncio.create_task(self._loop(), name="catalog traffic")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await stop_task(self._task)
        finally:  # even when the caller is cancelled: what was learned is written and the file closed
            for client, topic_filter in list(self._subs):
                self.unsubscribed(client, topic_filter)
            try:
                await self.flush()
            finally:
                await self._db.close()

    # -- what the broker calls (synchronous, cheap: once per message) --------------------------------
    def published(self, topic: str, origin: str | None, count: int = 1) -> None:
        info = self._topics.get(topic)
        if info is None:
            info = self._resolve(topic)
        if info.type_key is None or (origin is None and info.relay):
            return
        producer = origin or info.driver or self._gateway
        now = int(self._clock() * 1000)
        seen = self._pending.get((info.type_key, producer))
        if seen is None:
            self._pending[(info.type_key, producer)] = [now, now, count]
        else:
            seen[1] = now
            seen[2] += count

    def subscribed(self, client: str, topic_filter: str) -> None:
        try:
            compiled = compile_filter(topic_filter, "auto" if client.startswith("forward:") else "mqtt")
        except TopicError:
            return  # not a filter we can match (the broker refused it anyway)
        keys = tuple(t.key for t in self.catalog.types_for_filter(compiled))
        if keys and (client, topic_filter) not in self._subs:
            self._subs[(client, topic_filter)] = (int(self._clock() * 1000), keys)

    def unsubscribed(self, client: str, topic_filter: str) -> None:
        sub = self._subs.pop((client, topic_filter), None)
        if sub is not None:
            self._ended.append((client, topic_filter, *sub))

    def _resolve(self, topic: str) -> _TopicInfo:
        fields = self._template.parse(topic)
        if fields is not None and fields.stage == "raw":
            found = self.catalog.reading_type(fields)
            info = _TopicInfo(found.key if isinstance(found, EventType) else None, f"driver:{fields.device_id}",
                              relay=False)
        else:
            event_type = self.catalog.type_for_topic(topic)
            info = _TopicInfo(event_type.key if event_type else None, None,
                              relay=event_type is not None and event_type.reading)
        if len(self._topics) >= _CACHE_SIZE:
            self._topics.clear()
        self._topics[topic] = info
        return info

    # -- persistence ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        """Write what was learned since the last flush; on failure keep it for the next one."""
        pending, self._pending = self._pending, {}
        ended, self._ended = self._ended, []
        now = int(self._clock() * 1000)
        active = [(key, client, topic_filter, first) for (client, topic_filter), (first, keys) in self._subs.items()
                  for key in keys]
        if not (pending or ended or active):
            return
        producers = [(key, client, first, last, count) for (key, client), (first, last, count) in pending.items()]
        finished = [(key, client, topic_filter, first, now) for client, topic_filter, first, keys in ended
                    for key in keys]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO producers VALUES (?, ?, ?, ?, ?) ON CONFLICT (type_key, client) DO UPDATE SET"
                " first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),"
                " last_seen_ms = max(last_seen_ms, excluded.last_seen_ms), messages = messages + excluded.messages",
                producers,
            )
            conn.executemany(
                "INSERT INTO consumers VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (type_key, client, filter) DO UPDATE SET"
                " first_seen_ms = min(first_seen_ms, excluded.first_seen_ms), last_seen_ms = excluded.last_seen_ms,"
                " active = excluded.active",
                [(*row, now, 1) for row in active] + [(*row, 0) for row in finished],
            )

        try:
            await self._db.run(in_transaction, write)
        except Exception as exc:
            for (key, client), (first, last, count) in pending.items():  # merge back for the next attempt
                seen = self._pending.setdefault((key, client), [first, last, 0])
                seen[0], seen[1], seen[2] = min(seen[0], first), max(seen[1], last), seen[2] + count
            self._ended[:0] = ended
            self._writing.down(exc)
            return
        self._writing.up()
        self.flushes += 1


def read_traffic(data_dir: Path) -> tuple[list[Producer], list[Consumer]]:
    """What a gateway with this data directory learned (empty if it never ran); read-only."""
    path = Path(data_dir) / DB_NAME
    if not path.exists():
        return [], []
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return [], []
    try:
        producers = [Producer(*row) for row in conn.execute(
            "SELECT type_key, client, first_seen_ms, last_seen_ms, messages FROM producers ORDER BY type_key, client")]
        consumers = [Consumer(k, c, f, first, last, bool(active)) for k, c, f, first, last, active in conn.execute(
            "SELECT type_key, client, filter, first_seen_ms, last_seen_ms, active FROM consumers"
            " ORDER BY type_key, client, filter")]
    except sqlite3.OperationalError:  # created but its tables not yet
        return [], []
    finally:
        conn.close()
    return producers, consumers
