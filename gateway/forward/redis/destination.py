"""Redis Streams destination (redis-py's asyncio client).

Each event is one entry of the stream its topic names (:mod:`.streams`), with the fields
``event_id``, ``topic``, ``gateway`` and ``payload`` (the CloudEvent as it is). A Lua script adds it
atomically: unless its event id is already in the stream's id set (``<stream>:ids``, a sorted set
scored by entry time), ``XADD`` with ``MAXLEN ~ maxlen`` (``=`` when not approximate) and remember
the id, keeping the ids of the newest ``maxlen`` entries. So an event sent again -- the batch that
was in flight when the gateway was killed, a journal replay after a crash, a retry after a timeout
-- is refused by Redis, not appended twice, across gateway restarts; the script answers nil for it and
it counts as delivered.

A batch is one pipelined round trip (``EVALSHA`` per event, in outbox order); the answers say how
far it got: the entries up to the first error are acknowledged. What "acknowledged" is worth is the
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
from pipeline.retry import backoff_delay, until_done

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on
IDS_SUFFIX: Final = ":ids"
CONNECT_TIMEOUT_S: Final = 5.0

# KEYS: the stream, its id set. ARGV: event id, topic, gateway, payload, maxlen (0: none), "~" or "=".
# Returns the new entry's id, or nil when the event id is already there.
ADD_ONCE: Final = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return false
end
local maxlen = tonumber(ARGV[5])
local entry
if maxlen > 0 then
  entry = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[6], maxlen, '*',
                     'event_id', ARGV[1], 'topic', ARGV[2], 'gateway', ARGV[3], 'payload', ARGV[4])
else
  entry = redis.call('XADD', KEYS[1], '*',
                     'event_id', ARGV[1], 'topic', ARGV[2], 'gateway', ARGV[3], 'payload', ARGV[4])
end
redis.call('ZADD', KEYS[2], tonumber(string.match(entry, '^(%d+)')), ARGV[1])
if maxlen > 0 then
  local count = redis.call('ZCARD', KEYS[2])
  if count > maxlen + math.max(100, math.floor(maxlen / 100)) then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, count - maxlen - 1)
  end
end
return entry
"""
# Trimming the id set in slices of at least 100 ids keeps the script's cost flat.

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
        for event in batch:
            stream = s.streams(event.topic)
            pipe.evalsha(self._sha, 2, stream, stream + IDS_SUFFIX, event.event_id, event.topic, s.gateway_id,
                         event.payload, self._maxlen, self._trim)
        self.sent += len(batch)
        try:
            answers = await pipe.execute(raise_on_error=False)
        except UNAVAILABLE as exc:
            log.warning("forward %s: lost Redis (%s)", self.name, exc or type(exc).__name__)
            self._reconnect()
            raise DestinationUnavailableError(f"{self.name}: {exc or type(exc).__name__}") from None
        acked = 0
        for answer in answers:
            if isinstance(answer, Exception):
                self._refused(answer)
                break
            if answer is None:
                self.duplicates += 1
            acked += 1
        if acked == 0:
            raise DestinationUnavailableError(f"{self.name}: Redis refused the first event: {answers[0]}")
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._ready = False
        with contextlib.suppress(Exception):
            await self._client.aclose()
