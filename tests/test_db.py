"""Group commit keeps what it was given when a commit fails, and commits it on the next attempt."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from pipeline.db import DatabaseError, GroupCommit, SqliteThread


async def test_failed_commit_keeps_the_operations_and_their_waiters(tmp_path: Path) -> None:
    db = SqliteThread(tmp_path / "t.sqlite3")
    await db.open("CREATE TABLE t (v INTEGER);")
    fail = [True]

    def apply(conn: sqlite3.Connection, ops: list[int]) -> None:
        conn.executemany("INSERT INTO t VALUES (?)", [(v,) for v in ops])
        if fail[0]:
            raise sqlite3.OperationalError("database or disk is full")

    commit: GroupCommit[int] = GroupCommit(db, apply, window_s=0.001)
    first, second = commit.submit(1), commit.submit(2)
    with pytest.raises(sqlite3.OperationalError):
        await commit.flush()
    assert not first.done()  # nobody is told it is durable
    assert not second.done()
    assert await db.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 0  # rolled back
    third = commit.submit(3)
    fail[0] = False
    await commit.flush()
    await asyncio.gather(first, second, third)
    rows = await db.run(lambda c: [v for (v,) in c.execute("SELECT v FROM t ORDER BY rowid")])
    assert rows == [1, 2, 3]  # in submission order, once each
    assert (commit.commits, commit.failures) == (1, 1)
    await commit.stop()
    await db.close()


async def test_background_committer_retries_until_the_disk_recovers(tmp_path: Path) -> None:
    db = SqliteThread(tmp_path / "t.sqlite3")
    await db.open("CREATE TABLE t (v INTEGER);")
    failures_left = [3]

    def apply(conn: sqlite3.Connection, ops: list[int]) -> None:
        if failures_left[0]:
            failures_left[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        conn.executemany("INSERT INTO t VALUES (?)", [(v,) for v in ops])

    commit: GroupCommit[int] = GroupCommit(db, apply, window_s=0.001)
    commit.start("test-commit")
    await asyncio.wait_for(commit.submit(7), 10)
    assert await db.run(lambda c: c.execute("SELECT v FROM t").fetchall()) == [(7,)]
    assert commit.failures == 3
    await commit.stop()
    await db.close()


async def test_pragmas_come_before_wal_mode_and_the_schema(tmp_path: Path) -> None:
    db = SqliteThread(tmp_path / "t.sqlite3", pragmas=("auto_vacuum=INCREMENTAL",))
    await db.open("CREATE TABLE t (v INTEGER);")
    await db.open("CREATE TABLE never (v INTEGER);")  # already open: nothing happens
    assert await db.run(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2  # only set in a new file
    assert await db.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert await db.run(lambda c: [n for (n,) in c.execute("SELECT name FROM sqlite_master")]) == ["t"]
    await db.close()


async def test_a_readonly_thread_reads_an_existing_file_and_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    missing = SqliteThread(path, readonly=True)
    with pytest.raises(DatabaseError, match="no database"):
        await missing.open()
    assert not missing.is_open
    writer = SqliteThread(path)
    await writer.open("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);")
    await missing.open()  # the file exists now: a later open succeeds
    assert missing.is_open
    assert await missing.run(lambda c, n: c.execute("SELECT v + ? FROM t", (n,)).fetchone()[0], 1) == 2
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await missing.run(lambda c: c.execute("INSERT INTO t VALUES (2)"))
    await missing.close()
    await writer.close()


def _insert(conn: sqlite3.Connection, ops: list[int]) -> None:
    conn.executemany("INSERT INTO t VALUES (?)", [(v,) for v in ops])


async def _counting(tmp_path: Path, *, window_s: float, interval_s: float, early_ops: int = 16
                    ) -> tuple[SqliteThread, GroupCommit[int]]:
    db = SqliteThread(tmp_path / "t.sqlite3")
    await db.open("CREATE TABLE t (v INTEGER);")
    commit: GroupCommit[int] = GroupCommit(db, _insert, window_s=window_s, interval_s=interval_s, early_ops=early_ops)
    commit.start("test-commit")
    return db, commit


async def test_commits_come_at_most_once_an_interval_under_light_load(tmp_path: Path) -> None:
    db, commit = await _counting(tmp_path, window_s=0.001, interval_s=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await commit.submit(1)  # the first commit waits for nothing but the window
    assert loop.time() - started < 0.25
    await asyncio.sleep(0.01)
    second = commit.submit(2)
    await asyncio.sleep(0.1)
    assert not second.done()  # held to the interval since the last commit
    await second
    assert loop.time() - started >= 0.3
    assert commit.commits == 2
    await commit.stop()
    await db.close()


async def test_enough_waiting_writes_commit_before_the_interval(tmp_path: Path) -> None:
    db, commit = await _counting(tmp_path, window_s=0.001, interval_s=30.0, early_ops=8)
    await commit.submit(0)
    futures = [commit.submit(v) for v in range(1, 9)]
    await asyncio.wait_for(asyncio.gather(*futures), 5)  # not 30 s: eight were waiting
    await commit.stop()
    await db.close()


async def test_committed_waits_for_the_commit_that_covers_what_was_submitted(tmp_path: Path) -> None:
    db, commit = await _counting(tmp_path, window_s=0.001, interval_s=0.2)
    await commit.committed()  # nothing submitted: at once
    first = commit.submit(1)
    waiter = asyncio.ensure_future(commit.committed())
    await asyncio.sleep(0)
    assert not waiter.done()
    await waiter
    assert first.done()
    second = commit.submit(2)
    second.cancel()  # a caller that gave up waiting does not cancel the write
    await commit.committed()
    assert await db.run(lambda c: [v for (v,) in c.execute("SELECT v FROM t ORDER BY rowid")]) == [1, 2]
    await commit.stop()
    await db.close()


async def test_the_end_of_a_burst_does_not_wait_out_an_interval(tmp_path: Path) -> None:
    db, commit = await _counting(tmp_path, window_s=0.001, interval_s=30.0, early_ops=8)
    await commit.submit(0)
    await asyncio.gather(*[commit.submit(v) for v in range(1, 9)])  # a busy commit ...
    await asyncio.wait_for(commit.submit(9), 5)  # ... so the straggler after it goes at once
    late = commit.submit(10)  # the one before was not busy: the interval holds again
    await asyncio.sleep(0.2)
    assert not late.done()
    await commit.flush()
    await commit.stop()
    await db.close()
