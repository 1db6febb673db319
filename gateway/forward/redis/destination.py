"""Redis Streams destination (redis-py's asyncio client).

Each event is one entry of the stream its topic names (:mod:`.streams`), with the fields
``event_id``, ``topic``, ``gateway`` and ``payload`` (the CloudEvent as it is). A Lua script adds it
atomically: unless its event id is already in the stream's id set (``<stream>:ids``, a sorted set
scored by the time the event was queued), ``XADD`` with ``MAXLEN ~ maxlen`` (``=`` when not
approximate), keeping the ids of the newest ``maxlen`` events. So an event sent again -- the batch
that was in flight when the gateway was killed, a journal replay after a crash, a retry after a
timeout -- is refused by Redis, not appended twice, across gateway restarts; the script answers 0
for it and it counts as delivered.

A batch is one pipelined round trip: one ``EVALSHA`` per 100 events, in outbox order; the answers
say how far it got: the calls up to the first error are acknowledged. What "acknowledged" is worth is the
server's: with ``appendonly yes`` and ``appendfsync always`` an entry survives a crash of Redis once
it is answered; with the default ``everysec`` the last second may not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.forward.base import DestinationUnavailableError, InboundMessage, OutboundEvent
from gateway.forward.redis.streams import StreamNames
from pipeline.retry import backoff_delay, stop_task, until_done

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on
IDS_SUFFIX: Final = ":ids"
CONNECT_TIMEOUT_S: Final = 5.0

# Adds events once each, in order. KEYS: stream 1, its id set, stream 2, its id set, ... ARGV: the gateway id,
# maxlen (0: none), "~" or "=", then per event its id, topic, payload and score (the time it was queued, ms).
# Returns per event the new entry's id, or 0 when the id is already in the set. Should XADD fail (the key
# holds another type, say), the id is taken back out of the set and the error returned: the events
# before it are added (and will be refused as duplicates when the batch is sent again), none after it.
ADD_ONCE: Final = """
local gateway, maxlen, trim = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local slack = math.max(100, math.floor(maxlen / 100))
local out = {}
for i = 1, #KEYS / 2 do
  local stream, ids, a = KEYS[2 * i - 1], KEYS[2 * i], 4 * i
  local event_id = ARGV[a]
  if redis.call('ZADD', ids, 'NX', ARGV[a + 3], event_id) == 0 then
    out[i] = 0
  else
    local entry
    if maxlen > 0 then
      entry = redis.pcall('XADD', stream, 'MAXLEN', trim, maxlen, '*',
                          'event_id', event_id, 'topic', ARGV[a + 1], 'gateway', gateway, 'payload', ARGV[a + 2])
    else
      entry = redis.pcall('XADD', stream, '*',
                          'event_id', event_id, 'topic', ARGV[a + 1], 'gateway', gateway, 'payload', ARGV[a + 2])
    end
    if type(entry) == 'table' and entry.err then
      redis.call('ZREM', ids, event_id)
      return entry
    end
    out[i] = entry
    if maxlen > 0 then
      local count = redis.call('ZCARD', ids)
      if count > maxlen + slack then
        redis.call('ZREMRANGEBYRANK', ids, 0, count - maxlen - 1)
      end
    end
  end
end
return out
"""
# The id set is trimmed in slices of at least 100 ids, so the cost stays flat.
EVENTS_PER_CALL: Final = 100  # one script call adds up to this many events (it blocks the server meanwhile)

# The connection is gone or the server cannot answer now: worth retrying.
UNAVAILABLE: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)


def _retry_delay(attempt: int) -> float:
    """Before the next attempt to connect: jittered, at most 10 s."""
    return backoff_delay(attempt, base_s=0.5, cap_s=10.0)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    gateway_id: str
    streams: StreamNames
    maxlen: int | None = 1_000_000
    approximate: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr or a log
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout_s: float = 10.0


def _client(settings: RedisSettings) -> aioredis.Redis:
    url, tls = settings.url, dict[str, Any]()
    if settings.ca_file or settings.cert_file:
        url = "rediss://" + url.removeprefix("redis://").removeprefix("rediss://")
        tls = {"ssl_ca_certs": settings.ca_file, "ssl_certfile": settings.cert_file,
               "ssl_keyfile": settings.key_file}
    client: aioredis.Redis = aioredis.Redis.from_url(
        url, username=settings.username, password=settings.password,
        socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=settings.timeout_s,
        retry=Retry(NoBackoff(), 0),  # the outbox retries; a hidden retry would only delay noticing an outage
        **tls,
    )
    return client


async def _no_inbound() -> AsyncIterator[InboundMessage]:
    return
    yield  # an async generator that yields nothing


class RedisDestination:
    def __init__(self, name: str, settings: RedisSettings) -> None:
        self.name = name
        self._settings = settings
        self._client = _client(settings)
        self._sha = ""
        self._maxlen = str(settings.maxlen or 0)
        self._trim = "~" if settings.approximate else "="
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self.sent = 0
        self.acked = 0
        self.duplicates = 0  # events Redis already had (sent again after a crash or a timeout)

    @property
    def connected(self) -> bool:
        return self._ready

    async def start(self) -> None:
        self._reconnect()

    def _reconnect(self) -> None:
        self._ready = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._connect(), name=f"forward {self.name} connect")

    async def _connect(self) -> None:
        self._sha = await until_done(
            self._load_script, what=f"forward {self.name}: connecting to Redis", log=log,
            retry_on=(*UNAVAILABLE, redis.exceptions.ResponseError), delay=_retry_delay, level=logging.WARNING,
        )
        self._ready = True
        log.warning("forward %s: connected to Redis", self.name)

    async def _load_script(self) -> str:
        sha: str = await self._client.script_load(ADD_ONCE)
        return sha

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        if not self._ready:
            raise DestinationUnavailableError(f"{self.name}: not connected")
        s = self._settings
        pipe = self._client.pipeline(transaction=False)
        calls = [batch[i:i + EVENTS_PER_CALL] for i in range(0, len(batch), EVENTS_PER_CALL)]
        for events in calls:
            keys: list[str] = []
            args: list[str | bytes | int] = [s.gateway_id, self._maxlen, self._trim]
            for event in events:
                stream = s.streams(event.topic)
                keys += (stream, stream + IDS_SUFFIX)
                args += (event.event_id, event.topic, event.payload, event.created_ms)
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        self.sent += len(batch)
        try:
            answers = await pipe.execute(raise_on_error=False)
        except UNAVAILABLE as exc:
            log.warning("forward %s: lost Redis (%s)", self.name, exc or type(exc).__name__)
            self._reconnect()
            raise DestinationUnavailableError(f"{self.name}: {exc or type(exc).__name__}") from None
        acked = 0
        for events, answer in zip(calls, answers, strict=True):
            if isinstance(answer, Exception):
                self._refused(answer)
                break
            self.duplicates += sum(1 for entry in answer if entry == 0)
            acked += len(events)
        if acked == 0:
            raise DestinationUnavailableError(f"{self.name}: Redis refused the first events: {answers[0]}")
        self.acked += acked
        return acked

    def _refused(self, error: Exception) -> None:
        """An event the server did not take: the rest of the batch stays in the outbox."""
        # NOSCRIPT: the server restarted and lost its script cache; connect again, which loads it
        if isinstance(error, (redis.exceptions.NoScriptError, *UNAVAILABLE)):
            self._reconnect()

    def inbound(self) -> AsyncIterator[InboundMessage]:
        """No downlink from Redis Streams: the iterator ends at once."""
        return _no_inbound()

    async def close(self) -> None:
        await stop_task(self._task)
        self._ready = False
        with contextlib.suppress(Exception):
            await self._client.aclose()
