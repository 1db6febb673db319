"""A bounded queue that hands out batches and tells producers when it has room.

Producers ``await put()`` (they wait while it is full: that is the backpressure); the broker's
socket readers ``await wait_for_room()`` so a full pipeline stops reading from clients instead of
buffering their messages in memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")
IDLE_GAP_S = 0.01  # right after a full batch, a lingering batch goes once nothing was put for this long


class QueueClosedError(Exception):
    pass


class BatchQueue(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._room = asyncio.Event()
        self._room.set()
        self._ready = asyncio.Event()
        self._enough = asyncio.Event()  # a lingering get_batch has what it wants
        self._wanted = 0
        self._closed = False
        self._last_full = False  # the last batch handed out was as large as asked for: the queue is busy
        self._puts = 0
        self.high_water = 0
        self.put_waits = 0  # how often a producer had to wait: the pipeline was behind

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_for_room(self) -> None:
        while not self._room.is_set():
            await self._room.wait()

    async def put(self, item: T) -> None:
        if len(self._items) >= self.maxsize:
            self.put_waits += 1
            while len(self._items) >= self.maxsize:
                if self._closed:
                    raise QueueClosedError("queue closed")
                self._room.clear()
                await self._room.wait()
        if self._closed:
            raise QueueClosedError("queue closed")
        self._items.append(item)
        self._puts += 1
        self.high_water = max(self.high_water, len(self._items))
        if len(self._items) >= self.maxsize:
            self._room.clear()
        self._ready.set()
        if self._wanted and len(self._items) >= self._wanted:
            self._enough.set()

    async def get_batch(self, max_items: int, linger_s: float = 0.0) -> list[T]:
        """Up to ``max_items``, waiting for at least one; [] once closed and empty.

        With ``linger_s``, a short batch waits that long for more items: under light load that
        turns many tiny transactions into a few larger ones (an SD card's write budget). Right after a
        full batch the queue is busy: the linger then also ends when nothing has been put for
        :data:`IDLE_GAP_S` (the end of a burst goes at once; steady load keeps filling batches).
        """
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        while not self._items:
            if self._closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        limit = min(max_items, self.maxsize)
        if linger_s > 0 and len(self._items) < limit and not self._closed:
            await self._linger(limit, linger_s, idle_gap=IDLE_GAP_S if self._last_full else None)
        count = min(max_items, len(self._items))
        self._last_full = count >= limit
        batch = [self._items.popleft() for _ in range(count)]
        if not self._items:
            self._ready.clear()
        self._room.set()
        return batch

    async def _linger(self, limit: int, linger_s: float, *, idle_gap: float | None) -> None:
        """Until ``limit`` items are here or ``linger_s`` has passed (or, with ``idle_gap``, that long without a
        put). One timer at a time, woken once when the batch is full (not at every item)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger_s
        self._wanted = limit
        self._enough.clear()
        try:
            while (wait := deadline - loop.time()) > 0:
                puts = self._puts
                try:
                    async with asyncio.timeout(wait if idle_gap is None else min(wait, idle_gap)):
                        await self._enough.wait()
                    return
                except TimeoutError:
                    if idle_gap is None or self._puts == puts:
                        return
        finally:
            self._wanted = 0

    def close(self) -> None:
        """No more puts; consumers get what is left, then []."""
        self._closed = True
        self._ready.set()
        self._enough.set()
        self._room.set()


class DropOldestQueue(Generic[T]):
    """A bounded queue for things where the newest matters most (advertisements, inbound backbone
    messages): when full, the oldest item is dropped and counted, and ``offer`` never waits."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, item: T) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    async def get(self) -> T:
        return await self._queue.get()
