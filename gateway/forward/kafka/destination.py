"""Kafka destination: forwards outbox batches to Kafka topics with an idempotent producer.

Each event becomes one record: the key is the device id (so one device's events keep their order
within a partition), the value is the payload unchanged, and headers carry the event id (for
deduplication downstream), the local MQTT topic and the content type.

Kafka topic names are built from the local topic through a template (:class:`KafkaTopicMap`);
Kafka only allows ``[a-zA-Z0-9._-]`` and at most 249 characters, which MQTT topics do not respect.

Delivery is at least once: :meth:`KafkaDestination.send` reports the acknowledged *prefix* of a
batch, and the outbox sends the rest again, so records after the first failure may arrive twice
(the ``event-id`` header lets consumers drop the duplicates).

The Kafka downlink (commands from the backbone) is out of scope: :meth:`KafkaDestination.inbound`
ends at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Protocol, Self

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped, unused-ignore]
from aiokafka.errors import (  # type: ignore[import-untyped, unused-ignore]
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    NoBrokersAvailable,
)

from gateway.errors import ConfigError
from gateway.forward.base import DestinationUnavailableError, InboundMessage, OutboundEvent
from pipeline.retry import StateLog, backoff_delay, cancel_and_wait
from pipeline.topics import STAGES

__all__ = [
    "MAX_KAFKA_TOPIC_CHARS",
    "KafkaDestination",
    "KafkaRefusedError",
    "KafkaSettings",
    "KafkaSettingsError",
    "KafkaTopicMap",
    "ProducerLike",
]

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on

MAX_KAFKA_TOPIC_CHARS: Final = 249
"""Longest Kafka topic name."""

CLOUDEVENTS_CONTENT_TYPE: Final = b"application/cloudevents+json"
JSON_CONTENT_TYPE: Final = b"application/json"

_INVALID_TOPIC_CHARS: Final = re.compile(r"[^a-zA-Z0-9._-]")
_LEVEL_PLACEHOLDER: Final = re.compile(r"level(0|[1-9][0-9]*)")
_STAGE: Final = -1  # placeholder index of {stage}; levels are 0, 1, ...
_ABSENT: Final = "_"  # what an absent or empty placeholder value renders as
_TAXONOMY_ROOT: Final = "telemetry"
_STAGE_SET: Final = frozenset(STAGES)
_TOPIC_CACHE_SIZE: Final = 4096
_MAX_RETRY_S: Final = 1.5**10  # start retries wait at most ~58 s
_MIN_RETRY_S: Final = 0.1


class KafkaSettingsError(ConfigError):
    """The Kafka settings are not valid; ``problems`` holds one ``field: reason`` line each."""


class KafkaRefusedError(DestinationUnavailableError):
    """Kafka refused the first event of a batch with an error that is not about availability
    (record too large, topic not authorized, invalid topic...).

    It is a :class:`DestinationUnavailableError` because nothing was sent and the event must stay
    in the outbox; retrying will not help until the broker or the event changes.
    """

    def __init__(self, destination: str, event_id: str, kafka_topic: str, cause: BaseException) -> None:
        super().__init__(
            f"Kafka destination {destination!r} refused event {event_id} for topic {kafka_topic!r}: {cause}"
        )
        self.event_id = event_id
        self.kafka_topic = kafka_topic
        self.cause = cause


# --------------------------------------------------------------------------
# Topic mapping
# --------------------------------------------------------------------------


class KafkaTopicMap:
    """Maps local (MQTT) topics to Kafka topic names through a template.

    Placeholders:

    ``{level0}``, ``{level1}``, ...
        The levels of the local topic (split on ``/``).
    ``{stage}``
        The stage level when the topic follows the taxonomy ``telemetry/{stage}/...`` (first
        level ``telemetry``, second one of :data:`pipeline.topics.STAGES`).

    A placeholder whose value is absent (a level past the end, ``{stage}`` of a topic outside
    the taxonomy) or empty renders as ``_``: with the default ``iotgw.{stage}`` such topics all
    land in ``iotgw._``. After substitution every character outside ``[a-zA-Z0-9._-]`` becomes
    ``_`` (one per character), the name is cut to 249 characters, and the reserved names ``.``
    and ``..`` become ``_`` and ``__``. Distinct local topics may therefore share a Kafka topic.

    The template itself must be valid: only known placeholders, without format specs or
    conversions, and literal text made of allowed characters only.

    Raises:
        KafkaSettingsError: if the template is not valid.
    """

    __slots__ = ("_cache", "_parts", "template")

    def __init__(self, template: str) -> None:
        parts, problems = _compile_template(template)
        if problems:
            raise KafkaSettingsError([f"topic: {problem}" for problem in problems])
        self.template = template
        self._parts = parts
        self._cache: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.template!r})"

    def __call__(self, local_topic: str) -> str:
        """The Kafka topic for ``local_topic``."""
        cached = self._cache.get(local_topic)
        if cached is not None:
            return cached
        levels = local_topic.split("/")
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if part == _STAGE:
                stage = levels[1] if len(levels) > 1 and levels[0] == _TAXONOMY_ROOT else ""
                value = stage if stage in _STAGE_SET else ""
            else:
                value = levels[part] if part < len(levels) else ""
            out.append(_INVALID_TOPIC_CHARS.sub("_", value) if value else _ABSENT)
        name = "".join(out)[:MAX_KAFKA_TOPIC_CHARS]
        if name in (".", ".."):
            name = name.replace(".", "_")
        if len(self._cache) >= _TOPIC_CACHE_SIZE:
            self._cache.clear()
        self._cache[local_topic] = name
        return name


def _compile_template(template: str) -> tuple[tuple[str | int, ...], list[str]]:
    """Split a template into literal strings and placeholder indexes; list what is wrong."""
    if not template:
        return (), ["template must not be empty"]
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:  # unbalanced braces
        return (), [f"template {template!r} is malformed: {err}"]
    parts: list[str | int] = []
    problems: list[str] = []
    literal = ""
    for text, field_name, spec, conversion in pieces:
        literal += text
        if text:
            parts.append(text)
        if field_name is None:
            continue
        placeholder = "{" + field_name + "}"
        if spec or conversion:
            problems.append(
                f"template {template!r}: placeholder {placeholder} must not have a format spec or conversion"
            )
        if field_name == "stage":
            parts.append(_STAGE)
        elif match := _LEVEL_PLACEHOLDER.fullmatch(field_name):
            parts.append(int(match.group(1)))
        else:
            problems.append(
                f"template {template!r}: unknown placeholder {placeholder}; "
                "use {stage} or {level0}, {level1}, ..."
            )
    bad = sorted(set(_INVALID_TOPIC_CHARS.findall(literal)))
    if bad:
        problems.append(
            f"template {template!r}: literal text may only contain letters, digits, '.', '_' and '-'; found {bad}"
        )
    if len(literal) > MAX_KAFKA_TOPIC_CHARS:
        problems.append(f"template {template!r}: literal text is longer than {MAX_KAFKA_TOPIC_CHARS} characters")
    if template in (".", ".."):
        problems.append(f"template {template!r}: '.' and '..' are not valid Kafka topic names")
    return tuple(parts), problems


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Where and how to produce. Validated on construction (:class:`KafkaSettingsError`)."""

    bootstrap_servers: str  # "host:port[,host:port...]"
    topic: str = "iotgw.{stage}"  # Kafka topic template, see KafkaTopicMap
    client_id: str | None = None  # None: "iotgw-<destination name>"
    linger_ms: int = 20
    max_batch_bytes: int = 1_048_576  # per-partition batch (aiokafka max_batch_size)
    request_timeout_ms: int = 30000
    security_protocol: Literal["PLAINTEXT", "SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None  # None with SSL: the system CA store
    ssl_certfile: str | None = None  # client certificate (mutual TLS)
    ssl_keyfile: str | None = None  # its key, when not inside ssl_certfile

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.bootstrap_servers.strip():
            problems.append("bootstrap_servers: must name at least one host:port")
        problems += [f"topic: {problem}" for problem in _compile_template(self.topic)[1]]
        if self.client_id is not None and not self.client_id:
            problems.append("client_id: must not be empty (leave it unset for the default)")
        if self.linger_ms < 0:
            problems.append(f"linger_ms: must be >= 0, not {self.linger_ms}")
        if self.max_batch_bytes < 1:
            problems.append(f"max_batch_bytes: must be >= 1, not {self.max_batch_bytes}")
        if self.request_timeout_ms < 1:
            problems.append(f"request_timeout_ms: must be >= 1, not {self.request_timeout_ms}")
        if self.security_protocol not in ("PLAINTEXT", "SSL"):
            problems.append(f"security_protocol: must be 'PLAINTEXT' or 'SSL', not {self.security_protocol!r}")
        elif self.security_protocol == "PLAINTEXT":
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    problems.append(f"{name}: is set but security_protocol is 'PLAINTEXT'; use 'SSL'")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            problems.append("ssl_keyfile: needs ssl_certfile")
        if problems:
            raise KafkaSettingsError(problems)


# --------------------------------------------------------------------------
# The producer backend
# --------------------------------------------------------------------------


class ProducerLike(Protocol):
    """The part of :class:`aiokafka.AIOKafkaProducer` this destination uses."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Awaitable[object]:
        """Enqueue one record; the result resolves once the broker acknowledged it."""
        ...


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile is not None:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    except (OSError, ssl.SSLError) as err:
        raise KafkaSettingsError([f"ssl_cafile/ssl_certfile/ssl_keyfile: cannot load: {err}"]) from err
    return context


def aiokafka_producer_factory(settings: KafkaSettings, client_id: str) -> Callable[[], ProducerLike]:
    """The default backend: an idempotent ``acks=all`` :class:`aiokafka.AIOKafkaProducer`.

    The factory must be called inside the running event loop (aiokafka binds to it); it does no
    network I/O. With SSL it reads the certificate files and raises :class:`KafkaSettingsError`
    if it cannot.
    """

    def build() -> ProducerLike:
        context = _ssl_context(settings) if settings.security_protocol == "SSL" else None
        producer: ProducerLike = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_bytes,
            request_timeout_ms=settings.request_timeout_ms,
            security_protocol=settings.security_protocol,
            ssl_context=context,
        )
        return producer

    return build


def _retry_delay(attempt: int) -> float:
    """Capped, jittered exponential backoff (seconds) before start attempt ``attempt + 1``."""
    return backoff_delay(attempt, cap_s=_MAX_RETRY_S, floor_s=_MIN_RETRY_S)


# Errors that say "not reachable now" rather than "this record is refused".
_AVAILABILITY_ERRORS: Final = (
    KafkaConnectionError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    NoBrokersAvailable,
    OSError,
    TimeoutError,
)
# Errors a send can end with; anything else is a bug and propagates.
_SEND_ERRORS: Final = (KafkaError, OSError, TimeoutError)


def _is_availability_error(err: BaseException) -> bool:
    """Connection and timeout errors, and every broker error aiokafka marks retriable
    (NotLeaderForPartitionError, LeaderNotAvailableError, RequestTimedOutError,
    NotEnoughReplicasError, UnknownTopicOrPartitionError, ...)."""
    return isinstance(err, _AVAILABILITY_ERRORS) or getattr(err, "retriable", False) is True


def _content_type(payload: bytes) -> bytes:
    """CloudEvents structured JSON when the payload is a JSON object with the required
    CloudEvents attributes, else plain JSON (what the pipeline publishes)."""
    if b'"specversion"' not in payload or payload.lstrip()[:1] != b"{":
        return JSON_CONTENT_TYPE
    try:
        document = json.loads(payload)
    except ValueError:  # also UnicodeDecodeError
        return JSON_CONTENT_TYPE
    if isinstance(document, dict) and all(
        isinstance(document.get(name), str) for name in ("specversion", "id", "source", "type")
    ):
        return CLOUDEVENTS_CONTENT_TYPE
    return JSON_CONTENT_TYPE


def _retrieve(future: asyncio.Future[object]) -> None:
    """Mark a record future's exception as retrieved (we stop at the first failure)."""
    if not future.cancelled():
        future.exception()


class _NoInbound:
    """An async iterator that ends at once."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> InboundMessage:
        raise StopAsyncIteration


# --------------------------------------------------------------------------
# The destination
# --------------------------------------------------------------------------


class KafkaDestination:
    """A :class:`gateway.forward.base.Destination` producing to Kafka.

    Use ``async with KafkaDestination(...)`` or :meth:`start` / :meth:`close`. :meth:`start`
    connects in the background and retries with capped jittered backoff until the brokers
    answer; it never raises for brokers that are down. Once started, aiokafka reconnects by
    itself and failed sends surface as :class:`DestinationUnavailableError`.

    ``connected`` is a health signal for status pages and metrics: true once the producer has
    started, false after a send fails for availability reasons and true again after the next
    send that succeeds. The caller should keep sending on its backoff rather than wait for it.

    Counters: ``sent`` (records handed to the producer), ``acked`` (records the brokers
    acknowledged), ``failed_batches`` (batches not acknowledged in full).

    ``send`` is meant for one caller at a time (the outbox sends one batch after another).

    Args:
        name: the destination's name (logs, default client id).
        settings: where and how to produce.
        producer_factory: builds the backend; default :func:`aiokafka_producer_factory`. Called
            in :meth:`start` and again after each failed start attempt.
        retry_delay: seconds to wait after the n-th failed start attempt (n from 1).
    """

    def __init__(
        self,
        name: str,
        settings: KafkaSettings,
        *,
        producer_factory: Callable[[], ProducerLike] | None = None,
        retry_delay: Callable[[int], float] = _retry_delay,
    ) -> None:
        self.name = name
        self.settings = settings
        self._factory = producer_factory or aiokafka_producer_factory(settings, settings.client_id or f"iotgw-{name}")
        self._retry_delay = retry_delay
        self._topic_map = KafkaTopicMap(settings.topic)
        self._producer: ProducerLike | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._started = False  # the current producer's start() succeeded
        self._healthy = False  # no availability failure since the last success
        self._closed = False
        self._state = StateLog(  # the state last logged; unknown at first, so the first report is logged
            log, f"Kafka destination {name}", down="%(name)s: unavailable (%(reason)s); retrying",
            up="%(name)s: %(reason)s", up_level=logging.INFO, initially_up=None,
        )
        self._last_refused: str | None = None  # event id last logged as refused
        self.sent = 0
        self.acked = 0
        self.failed_batches = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.settings.bootstrap_servers!r})"

    @property
    def connected(self) -> bool:
        return self._started and self._healthy and not self._closed

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Build the producer and connect it in the background.

        Raises:
            KafkaSettingsError: if the default backend cannot load the SSL files.
            RuntimeError: if already started or closed.
        """
        if self._connect_task is not None or self._closed:
            raise RuntimeError(f"Kafka destination {self.name!r} can only be started once")
        self._producer = self._factory()
        self._connect_task = asyncio.create_task(self._connect(), name=f"kafka-connect-{self.name}")

    async def _connect(self) -> None:
        attempt = 0
        while True:
            producer = self._producer
            try:
                if producer is None:
                    producer = self._producer = self._factory()
                await producer.start()
            except Exception as err:  # any failure to start is retried: log the first, not each
                attempt += 1
                self._state.down(f"cannot connect to {self.settings.bootstrap_servers}: {err}")
                if producer is not None:
                    self._producer = None
                    await self._stop_producer(producer)
                await asyncio.sleep(self._retry_delay(attempt))
                continue
            self._started = True
            self._healthy = True
            self._state.up(f"connected to {self.settings.bootstrap_servers}")
            return

    async def close(self) -> None:
        """Stop connecting, flush what the producer holds (bounded by the request timeout) and
        close it. Records not acknowledged by then stay in the outbox."""
        if self._closed:
            return
        self._closed = True
        task, self._connect_task = self._connect_task, None
        await cancel_and_wait(task)
        producer, self._producer = self._producer, None
        self._started = False
        if producer is not None:
            await self._stop_producer(producer)
        log.info("Kafka destination %s: closed (sent %d, acked %d)", self.name, self.sent, self.acked)

    async def _stop_producer(self, producer: ProducerLike) -> None:
        try:
            async with asyncio.timeout(self.settings.request_timeout_ms / 1000):
                await producer.stop()
        except Exception as err:  # a producer that cannot stop cleanly is dropped anyway
            log.debug("Kafka destination %s: producer stop failed: %r", self.name, err)

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        """Produce ``batch`` in order; return how many from its start Kafka acknowledged.

        All records are handed to the producer first, so it can batch them, then the
        acknowledgements are awaited in order; the count stops at the first failure.

        Raises:
            DestinationUnavailableError: nothing was acknowledged because the brokers cannot be
                reached or timed out (or the destination is not started, or closed).
            KafkaRefusedError: nothing was acknowledged because Kafka refused the first record.
        """
        producer = self._producer
        if producer is None or not self._started or self._closed:
            state = "closed" if self._closed else "not connected yet"
            raise DestinationUnavailableError(f"Kafka destination {self.name!r} is {state}")
        if not batch:
            return 0
        acks: list[Awaitable[object]] = []
        error: BaseException | None = None
        for event in batch:
            try:
                ack = await producer.send(
                    self._topic_map(event.topic),
                    event.payload,
                    key=event.key.encode() if event.key else None,  # no key: any partition
                    headers=[
                        ("event-id", event.event_id.encode()),
                        ("mqtt-topic", event.topic.encode()),
                        ("content-type", _content_type(event.payload)),
                    ],
                )
            except _SEND_ERRORS as err:
                error = err
                break
            if isinstance(ack, asyncio.Future):
                ack.add_done_callback(_retrieve)
            acks.append(ack)
            self.sent += 1
        acked = 0
        for ack in acks:
            try:
                await ack
            except _SEND_ERRORS as err:
                error = err
                break
            acked += 1
        self.acked += acked
        if error is None:
            self._healthy = True
            self._state.up("sends succeed again")
            return acked
        self.failed_batches += 1
        failed = batch[acked]
        unavailable = _is_availability_error(error)
        if unavailable:
            self._healthy = False
            self._state.down(f"send failed: {error}")
        elif failed.event_id != self._last_refused:
            self._last_refused = failed.event_id
            log.warning(
                "Kafka destination %s: event %s (%s) refused: %s", self.name, failed.event_id, failed.topic, error
            )
        if acked:
            return acked
        if unavailable:
            raise DestinationUnavailableError(f"Kafka destination {self.name!r}: {error}") from error
        raise KafkaRefusedError(self.name, failed.event_id, self._topic_map(failed.topic), error) from error

    def inbound(self) -> AsyncIterator[InboundMessage]:
        """Nothing: the Kafka downlink is out of scope for now, so this iterator ends at once."""
        return _NoInbound()
