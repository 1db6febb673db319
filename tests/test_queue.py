"""BatchQueue: batches in FIFO order, backpressure on producers, linger, close and drain."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.queue import IDLE_GAP_S, BatchQueue, QueueClosedError

SHORT = 0.05  # long enough for a waiting task to have run, were it able to
PROPERTY = settings(max_examples=50, deadline=None)


async def blocked(*tasks: asyncio.Future[Any], timeout: float = SHORT) -> bool:
    """True if every one of ``tasks`` is still waiting after ``timeout`` seconds."""
    done, _ = await asyncio.wait(set(tasks), timeout=timeout)
    return not done


async def filled(maxsize: int, count: int | None = None) -> BatchQueue[int]:
    q: BatchQueue[int] = BatchQueue(maxsize)
    for i in range(maxsize if count is None else count):
        await q.put(i)
    return q


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        BatchQueue[int](0)
    with pytest.raises(ValueError, match="maxsize"):
        BatchQueue[int](-3)


async def test_get_batch_fifo_up_to_max() -> None:
    q = await filled(10, 7)
    assert len(q) == 7
    assert await q.get_batch(3) == [0, 1, 2]
    assert await q.get_batch(3) == [3, 4, 5]
    assert await q.get_batch(3) == [6]
    assert len(q) == 0
    await q.put(7)
    assert await q.get_batch(100) == [7]


async def test_get_batch_waits_for_the_first_item() -> None:
    q: BatchQueue[str] = BatchQueue(4)
    consumer = asyncio.create_task(q.get_batch(10))
    assert await blocked(consumer)
    await q.put("a")
    assert await asyncio.wait_for(consumer, 0.2) == ["a"]


async def test_put_blocks_when_full_and_resumes_when_a_batch_is_taken() -> None:
    q = await filled(2)
    assert q.put_waits == 0
    producer = asyncio.create_task(q.put(2))
    assert await blocked(producer)
    assert q.put_waits == 1
    assert len(q) == 2
    assert await q.get_batch(1) == [0]
    await asyncio.wait_for(producer, 0.2)
    assert len(q) == 2
    assert await q.get_batch(5) == [1, 2]
    assert q.high_water == 2
    assert q.put_waits == 1


async def test_several_blocked_producers_all_get_in() -> None:
    q = await filled(2)
    producers = [asyncio.create_task(q.put(i)) for i in range(2, 6)]
    assert await blocked(*producers)
    assert q.put_waits == 4
    got: list[int] = []
    while len(got) < 6:
        got += await asyncio.wait_for(q.get_batch(1), 0.2)
        assert len(q) <= 2
    await asyncio.wait_for(asyncio.gather(*producers), 0.2)
    assert sorted(got) == list(range(6))
    assert got[:2] == [0, 1]


async def test_wait_for_room_blocks_while_full() -> None:
    q = await filled(3, 2)
    await asyncio.wait_for(q.wait_for_room(), 0.2)  # room: returns at once
    await q.put(2)
    waiter = asyncio.create_task(q.wait_for_room())
    assert await blocked(waiter)
    assert await q.get_batch(1) == [0]
    await asyncio.wait_for(waiter, 0.2)
    await asyncio.wait_for(q.wait_for_room(), 0.2)


async def test_linger_collects_items_arriving_within_it() -> None:
    q = await filled(10, 1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    consumer = asyncio.create_task(q.get_batch(5, linger_s=0.15))
    await asyncio.sleep(0.02)
    await q.put(1)
    await asyncio.sleep(0.02)
    await q.put(2)
    assert await asyncio.wait_for(consumer, 1.0) == [0, 1, 2]
    assert loop.time() - start >= 0.14  # it waited out the linger: the batch never filled
    await q.put(3)
    assert await q.get_batch(5) == [3]


async def test_linger_without_more_items_returns_what_it_has() -> None:
    q = await filled(10, 2)
    assert await asyncio.wait_for(q.get_batch(5, linger_s=0.05), 1.0) == [0, 1]


async def test_linger_returns_early_when_the_batch_fills() -> None:
    q = await filled(10, 1)
    consumer = asyncio.create_task(q.get_batch(3, linger_s=30.0))
    assert await blocked(consumer)
    await q.put(1)
    await q.put(2)
    assert await asyncio.wait_for(consumer, 0.2) == [0, 1, 2]
    assert len(q) == 0


async def test_linger_already_full_batch_does_not_wait() -> None:
    q = await filled(4, 4)
    assert await asyncio.wait_for(q.get_batch(3, linger_s=30.0), 0.2) == [0, 1, 2]
    # a batch larger than the queue can ever hold: the queue being full is enough
    q = await filled(3, 3)
    assert await asyncio.wait_for(q.get_batch(100, linger_s=30.0), 0.2) == [0, 1, 2]


async def test_a_short_batch_right_after_a_full_one_does_not_linger() -> None:
    """The end of a burst goes at once; under light load (short batches) the linger holds again."""
    q = await filled(10, 4)
    assert await q.get_batch(3, linger_s=30.0) == [0, 1, 2]  # full: the queue is busy
    assert await asyncio.wait_for(q.get_batch(3, linger_s=30.0), 0.2) == [3]  # the burst's tail, not held
    await q.put(4)
    consumer = asyncio.create_task(q.get_batch(3, linger_s=30.0))  # after a short batch: lingers again
    assert await blocked(consumer)
    await q.put(5)
    await q.put(6)
    assert await asyncio.wait_for(consumer, 0.2) == [4, 5, 6]


async def test_after_a_full_batch_a_steady_trickle_still_fills_the_next() -> None:
    """Steady load is not the end of a burst: the linger goes on while items keep coming (no alternation of
    full and tiny batches, each a transaction and an fsync)."""
    q = await filled(10, 3)
    assert await q.get_batch(3, linger_s=30.0) == [0, 1, 2]  # full
    await q.put(3)
    consumer = asyncio.create_task(q.get_batch(3, linger_s=30.0))
    for item in (4, 5):
        await asyncio.sleep(IDLE_GAP_S / 2)  # closer together than the idle gap
        await q.put(item)
    assert await asyncio.wait_for(consumer, 0.5) == [3, 4, 5]


async def test_close_lets_the_consumer_drain() -> None:
    q = await filled(10, 5)
    q.close()
    assert q.closed
    assert await q.get_batch(2) == [0, 1]
    assert await q.get_batch(2, linger_s=30.0) == [2, 3]  # closed: no lingering
    assert await q.get_batch(2) == [4]
    assert await q.get_batch(2) == []
    assert await q.get_batch(2) == []


async def test_close_wakes_a_waiting_consumer() -> None:
    q: BatchQueue[int] = BatchQueue(4)
    consumer = asyncio.create_task(q.get_batch(10))
    assert await blocked(consumer)
    q.close()
    assert await asyncio.wait_for(consumer, 0.2) == []


async def test_close_ends_a_linger() -> None:
    q = await filled(10, 1)
    consumer = asyncio.create_task(q.get_batch(10, linger_s=30.0))
    assert await blocked(consumer)
    q.close()
    assert await asyncio.wait_for(consumer, 0.2) == [0]


async def test_put_after_close_raises() -> None:
    q = await filled(4, 1)
    q.close()
    with pytest.raises(QueueClosedError):
        await q.put(1)
    assert len(q) == 1


async def test_close_fails_a_blocked_producer_and_frees_room_waiters() -> None:
    q = await filled(2)
    producer = asyncio.create_task(q.put(2))
    waiter = asyncio.create_task(q.wait_for_room())
    assert await blocked(producer)
    assert not waiter.done()
    q.close()
    with pytest.raises(QueueClosedError):
        await asyncio.wait_for(producer, 0.2)
    await asyncio.wait_for(waiter, 0.2)
    assert await q.get_batch(10) == [0, 1]
    assert await q.get_batch(10) == []


async def test_high_water_and_put_waits() -> None:
    q: BatchQueue[int] = BatchQueue(5)
    assert (q.high_water, q.put_waits) == (0, 0)
    for i in range(3):
        await q.put(i)
    assert q.high_water == 3
    await q.get_batch(3)
    await q.put(3)
    assert q.high_water == 3  # a high-water mark: it does not fall
    for i in range(4, 8):
        await q.put(i)
    assert q.high_water == 5
    assert q.put_waits == 0
    producers = [asyncio.create_task(q.put(i)) for i in (8, 9)]
    assert await blocked(*producers)
    assert q.put_waits == 2
    assert await q.get_batch(10) == [3, 4, 5, 6, 7]
    await asyncio.wait_for(asyncio.gather(*producers), 0.2)
    assert q.high_water == 5
    assert q.put_waits == 2


# ---------------------------------------------------------------------------
# Property: whatever the interleaving, order is kept and the bound holds
# ---------------------------------------------------------------------------

Op = tuple[str, int]  # ("yield", scheduler steps) | ("get" | "linger", batch size)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("yield"), st.integers(0, 5)),
        st.tuples(st.just("get"), st.integers(1, 6)),
        st.tuples(st.just("linger"), st.integers(1, 6)),
    ),
    max_size=30,
)


async def _scenario(maxsize: int, producers: list[int], ops: list[Op]) -> None:
    q: BatchQueue[tuple[int, int]] = BatchQueue(maxsize)

    async def produce(p: int, count: int) -> None:
        for i in range(count):
            await q.put((p, i))
            assert len(q) <= maxsize

    tasks = [asyncio.create_task(produce(p, count)) for p, count in enumerate(producers)]
    got: list[tuple[int, int]] = []
    for kind, n in ops:
        if kind == "yield":
            for _ in range(n):
                await asyncio.sleep(0)
        elif len(q):  # get_batch would wait for an item that might never come
            got += await q.get_batch(n, linger_s=0.001 if kind == "linger" else 0.0)
        assert len(q) <= maxsize
        assert q.high_water <= maxsize
    while not all(t.done() for t in tasks) or len(q):
        if len(q):
            got += await q.get_batch(maxsize)
        else:
            await asyncio.sleep(0)
        assert len(q) <= maxsize
    for t in tasks:
        t.result()  # re-raise an assertion from a producer
    q.close()
    assert await q.get_batch(maxsize) == []
    for p, count in enumerate(producers):
        assert [i for q_p, i in got if q_p == p] == list(range(count))
    assert len(got) == sum(producers)


@PROPERTY
@given(maxsize=st.integers(1, 5), count=st.integers(0, 30), ops=OPS)
def test_one_producer_order_is_kept(maxsize: int, count: int, ops: list[Op]) -> None:
    asyncio.run(_scenario(maxsize, [count], ops))


@PROPERTY
@given(maxsize=st.integers(1, 5), producers=st.lists(st.integers(0, 15), min_size=2, max_size=4), ops=OPS)
def test_each_producer_order_is_kept(maxsize: int, producers: list[int], ops: list[Op]) -> None:
    asyncio.run(_scenario(maxsize, producers, ops))
