"""SQLite for an asyncio process: one connection on one dedicated thread, and group commit.

Everything durable in the gateway (the store, the ingest journal, the outboxes, the MQTT sessions,
the catalog's traffic) is SQLite in WAL mode, each database on a :class:`SqliteThread` of its own;
the HTTP API reads the store through a read-only one. Writes are gathered for a few milliseconds
and committed in one transaction (:class:`GroupCommit`), so a Raspberry Pi's SD card sees a few
fsyncs a second however many messages arrive, and callers that need to know (an MQTT PUBACK) wait
for the commit that covers their write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pipeline.errors import PipelineError
from pipeline.retry import stop_task, until_done

log = logging.getLogger(__name__)
T = TypeVar("T")
Op = TypeVar("Op")
Synchronous = Literal["OFF", "NORMAL", "FULL"]
EARLY_OPS = 16  # a group commit with this many operations waiting does not wait out its interval


class DatabaseError(PipelineError):
    """A database could not be opened or written."""


class SqliteThread:
    """``await db.run(fn, *args)`` calls ``fn(connection, *args)`` on the database's own thread.

    One connection, made, used and closed on one dedicated thread: SQLite connections stay on the
    thread that made them, and a disk that stalls stalls that thread, never the event loop.

    Args:
        synchronous: how hard a commit waits for the disk (read-write only).
        pragmas: run first, before WAL mode and the schema (``auto_vacuum`` must come before anything
            is written), as ``"name=value"``.
        readonly: open an existing file read-only (no WAL switch, no schema); :class:`DatabaseError`
            if there is none.
        mode: the file's permission bits (None: the process umask's). SQLite gives its -wal and -shm
            files the same; a file that already exists loses any bit outside ``mode``.
    """

    def __init__(
        self, path: Path, *, synchronous: Synchronous = "FULL", pragmas: Sequence[str] = (), readonly: bool = False,
        mode: int | None = None,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._pragmas = tuple(pragmas)
        self._readonly = readonly
        self._mode = mode
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._conn: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self, schema: str = "") -> None:
        """Connect (on the database's thread) and run ``schema``; nothing happens if already open."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open, schema)

    def _open(self, schema: str) -> None:
        if self._conn is not None:
            return
        try:
            if self._readonly:
                if not self.path.is_file():
                    raise DatabaseError(f"no database at {self.path}")
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self._mode is not None and str(self.path) != ":memory:":
                    self._restrict(self._mode)
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for pragma in self._pragmas:
                conn.execute(f"PRAGMA {pragma}")
            if not self._readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit survives power loss, not just a crash; group commit keeps it cheap.
                conn.execute(f"PRAGMA synchronous={self._synchronous}")
                conn.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open {self.path}: {exc}") from exc
        self._conn = conn

    def _restrict(self, mode: int) -> None:
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, mode))  # created with ``mode`` if it is new
        name = self.path.name
        for path in (self.path, self.path.with_name(f"{name}-wal"), self.path.with_name(f"{name}-shm")):
            with contextlib.suppress(FileNotFoundError):
                current = path.stat().st_mode & 0o7777
                if current & ~mode:
                    path.chmod(current & mode)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            if self._conn is None:
                raise DatabaseError(f"{self.path} is not open")
            return fn(self._conn, *args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)


def in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


INSERT_CHUNK = 64  # rows per INSERT statement


@functools.cache
def _statement(head: str, tail: str, columns: int, rows: int) -> str:
    return f"{head} {', '.join(['(' + ', '.join('?' * columns) + ')'] * rows)}{tail}"


def insert_many(db: sqlite3.Connection, head: str, tail: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """``head VALUES (...), (...) tail`` for ``rows``, :data:`INSERT_CHUNK` rows to a statement.

    SQLite steps one statement for many rows, and each step is one release of the GIL, not one a
    row: with ``executemany`` the SQLite thread takes the GIL back for every row, and while the event
    loop is busy it may wait a whole switch interval (5 ms) for each. Rows must not repeat a key within
    a statement when ``tail`` is an upsert.
    """
    if not rows:
        return
    columns = len(rows[0])
    whole = len(rows) - len(rows) % INSERT_CHUNK
    if whole:
        flat = list(chain.from_iterable(rows[:whole]))
        step = INSERT_CHUNK * columns
        db.executemany(_statement(head, tail, columns, INSERT_CHUNK),
                       [flat[i:i + step] for i in range(0, whole * columns, step)])
    if whole < len(rows):
        db.execute(_statement(head, tail, columns, len(rows) - whole), list(chain.from_iterable(rows[whole:])))


class GroupCommit(Generic[Op]):
    """Gathers operations and applies them in one transaction; each ``submit`` returns a future resolved
    when its transaction commits.

    Cadence: a commit waits ``window_s`` after the first operation it takes (for others to join), and
    comes at most once per ``interval_s`` (every commit of a database in WAL mode with
    ``synchronous=FULL`` is an fsync, the write an SD card wears with) unless ``early_ops`` operations are
    waiting, or the last commit had that many (a busy gateway is not held to the interval: its commits
    carry many operations each, and the last few of a burst do not wait out an interval).
    :meth:`flush` commits at once; :meth:`committed` waits for the commit that covers what was submitted.
    :meth:`hurry` ends the window early: the submitter has nothing more coming until what it submitted
    commits (an MQTT broker that sends only so many messages ahead of their PUBACKs).
    """

    def __init__(
        self, db: SqliteThread, apply: Callable[[sqlite3.Connection, list[Op]], None], *, window_s: float = 0.005,
        interval_s: float = 0.0, early_ops: int = EARLY_OPS,
    ) -> None:
        self._db = db
        self._apply = apply
        self._window = window_s
        self._interval = interval_s
        self._early = early_ops
        self._ops: list[Op] = []
        self._futures: list[asyncio.Future[None]] = []
        self._pending: asyncio.Future[None] | None = None  # resolved by the commit that takes what is pending
        self._inflight: asyncio.Future[None] | None = None  # resolved when the commit under way ends
        self._wake = asyncio.Event()
        self._enough = asyncio.Event()
        self._hurry = asyncio.Event()
        self._last_commit = -math.inf
        self._busy = False  # the last commit carried early_ops operations or more
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.commits = 0
        self.failures = 0

    def start(self, name: str) -> None:
        self._task = asyncio.create_task(self._loop(), name=name)

    def submit(self, op: Op) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._ops.append(op)
        self._futures.append(future)
        if self._pending is None:
            self._pending = loop.create_future()
        self._wake.set()
        if len(self._ops) >= self._early:
            self._enough.set()
        return future

    def hurry(self) -> None:
        """Commit what is pending without waiting out the window (the interval still holds under light load)."""
        if self._ops:
            self._hurry.set()

    @property
    def pending(self) -> int:
        return len(self._ops)

    async def committed(self) -> None:
        """Until everything submitted so far is committed (by the background committer, on its cadence:
        nothing is forced)."""
        waiting = self._pending if self._ops else self._inflight
        if waiting is not None and not waiting.done():
            await asyncio.shield(waiting)

    async def flush(self) -> None:
        """Commit everything submitted so far, now. When the commit fails (a full disk, say) the
        operations stay queued, in order, for the next attempt, and this raises: nothing submitted
        is ever dropped, and every waiter waits until its write is really durable."""
        async with self._lock:
            if not self._ops:
                return
            ops, futures, done = self._ops, self._futures, self._pending
            self._ops, self._futures, self._pending = [], [], None
            self._busy = len(ops) >= self._early
            self._enough.clear()
            self._hurry.clear()
            self._inflight = done
            try:
                await self._db.run(in_transaction, lambda conn: self._apply(conn, ops))
            except BaseException:
                self.failures += 1
                self._ops, self._futures = ops + self._ops, futures + self._futures
                if self._pending is None:
                    self._pending = done
                elif done is not None:  # those submitted meanwhile wait for the same commit now
                    self._pending.add_done_callback(lambda _: done.done() or done.set_result(None))
                raise
            finally:
                self._inflight = None
                self._last_commit = asyncio.get_running_loop().time()
            self.commits += 1
            for future in futures:
                if not future.done():
                    future.set_result(None)
            if done is not None and not done.done():
                done.set_result(None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._window):
                        await self._hurry.wait()
            # the cadence: the interval since the last commit, unless enough is waiting (or was, last time)
            while (not self._busy and (wait := self._last_commit + self._interval - loop.time()) > 0
                   and len(self._ops) < self._early):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._enough.wait()
            # What is submitted meanwhile joins the retried commit: flush takes everything pending.
            await until_done(self.flush, what=f"commit to {self._db.path}", log=log)

    async def stop(self) -> None:
        """Commit what is pending and stop the background committer."""
        try:
            await stop_task(self._task)
        finally:  # even when the caller is cancelled: what is pending gets its commit
            self._task = None
            await self.flush()
