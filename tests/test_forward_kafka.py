"""KafkaDestination: topic mapping, record shape, batching, acknowledged prefixes, start retries.

There is no Kafka broker on this machine and none can be installed here, so most tests drive the
destination through a fake producer passed as ``producer_factory`` (the backend seam). The real
aiokafka producer is exercised against a port where nothing listens (start must retry, never
raise). ``test_round_trip_through_real_kafka`` talks to a real broker and runs only when
``KAFKA_BOOTSTRAP_SERVERS`` is set, e.g. ``KAFKA_BOOTSTRAP_SERVERS=localhost:9092``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped, unused-ignore]
from aiokafka.errors import (  # type: ignore[import-untyped, unused-ignore]
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)
from conftest import free_port, until

from gateway.errors import ConfigError, GatewayError
from gateway.forward.base import Destination, DestinationUnavailableError, OutboundEvent
from gateway.forward.kafka.destination import (
    MAX_KAFKA_TOPIC_CHARS,
    KafkaDestination,
    KafkaRefusedError,
    KafkaSettings,
    KafkaSettingsError,
    KafkaTopicMap,
    ProducerLike,
    _retry_delay,
    aiokafka_producer_factory,
)

TOPIC = "telemetry/valid/1.0/site1/pm/pm-1/pm2_5"
CLOUDEVENT = json.dumps(
    {"specversion": "1.0", "id": "01J0000000000000000000000A", "source": "/iotgw/site1/pm-1", "type": "t", "data": {}}
).encode()


def event(seq: int, *, key: str = "pm-1", topic: str = TOPIC, payload: bytes = b'{"v":1}') -> OutboundEvent:
    return OutboundEvent(
        seq=seq, event_id=f"01J{seq:023d}", topic=topic, key=key, payload=payload, created_ms=1_700_000_000_000 + seq
    )


# --------------------------------------------------------------------------
# A fake producer: records sends and the order of acknowledgement awaits
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    topic: str
    value: bytes
    key: bytes | None
    headers: dict[str, bytes]


class Ack:
    """What the fake's send returns: logs when it is awaited, then resolves or fails."""

    def __init__(self, log: list[str], index: int, error: Exception | None) -> None:
        self.log = log
        self.index = index
        self.error = error

    def __await__(self) -> Generator[Any, None, object]:
        self.log.append(f"await {self.index}")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.error is None:
            future.set_result(self.index)
        else:
            future.set_exception(self.error)
        return future.__await__()


class FakeProducer:
    def __init__(
        self,
        *,
        fail_start: Exception | None = None,
        fail_ack: dict[int, Exception] | None = None,
        fail_enqueue: dict[int, Exception] | None = None,
    ) -> None:
        self.fail_start = fail_start
        self.fail_ack = fail_ack or {}
        self.fail_enqueue = fail_enqueue or {}
        self.log: list[str] = []
        self.records: list[Record] = []
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.log.append("start")
        if self.fail_start is not None:
            raise self.fail_start
        self.started = True

    async def stop(self) -> None:
        self.log.append("stop")
        self.stopped = True

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Awaitable[object]:
        index = len(self.records)
        if index in self.fail_enqueue:
            raise self.fail_enqueue[index]
        self.records.append(Record(topic, value, key, dict(headers)))
        self.log.append(f"send {index}")
        return Ack(self.log, index, self.fail_ack.get(index))


class Factory:
    """Hands out the given producers in order and counts the calls."""

    def __init__(self, *producers: FakeProducer) -> None:
        self.producers = list(producers)
        self.calls = 0

    def __call__(self) -> ProducerLike:
        producer = self.producers[self.calls]
        self.calls += 1
        return producer


@contextlib.asynccontextmanager
async def started(producer: FakeProducer) -> AsyncIterator[KafkaDestination]:
    """A destination on ``producer``, started and connected; closed on exit."""
    async with KafkaDestination(
        "backbone", KafkaSettings("broker:9092"), producer_factory=Factory(producer)
    ) as destination:
        await until(lambda: destination.connected, 5.0)
        yield destination


# --------------------------------------------------------------------------
# Topic mapping and settings
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "local_topic", "kafka_topic"),
    [
        pytest.param("iotgw.{stage}", TOPIC, "iotgw.valid", id="stage-valid"),
        pytest.param("iotgw.{stage}", "telemetry/raw/1.0/s/c/d/m", "iotgw.raw", id="stage-raw"),
        pytest.param("iotgw.{stage}", "telemetry/bogus/1.0/s/c/d/m", "iotgw._", id="stage-unknown-stage"),
        pytest.param("iotgw.{stage}", "commands/pm-1", "iotgw._", id="stage-outside-taxonomy"),
        pytest.param("iotgw.{stage}", "telemetry", "iotgw._", id="stage-single-level"),
        pytest.param("gw.{level0}.{level3}", TOPIC, "gw.telemetry.site1", id="levels"),
        pytest.param("{level1}-{level5}", TOPIC, "valid-pm-1", id="levels-no-literal-prefix"),
        pytest.param("gw.{level0}.{level9}", TOPIC, "gw.telemetry._", id="level-past-the-end"),
        pytest.param("gw.{level1}", "a//c", "gw._", id="empty-level"),
        pytest.param("gw.{level0}.{level1}", "site 1/température", "gw.site_1.temp_rature", id="invalid-chars"),
        pytest.param("gw.{level0}", "a+b#c$d:e", "gw.a_b_c_d_e", id="wildcard-and-punctuation-chars"),
        pytest.param("{level0}", ".", "_", id="dot-name-reserved"),
        pytest.param("{level0}", "..", "__", id="dotdot-name-reserved"),
        pytest.param("fixed.topic", TOPIC, "fixed.topic", id="no-placeholder"),
        pytest.param("gw.{level0}", "x" * 300, "gw." + "x" * (MAX_KAFKA_TOPIC_CHARS - 3), id="cut-to-249"),
    ],
)
def test_topic_mapping(template: str, local_topic: str, kafka_topic: str) -> None:
    topic_map = KafkaTopicMap(template)
    assert topic_map(local_topic) == kafka_topic
    assert topic_map(local_topic) == kafka_topic  # again, from the cache


@pytest.mark.parametrize(
    ("template", "message"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param("iotgw.{device}", "unknown placeholder {device}", id="unknown-placeholder"),
        pytest.param("iotgw.{}", "unknown placeholder {}", id="positional"),
        pytest.param("iotgw.{0}", "unknown placeholder {0}", id="numbered"),
        pytest.param("iotgw.{level01}", "unknown placeholder {level01}", id="level-leading-zero"),
        pytest.param("iotgw.{level0.x}", "unknown placeholder {level0.x}", id="attribute"),
        pytest.param("iotgw.{level0:>5}", "format spec or conversion", id="format-spec"),
        pytest.param("iotgw.{stage!r}", "format spec or conversion", id="conversion"),
        pytest.param("iotgw/{stage}", "literal text may only contain", id="slash-in-literal"),
        pytest.param("iot gw.{stage}", "literal text may only contain", id="space-in-literal"),
        pytest.param("iotgw.{stage", "malformed", id="unbalanced-brace"),
        pytest.param("x" * 250, "longer than 249", id="literal-too-long"),
        pytest.param("..", "not valid Kafka topic names", id="dotdot"),
    ],
)
def test_invalid_template_is_refused_at_construction(template: str, message: str) -> None:
    with pytest.raises(KafkaSettingsError, match="topic: ") as caught:
        KafkaSettings("broker:9092", topic=template)
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value, GatewayError)
    with pytest.raises(KafkaSettingsError):
        KafkaTopicMap(template)


def test_invalid_settings_list_every_problem() -> None:
    with pytest.raises(KafkaSettingsError) as caught:
        KafkaSettings(" ", linger_ms=-1, max_batch_bytes=0, request_timeout_ms=0, ssl_cafile="/ca.pem", client_id="")
    assert caught.value.problems == [
        "bootstrap_servers: must name at least one host:port",
        "client_id: must not be empty (leave it unset for the default)",
        "linger_ms: must be >= 0, not -1",
        "max_batch_bytes: must be >= 1, not 0",
        "request_timeout_ms: must be >= 1, not 0",
        "ssl_cafile: is set but security_protocol is 'PLAINTEXT'; use 'SSL'",
    ]


def test_ssl_key_needs_certificate() -> None:
    with pytest.raises(KafkaSettingsError, match="ssl_keyfile: needs ssl_certfile"):
        KafkaSettings("broker:9093", security_protocol="SSL", ssl_keyfile="/key.pem")


def test_default_settings() -> None:
    settings = KafkaSettings("broker:9092")
    assert (settings.topic, settings.linger_ms, settings.max_batch_bytes) == ("iotgw.{stage}", 20, 1_048_576)
    assert (settings.request_timeout_ms, settings.security_protocol) == (30000, "PLAINTEXT")


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


def test_satisfies_the_destination_protocol() -> None:
    destination: Destination = KafkaDestination("backbone", KafkaSettings("broker:9092"))  # checked by mypy
    assert destination.name == "backbone"
    assert not destination.connected


async def test_record_key_value_topic_and_headers() -> None:
    producer = FakeProducer()
    async with started(producer) as destination:
        batch = [
            event(1, key="pm-1", payload=CLOUDEVENT),
            event(2, key="ble-aa", topic="telemetry/raw/1.0/site1/ble/ble-aa/temp", payload=b'{"t":21.5}'),
            event(3, key="", topic="status/gw"),
        ]
        assert await destination.send(batch) == 3
    assert producer.records == [
        Record(
            "iotgw.valid",
            CLOUDEVENT,
            b"pm-1",
            {
                "event-id": b"01J00000000000000000000001",
                "mqtt-topic": TOPIC.encode(),
                "content-type": b"application/cloudevents+json",
            },
        ),
        Record(
            "iotgw.raw",
            b'{"t":21.5}',
            b"ble-aa",
            {
                "event-id": b"01J00000000000000000000002",
                "mqtt-topic": b"telemetry/raw/1.0/site1/ble/ble-aa/temp",
                "content-type": b"application/json",
            },
        ),
        Record(  # no device id: no key, so the partitioner spreads these
            "iotgw._",
            b'{"v":1}',
            None,
            {
                "event-id": b"01J00000000000000000000003",
                "mqtt-topic": b"status/gw",
                "content-type": b"application/json",
            },
        ),
    ]
    assert (destination.sent, destination.acked, destination.failed_batches) == (3, 3, 0)


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        pytest.param(CLOUDEVENT, b"application/cloudevents+json", id="cloudevent"),
        pytest.param(
            b'  \n{"specversion":"1.0","id":"x","source":"/s","type":"t"}',
            b"application/cloudevents+json",
            id="cloudevent-leading-whitespace",
        ),
        pytest.param(b'{"specversion":"1.0","id":"x"}', b"application/json", id="missing-attributes"),
        pytest.param(
            b'{"specversion":1,"id":"x","source":"/s","type":"t"}', b"application/json", id="specversion-not-a-string"
        ),
        pytest.param(b'["specversion"]', b"application/json", id="array"),
        pytest.param(b'{"specversion": broken', b"application/json", id="broken-json"),
        pytest.param(b'{"v":1}', b"application/json", id="plain-json"),
    ],
)
async def test_content_type_header(payload: bytes, content_type: bytes) -> None:
    producer = FakeProducer()
    async with started(producer) as destination:
        await destination.send([event(1, payload=payload)])
    assert producer.records[0].headers["content-type"] == content_type


async def test_all_records_are_enqueued_before_the_first_acknowledgement_is_awaited() -> None:
    producer = FakeProducer()
    async with started(producer) as destination:
        assert await destination.send([event(i) for i in range(4)]) == 4
    assert producer.log == [
        "start",
        "send 0",
        "send 1",
        "send 2",
        "send 3",
        "await 0",
        "await 1",
        "await 2",
        "await 3",
        "stop",
    ]


async def test_empty_batch_sends_nothing() -> None:
    producer = FakeProducer()
    async with started(producer) as destination:
        assert await destination.send([]) == 0
    assert producer.records == []


# --------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failing",
    [pytest.param(1, id="second-fails"), pytest.param(2, id="third-fails"), pytest.param(4, id="last-fails")],
)
async def test_acknowledged_prefix_stops_at_the_first_failed_acknowledgement(failing: int) -> None:
    producer = FakeProducer(fail_ack={failing: KafkaTimeoutError(), failing + 1: KafkaTimeoutError()})
    async with started(producer) as destination:
        assert await destination.send([event(i) for i in range(5)]) == failing
        assert not destination.connected
        assert (destination.sent, destination.acked, destination.failed_batches) == (5, failing, 1)
    awaited = [entry for entry in producer.log if entry.startswith("await")]
    assert awaited == [f"await {i}" for i in range(failing + 1)]  # nothing awaited after the failure


@pytest.mark.parametrize(
    "failing",
    [pytest.param(1, id="second-refused"), pytest.param(3, id="fourth-refused")],
)
async def test_acknowledged_prefix_when_enqueueing_fails(failing: int) -> None:
    producer = FakeProducer(fail_enqueue={failing: KafkaTimeoutError("buffer full")})
    async with started(producer) as destination:
        assert await destination.send([event(i) for i in range(5)]) == failing
        assert (destination.sent, destination.acked, destination.failed_batches) == (failing, failing, 1)
    assert len(producer.records) == failing  # nothing after the failure was handed over


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(KafkaTimeoutError(), id="KafkaTimeoutError"),
        pytest.param(KafkaConnectionError("connection refused"), id="KafkaConnectionError"),
        pytest.param(NotLeaderForPartitionError(), id="NotLeaderForPartitionError"),
        pytest.param(RequestTimedOutError(), id="RequestTimedOutError"),
        pytest.param(ConnectionResetError(), id="ConnectionResetError"),
    ],
)
async def test_unavailable_when_the_first_acknowledgement_fails(error: Exception) -> None:
    producer = FakeProducer(fail_ack={0: error})
    async with started(producer) as destination:
        with pytest.raises(DestinationUnavailableError) as caught:
            await destination.send([event(0), event(1)])
        assert caught.value.__cause__ is error
        assert not isinstance(caught.value, KafkaRefusedError)
        assert not destination.connected
        assert (destination.acked, destination.failed_batches) == (0, 1)
        # The brokers come back: the next send succeeds and connected follows.
        assert await destination.send([event(2)]) == 1
        assert destination.connected


async def test_unavailable_when_the_first_enqueue_fails() -> None:
    producer = FakeProducer(fail_enqueue={0: KafkaTimeoutError("no metadata")})
    async with started(producer) as destination:
        with pytest.raises(DestinationUnavailableError, match="KafkaTimeoutError"):
            await destination.send([event(0), event(1)])
        assert destination.sent == 0


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(MessageSizeTooLargeError(), id="MessageSizeTooLargeError"),
        pytest.param(TopicAuthorizationFailedError(), id="TopicAuthorizationFailedError"),
    ],
)
async def test_refused_first_record_raises_refused_and_stays_connected(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    producer = FakeProducer(fail_ack={0: error, 1: error})
    async with started(producer) as destination:
        for _ in range(2):
            with pytest.raises(KafkaRefusedError) as caught:
                await destination.send([event(0)])
        assert isinstance(caught.value, DestinationUnavailableError)
        assert (caught.value.event_id, caught.value.kafka_topic, caught.value.cause) == (
            "01J00000000000000000000000",
            "iotgw.valid",
            error,
        )
        assert destination.connected  # the brokers answered
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1  # logged once for the same event, not on every retry


async def test_later_failures_after_the_first_are_retrieved() -> None:
    """With real futures (as aiokafka returns), failures after the first are not left unretrieved."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[object]] = []

    class FutureProducer(FakeProducer):
        async def send(
            self, topic: str, value: bytes, *, key: bytes | None, headers: Sequence[tuple[str, bytes]]
        ) -> Awaitable[object]:
            future: asyncio.Future[object] = loop.create_future()
            futures.append(future)
            return future

    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        async with started(FutureProducer()) as destination:
            sending = asyncio.create_task(destination.send([event(i) for i in range(3)]))
            await until(lambda: len(futures) == 3, 5.0)
            futures[0].set_result(None)
            futures[1].set_exception(KafkaTimeoutError())
            futures[2].set_exception(KafkaTimeoutError())
            assert await sending == 1
        del futures[:]
        await asyncio.sleep(0)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []


async def test_send_before_connected_and_after_close_is_unavailable() -> None:
    destination = KafkaDestination(
        "backbone", KafkaSettings("broker:9092"), producer_factory=Factory(FakeProducer(), FakeProducer())
    )
    with pytest.raises(DestinationUnavailableError, match="not connected"):
        await destination.send([event(0)])
    await destination.start()
    await until(lambda: destination.connected, 5.0)
    await destination.close()
    assert not destination.connected
    with pytest.raises(DestinationUnavailableError, match="closed"):
        await destination.send([event(0)])
    await destination.close()  # idempotent


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


async def test_start_retries_in_the_background_and_logs_state_changes_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.forward.kafka")
    failing = [FakeProducer(fail_start=KafkaConnectionError("Unable to bootstrap")) for _ in range(3)]
    good = FakeProducer()
    factory = Factory(*failing, good)
    delays: list[int] = []

    def no_wait(attempt: int) -> float:
        delays.append(attempt)
        return 0.0

    destination = KafkaDestination(
        "backbone", KafkaSettings("broker:9092"), producer_factory=factory, retry_delay=no_wait
    )
    await destination.start()  # returns at once, does not raise
    await until(lambda: destination.connected, 5.0)
    assert factory.calls == 4
    assert delays == [1, 2, 3]
    assert all(p.log == ["start", "stop"] for p in failing)  # each failed producer is closed
    await destination.close()
    assert good.log == ["start", "stop"]
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            "WARNING",
            "Kafka destination backbone: unavailable (cannot connect to broker:9092: "
            "KafkaConnectionError: Unable to bootstrap); retrying",
        ),
        ("INFO", "Kafka destination backbone: connected to broker:9092"),
        ("INFO", "Kafka destination backbone: closed (sent 0, acked 0)"),
    ]


async def test_close_while_retrying_stops_the_retries() -> None:
    producers = [FakeProducer(fail_start=KafkaConnectionError()) for _ in range(2)]
    destination = KafkaDestination(
        "backbone",
        KafkaSettings("broker:9092"),
        producer_factory=Factory(*producers),
        retry_delay=lambda _attempt: 60.0,
    )
    await destination.start()
    await until(lambda: producers[0].stopped, 5.0)
    async with asyncio.timeout(1):
        await destination.close()
    assert not destination.connected
    assert producers[1].log == []


async def test_start_twice_is_an_error() -> None:
    async with started(FakeProducer()) as destination:
        with pytest.raises(RuntimeError, match="only be started once"):
            await destination.start()


async def test_inbound_ends_at_once() -> None:
    async with started(FakeProducer()) as destination:
        assert [message async for message in destination.inbound()] == []


def test_default_retry_delay_is_jittered_and_capped() -> None:
    delays = [_retry_delay(attempt) for attempt in range(1, 60) for _ in range(20)]
    assert all(0.1 <= d <= 1.5**10 for d in delays)
    assert len(set(delays)) > 100


async def test_real_producer_against_a_port_without_broker_retries_without_raising() -> None:
    settings = KafkaSettings(f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    build = aiokafka_producer_factory(settings, "iotgw-test")
    built: list[ProducerLike] = []

    def factory() -> ProducerLike:
        built.append(build())
        return built[-1]

    destination = KafkaDestination("backbone", settings, producer_factory=factory, retry_delay=lambda _a: 0.05)
    await destination.start()
    await until(lambda: len(built) >= 3, 20)
    assert not destination.connected
    with pytest.raises(DestinationUnavailableError):
        await destination.send([event(0)])
    await destination.close()


async def test_ssl_files_that_cannot_be_loaded_fail_start(tmp_path: Any) -> None:
    settings = KafkaSettings("broker:9093", security_protocol="SSL", ssl_cafile=str(tmp_path / "missing-ca.pem"))
    destination = KafkaDestination("backbone", settings)
    with pytest.raises(KafkaSettingsError, match="cannot load"):
        await destination.start()
    await destination.close()


# --------------------------------------------------------------------------
# A real broker, when one is available
# --------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
    reason="needs a Kafka broker: set KAFKA_BOOTSTRAP_SERVERS (none can run on this machine)",
)
async def test_round_trip_through_real_kafka() -> None:
    servers = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    prefix = f"iotgw-test-{uuid.uuid4().hex[:12]}"  # a topic of its own: no other run's records
    settings = KafkaSettings(servers, topic=prefix + ".{stage}", linger_ms=5)
    batch = [event(i, key=f"dev-{i % 2}", payload=json.dumps({"i": i}).encode()) for i in range(5)]
    async with KafkaDestination("backbone", settings) as destination:
        await until(lambda: destination.connected, 30)
        async with asyncio.timeout(60):
            sent = 0
            while sent < len(batch):  # the first send may wait for the topic to be created
                try:
                    sent += await destination.send(batch[sent:])
                except DestinationUnavailableError:
                    await asyncio.sleep(0.5)
    assert destination.acked == 5
    consumer = AIOKafkaConsumer(
        f"{prefix}.valid", bootstrap_servers=servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        received: list[Any] = []
        async with asyncio.timeout(60):
            while len(received) < 5:
                records = await consumer.getmany(timeout_ms=1000)
                for partition_records in records.values():
                    received.extend(partition_records)
    finally:
        await consumer.stop()
    by_id = {dict(r.headers)["event-id"].decode(): r for r in received}
    assert sorted(by_id) == sorted(e.event_id for e in batch)
    for e in batch:
        record = by_id[e.event_id]
        assert (record.key, record.value) == (e.key.encode(), e.payload)
        assert dict(record.headers)["mqtt-topic"] == TOPIC.encode()
    for key in (b"dev-0", b"dev-1"):  # per-device order within its partition
        seqs = [json.loads(r.value)["i"] for r in received if r.key == key]
        assert seqs == sorted(seqs)
