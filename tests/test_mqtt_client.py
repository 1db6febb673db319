"""The external broker's MQTT client (gateway/broker/mqtt_client.py) against hostile peers: a raw socket server
that sends garbage, oversized packets, packets split across reads and connections cut mid-packet; and against a
real Mosquitto: an oversized message skipped (acknowledged, counted) between readings, TLS with a client
certificate and a password login, and MQTT 5's Receive Maximum letting the broker send more than its 3.1.1
default ahead of the PUBACKs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import Mosquitto, free_port, mosquitto_fixture, mqtt_publish  # noqa: F401  (fixture)
from test_external import external_config

from gateway.app import Gateway
from gateway.broker import wire
from gateway.broker.embedded import Resend
from gateway.broker.external import ExternalBroker
from gateway.broker.mqtt_client import (
    MqttClient,
    PacketReader,
    ProtocolError,
    Publish,
    decode_publish,
    publish_packet,
    publish_packets,
)
from gateway.config import ExternalBrokerSettings, parse_config

TOPIC = "telemetry/raw/1.0/s1/meter/m-1/power"


def _publish(topic: str, payload: bytes, packet_id: int, *, dup: bool = False) -> bytes:
    return wire.publish(topic, payload, 1, packet_id, dup=dup)


# --- the packet reader (pure) -----------------------------------------------------------------------------

def test_packets_split_at_every_byte_and_joined_in_one_read_come_out_the_same() -> None:
    stream = b"".join([wire.connack(False, 0), _publish(TOPIC, b'{"value": 1}', 7), wire.puback(3),
                       _publish(TOPIC, b"x" * 300, 8), b"\xd0\x00"])
    whole = PacketReader(1024).feed(stream)
    reader = PacketReader(1024)
    one_by_one = [packet for i in range(len(stream)) for packet in reader.feed(stream[i:i + 1])]
    assert one_by_one == whole
    assert [first >> 4 for first, _, _ in whole] == [2, 3, 4, 3, 13]
    assert decode_publish(*whole[3]).payload == b"x" * 300  # a two-byte remaining length


def test_an_oversized_publish_is_not_kept_and_the_next_packet_is_read() -> None:
    reader = PacketReader(256)
    big = _publish(TOPIC, b"y" * 10_000, 9)
    packets = [p for i in range(0, len(big), 1000) for p in reader.feed(big[i:i + 1000])]
    packets += reader.feed(_publish(TOPIC, b"after", 10))
    assert [(decode_publish(*p).packet_id, decode_publish(*p).oversized, decode_publish(*p).payload)
            for p in packets] == [(9, True, b""), (10, False, b"after")]
    assert len(reader._buffer) == 0  # nothing of the 10 kB was kept


@pytest.mark.parametrize(("data", "why"), [
    (b"\x30\xff\xff\xff\xff\x01", "more than four bytes"),
    (b"\x90" + wire.remaining_length(5000) + b"\x00" * 10, "more than max_packet_bytes"),  # not a PUBLISH
], ids=["five-byte-length", "oversized-suback"])
def test_a_malformed_stream_is_a_protocol_error(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        PacketReader(1024).feed(data)


@pytest.mark.parametrize("body", [
    b"", b"\x00", b"\x00\x05abc", b"\x00\x01\xff\x00\x01", b"\x00\x01a\x00\x00", b"\x00\x01#\x00\x01",
], ids=["empty", "short-length", "short-topic", "not-utf8", "packet-id-0", "wildcard"])
def test_a_malformed_publish_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_publish(0x32, body)


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
@pytest.mark.parametrize("topic", ["t", "telemetry/valid/1.0/site/ü/d-1/temperature", "x" * 300])
def test_publishes_on_one_topic_encode_as_each_alone(topic: str, v5: bool) -> None:
    """Sizes on both sides of each remaining-length byte boundary (127, 16383)."""
    name = len(topic.encode()) + 2 + v5
    payloads = [b"", b"{}", b"a" * (127 - name), b"b" * (128 - name), b"c" * (16383 - name), b"d" * (16384 - name),
                b"e" * 70_000]
    assert publish_packets(topic, payloads, v5=v5) == b"".join(
        publish_packet(topic, p, 0, None, v5=v5) for p in payloads)
    assert publish_packets(topic, [], v5=v5) == b""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_raise_nothing_but_protocol_errors(chunks: list[bytes]) -> None:
    reader = PacketReader(128)
    try:
        for chunk in chunks:
            for first, body, oversized in reader.feed(chunk):
                if first >> 4 == 3:
                    decode_publish(first, body, oversized, v5=bool(first & 0x01))
    except ProtocolError:
        pass


# --- against a raw socket server --------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.messages: list[Publish] = []
        self.events: list[str] = []

    def message(self, message: Publish) -> None:
        self.messages.append(message)

    def connected(self, session_present: bool) -> None:
        self.events.append("connected")

    def lost(self, why: str) -> None:
        self.events.append(f"lost: {why}")

    def refused(self, why: str) -> None:
        self.events.append(f"refused: {why}")


Script = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawBroker:
    """A TCP server that reads the client's CONNECT and then runs ``script`` (per connection, numbered)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.connects: list[bytes] = []  # each connection's CONNECT (its protocol level is byte 8)
        self.received: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            self.connects.append(await reader.read(4096))
            await self.script(self.connections, reader, writer)
            while data := await reader.read(4096):
                self.received.append(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_broker() -> AsyncIterator[Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]]]:
    """Start a hostile raw broker and a client of it (``_client_of``), as often as a test wants; all stopped after."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(script: Script) -> tuple[RawBroker, MqttClient, Recorder]:
            return await stack.enter_async_context(
                _client_of(script, client_id="hostile", subscriptions=["t/#"], max_packet_bytes=1024))

        yield start


def _external_settings(port: int) -> ExternalBrokerSettings:
    """External mode's settings for a broker on ``port`` (everything else at its default)."""
    settings = parse_config({
        "site": "s1", "gateway_id": "gw-x", "storage": {"data_dir": "/nonexistent"},
        "broker": {"mode": "external", "external": {"url": f"mqtt://127.0.0.1:{port}"}},
    }).broker.external
    assert settings is not None
    return settings


async def _accept(writer: asyncio.StreamWriter) -> None:
    writer.write(wire.connack(False, 0))
    await writer.drain()


@pytest.mark.parametrize("same_read", [True, False], ids=["with-the-connack", "after-the-subscribe"])
@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff\xff\xff", b"\x00\x00", b"\x20\x02\x00\x00"],
                         ids=["bad-length", "reserved-type", "second-connack"])
async def test_garbage_from_the_broker_closes_the_connection_and_it_reconnects(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]], garbage: bytes,
    same_read: bool,
) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if n > 1:
            await _accept(writer)
        elif same_read:  # one read: the CONNACK is taken, then the garbage closes the connection
            writer.write(wire.connack(False, 0) + garbage)
            await writer.drain()
        else:
            await _accept(writer)
            await reader.read(4096)  # the SUBSCRIBE: the client took the CONNACK, the garbage comes in a later read
            writer.write(garbage)
            await writer.drain()

    broker, client, recorder = await raw_broker(script)
    await until(lambda: broker.connections >= 2 and client.connected, 15, "a second connection")
    events = recorder.events
    if same_read and events[0] != "connected":  # the garbage spoiled the read before the CONNACK was taken
        assert events[0].startswith("refused: protocol error"), events
    else:
        assert events[:2] == ["connected", events[1]]
        assert events[1].startswith("lost: protocol error"), events


@pytest.mark.parametrize("answer", [b"\x40\x02\x00\x01", b"\x00\x00", b"\x20\x03\x00\x00\x00"],
                         ids=["puback-first", "reserved-type", "long-connack"])
async def test_garbage_instead_of_a_connack_is_refused_and_retried(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]], answer: bytes
) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer if n == 1 else wire.connack(False, 0))
        await writer.drain()

    _, client, recorder = await raw_broker(script)
    await until(lambda: client.connected, 15, "the second attempt")
    assert recorder.events[0].startswith("refused: protocol error"), recorder.events


async def test_a_publish_split_across_reads_arrives_whole_and_is_acknowledged(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]]
) -> None:
    packet = _publish(TOPIC, json.dumps({"value": 1.5, "pad": "z" * 200}).encode(), 42)

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        for i in range(0, len(packet), 7):
            writer.write(packet[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0.002)

    broker, client, recorder = await raw_broker(script)
    await until(lambda: recorder.messages, 10, "the message")
    [message] = recorder.messages
    assert (message.topic, message.packet_id, json.loads(message.payload)["value"]) == (TOPIC, 42, 1.5)
    assert client.ack(42, message.generation)
    await until(lambda: wire.puback(42) in b"".join(broker.received), 5, "the PUBACK")


async def test_a_disconnect_mid_packet_delivers_nothing_and_a_late_ack_is_not_sent_on_the_new_connection(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]]
) -> None:
    whole = _publish(TOPIC, b'{"value": 1}', 5)
    cut = _publish(TOPIC, b'{"value": 2}', 6)

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        if n == 1:
            writer.write(whole + cut[:len(cut) // 2])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()

    broker, client, recorder = await raw_broker(script)
    await until(lambda: broker.connections >= 2 and client.connected, 15, "the reconnection")
    assert [m.packet_id for m in recorder.messages] == [5]  # the half packet never became a message
    assert not client.ack(5, recorder.messages[0].generation)  # it came on the connection that is gone
    await asyncio.sleep(0.1)
    assert wire.puback(5) not in b"".join(broker.received)


async def test_an_oversized_publish_from_a_raw_broker_is_handed_over_marked_and_the_next_one_is_read(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]]
) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        writer.write(_publish(TOPIC, b"q" * 100_000, 11) + _publish(TOPIC, b'{"value": 3}', 12))
        await writer.drain()

    _, _, recorder = await raw_broker(script)
    await until(lambda: len(recorder.messages) >= 2, 10, "both messages")
    assert [(m.packet_id, m.oversized, m.payload) for m in recorder.messages] == [
        (11, True, b""), (12, False, b'{"value": 3}')]


async def test_auto_falls_back_to_3_1_1_when_mqtt_5_is_refused() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        level = broker.connects[-1][8]  # the protocol level, after the fixed header and "\0\4MQTT"
        writer.write(wire.connack(False, 1 if level == 5 else 0))  # a 3.1.1 broker's refusal
        await writer.drain()

    async with _client_of(script, client_id="auto", protocol="auto") as (broker, client, _):
        await until(lambda: client.connected, 10, "the 3.1.1 connection")
        assert ([c[8] for c in broker.connects], client.protocol_in_use) == ([5, 4], "3.1.1")


# --- against a real Mosquitto -----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_an_oversized_message_is_skipped_acknowledged_and_counted(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    config = external_config(tmp_path, mosquitto, broker={"protocol": protocol, "max_packet_bytes": 4096})
    async with Gateway(config) as gw:
        await asyncio.to_thread(mqtt_publish, mosquitto.url, [
            (TOPIC, b'{"value": 1, "seq": 1}'), (TOPIC, json.dumps({"value": 2, "pad": "x" * 50_000}).encode()),
            (TOPIC, b'{"value": 3, "seq": 3}'),
        ], client_id="big-sender")
        await until(lambda: gw.store.rows_written >= 2, 10, "the two small readings")
        external = gw.status().broker.external
        assert external is not None
        assert (external.received, external.oversized_skipped) == (3, 1)
        assert external.acknowledged == 2  # the two ingested (the oversized one is acknowledged, not counted)
    async with Gateway(config) as gw:  # nothing comes again: every message was acknowledged
        await until(lambda: (s := gw.status().broker.external) is not None and s.connected, 10, "connected")
        await asyncio.sleep(1.0)
        external = gw.status().broker.external
        assert external is not None
        assert (external.connected, external.received) == (True, 0)


async def test_tls_with_a_client_certificate_and_a_password_login(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls_port = free_port()
    passwd = tmp_path / "passwd"
    await asyncio.to_thread(subprocess.run, ["mosquitto_passwd", "-c", "-b", str(passwd), "iotgw", "s3cret"],
                            check=True, capture_output=True)
    extra = [f"listener {tls_port} 127.0.0.1", f"cafile {pki['ca_pem']}", f"certfile {pki['server_pem']}",
             f"keyfile {pki['server_key']}", "require_certificate true", f"password_file {passwd}",
             "per_listener_settings false"]
    with Mosquitto(tmp_path / "mq", extra_config=extra) as mosquitto:
        tls = {"ca_file": str(pki["ca_pem"]), "cert_file": str(pki["client_pem"]), "key_file": str(pki["client_key"])}
        good = external_config(tmp_path / "good", mosquitto, broker={
            "url": f"mqtts://127.0.0.1:{tls_port}", "tls": tls, "username": "iotgw", "password": "s3cret"})
        async with Gateway(good) as gw:
            assert gw.broker.serving
            external = gw.status().broker.external
            assert external is not None
            assert external.protocol == "3.1.1"
        bad = external_config(tmp_path / "bad", mosquitto, broker={
            "url": f"mqtts://127.0.0.1:{tls_port}", "tls": tls, "username": "iotgw", "password": "wrong"})
        async with Gateway(bad) as gw:
            assert not gw.broker.serving


async def test_mqtt_5_lets_mosquitto_send_more_than_20_ahead_of_the_pubacks(mosquitto: Mosquitto) -> None:
    """Mosquitto sends a 3.1.1 client 20 unacknowledged messages at most (max_inflight_messages); an MQTT 5
    client's Receive Maximum replaces that bound, so PUBACKs that wait for a journal commit hold less back."""
    held: dict[str, int] = {}
    for protocol in ("3.1.1", "5"):
        recorder = Recorder()
        client = MqttClient(recorder, mosquitto.host, mosquitto.port, client_id=f"window-{protocol}",
                            subscriptions=[f"window/{protocol}"], protocol=protocol,
                            receive_maximum=500)
        subacks: list[bytes] = []

        def subscribed(body: bytes, *, v5: bool, original: Callable[..., None] = client.subscribed,
                       subacks: list[bytes] = subacks) -> None:
            subacks.append(body)
            original(body, v5=v5)

        client.subscribed = subscribed  # type: ignore[method-assign]
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: subacks, 10, "subscribed")  # noqa: B023
            await asyncio.to_thread(mqtt_publish, mosquitto.url, [(f"window/{protocol}", b"x")] * 200,
                                    client_id=f"window-pub-{protocol.replace('.', '')}")
            if protocol == "5":
                await until(lambda: len(recorder.messages) >= 200, 20, "all 200")  # noqa: B023
            else:
                await until(lambda: len(recorder.messages) >= 20, 20, "20")  # noqa: B023
                await asyncio.sleep(2.0)  # a 21st, were it sent, would come in far less
            held[protocol] = len(recorder.messages)
        finally:
            await client.disconnect()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert held == {"3.1.1": 20, "5": 200}


# --- the fixes after review -------------------------------------------------------------------------------

async def test_a_message_in_the_same_read_as_the_connack_can_be_acknowledged_at_once(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]]
) -> None:
    acks: list[bool] = []

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.connack(True, 0) + _publish(TOPIC, b'{"value": 1}', 21))  # one write, one read
        await writer.drain()

    broker, client, recorder = await raw_broker(script)
    recorder.message = lambda message: acks.append(client.ack(message.packet_id, message.generation))  # type: ignore[method-assign]
    await until(lambda: acks, 10, "the message")
    assert acks == [True]  # acknowledged as it came (as an oversized or retained one is)
    await until(lambda: wire.puback(21) in b"".join(broker.received), 5, "the PUBACK")


@contextlib.asynccontextmanager
async def _client_of(script: Script, **options: Any) -> AsyncIterator[tuple[RawBroker, MqttClient, Recorder]]:
    """A :class:`RawBroker` running ``script`` and a client of it built with ``options``, running."""
    broker = RawBroker(script)
    server = await asyncio.start_server(broker._serve, "127.0.0.1", 0)
    broker.port = server.sockets[0].getsockname()[1]
    recorder = Recorder()
    client = MqttClient(recorder, "127.0.0.1", broker.port, **{"client_id": "raw", "subscriptions": [], **options})
    task = asyncio.create_task(client.run())
    try:
        yield broker, client, recorder
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


def _ping_answerer(pings: list[float]) -> Script:
    """Accept, then answer every PINGREQ (and send nothing else)."""
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        while data := await reader.read(4096):
            for _ in range(data.count(b"\xc0\x00")):  # no PUBLISH of these tests holds those bytes
                pings.append(asyncio.get_running_loop().time())
                writer.write(b"\xd0\x00")
            await writer.drain()
    return script


async def test_a_client_that_publishes_all_the_time_pings_a_silent_broker_and_stays_connected() -> None:
    pings: list[float] = []
    async with _client_of(_ping_answerer(pings), keepalive_s=1) as (broker, client, recorder):
        await until(lambda: client.connected, 10, "connected")
        for _ in range(40):  # 4 s of QoS 0 publishes, the broker sends nothing back but PINGRESPs
            assert client.publish("t/x", b"x") is not None
            await asyncio.sleep(0.1)
        assert pings  # pinged although never quiet: nothing was read
        assert (broker.connections, recorder.events) == (1, ["connected"])


async def test_a_paused_client_is_not_judged_on_what_it_cannot_read_and_is_judged_again_after() -> None:
    pings: list[float] = []
    async with _client_of(_ping_answerer(pings), keepalive_s=1) as (broker, client, recorder):
        await until(lambda: client.connected, 10, "connected")
        client.pause_reading()
        await asyncio.sleep(3.5)  # more than three keep-alives; the PINGRESPs wait in the socket
        assert len(pings) >= 2  # the broker still hears from it
        client.resume_reading()
        n = len(pings)
        await until(lambda: len(pings) > n + 2, 10, "more pings")
        assert (broker.connections, recorder.events) == (1, ["connected"])


async def test_a_broker_that_does_not_answer_pings_is_left_however_much_the_client_publishes() -> None:
    async def silent(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)

    async with _client_of(silent, keepalive_s=1) as (_, client, recorder):
        await until(lambda: client.connected, 10, "connected")
        for _ in range(100):  # publishing all the time, for 10 s at most
            if any(event.startswith("lost") for event in recorder.events):
                break
            client.publish("t/x", b"x")
            await asyncio.sleep(0.1)
        assert recorder.events[1] == "lost: no answer within the keep-alive"


async def test_auto_keeps_to_mqtt_5_when_the_broker_closes_before_its_connack() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if n == 1:  # the first attempt meets a broker going down, as on a restart
            writer.close()
            return
        writer.write(wire.connack(False, 0) if broker.connects[-1][8] == 4 else b"\x20\x03\x00\x00\x00")
        await writer.drain()

    async with _client_of(script, client_id="auto", protocol="auto") as (broker, client, _):
        await until(lambda: client.connected, 10, "the MQTT 5 connection")
        assert ([c[8] for c in broker.connects], client.protocol_in_use) == ([5, 5], "5")


async def test_the_wait_before_reconnecting_grows_while_connections_are_cut_at_once(
    raw_broker: Callable[[Script], Awaitable[tuple[RawBroker, MqttClient, Recorder]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounds: list[float] = []

    def uniform(low: float, high: float) -> float:
        bounds.append(high)
        return 0.01

    monkeypatch.setattr("gateway.broker.mqtt_client.random.uniform", uniform)

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        writer.transport.abort()  # as a broker does when another client takes the id

    _, _, recorder = await raw_broker(script)
    await until(lambda: len(bounds) >= 4, 10, "four reconnections")
    assert recorder.events.count("connected") >= 4
    assert bounds[:4] == [1.5, 1.5**2, 1.5**3, 1.5**4]  # not 1.5 each time: every CONNACK was accepted


async def test_a_message_ingest_fails_on_drops_the_connection_and_its_resend_is_taken_and_acknowledged() -> None:

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        writer.write(_publish(TOPIC, b'{"value": 1}', 31, dup=n > 1))  # again on every connection till acked
        await writer.drain()

    broker = RawBroker(script)
    server = await asyncio.start_server(broker._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    calls: list[Resend | None] = []

    async def ingest(topic: str, payload: bytes, origin: str | None, event_id: str | None,
                     resend: Resend | None) -> list[asyncio.Future[None]]:
        calls.append(resend)
        if len(calls) == 1:
            raise RuntimeError("the journal is full")
        return []

    settings = _external_settings(port)
    try:
        async with ExternalBroker(settings, ingest, client_id="ingest-fails", filters=["telemetry/#"],
                                  raw_filter="telemetry/raw/#") as external:
            await until(lambda: external.acknowledged >= 1, 10, "the resend acknowledged")
            assert (external.ingest_failures, broker.connections, len(calls)) == (1, 2, 2)
            await until(lambda: wire.puback(31) in b"".join(broker.received), 5, "the PUBACK")
    finally:
        server.close()


@pytest.mark.parametrize("forwarded", [2, 4])
async def test_each_delivery_of_a_burst_is_acknowledged_once_all_its_writes_are_durable_and_only_then(
        forwarded: int) -> None:
    """Deliveries taken together are acknowledged together once the last one's journal write is durable, but one
    with a write still pending (the ``forwarded`` one's outbox write) waits for it alone, and one whose write
    failed gets no PUBACK. The last one forwarded (4) holds back none of the others."""

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)
        writer.write(b"".join(_publish(TOPIC, b'{"value": %d}' % i, i) for i in (1, 2, 3, 4)))  # one read: a burst
        await writer.drain()

    broker = RawBroker(script)
    server = await asyncio.start_server(broker._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    journal = {i: loop.create_future() for i in (1, 2, 3, 4)}
    outbox: asyncio.Future[None] = loop.create_future()  # a message also forwarded: its outbox write

    async def ingest(topic: str, payload: bytes, origin: str | None, event_id: str | None,
                     resend: Resend | None) -> list[asyncio.Future[None]]:
        assert resend is not None
        return [journal[resend.packet_id], outbox] if resend.packet_id == forwarded else [journal[resend.packet_id]]

    def pubacks() -> set[int]:
        received = b"".join(broker.received)
        return {i for i in (1, 2, 3, 4) if wire.puback(i) in received}

    settings = _external_settings(port)
    try:
        async with ExternalBroker(settings, ingest, client_id="burst", filters=["telemetry/#"],
                                  raw_filter="telemetry/raw/#") as external:
            await until(lambda: external.tapped == 4, 10, "the burst taken")
            await asyncio.sleep(0.1)
            assert (external.acknowledged, pubacks()) == (0, set())  # nothing durable yet
            for i in (1, 2, 4):
                journal[i].set_result(None)
            journal[3].set_exception(OSError("disk full"))
            await until(lambda: external.acknowledged == 2, 5, "the durable ones acknowledged")
            await until(lambda: pubacks() == {1, 2, 4} - {forwarded}, 5, "their PUBACKs")
            outbox.set_result(None)
            await until(lambda: pubacks() == {1, 2, 4}, 5, "the forwarded one's PUBACK, once its outbox has it")
            await asyncio.sleep(0.1)
            assert (external.acknowledged, pubacks()) == (3, {1, 2, 4})  # never the one whose write failed
    finally:
        server.close()


def test_an_oversized_publish_with_a_topic_longer_than_the_limit_is_still_skipped_not_an_error() -> None:
    reader = PacketReader(1024)
    topic = "t/" + "a" * 3000
    big = _publish(topic, b"y" * 5000, 13)
    packets = [p for i in range(0, len(big), 700) for p in reader.feed(big[i:i + 700])]
    packets += reader.feed(_publish(TOPIC, b"after", 14))
    assert [(decode_publish(*p).topic, decode_publish(*p).packet_id, decode_publish(*p).oversized)
            for p in packets] == [(topic, 13, True), (TOPIC, 14, False)]


async def test_a_receive_maximum_of_0_from_the_broker_is_a_protocol_error() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x20\x06\x00\x00\x03\x21\x00\x00" if n == 1 else b"\x20\x03\x00\x00\x00")
        await writer.drain()

    async with _client_of(script, protocol="5") as (_, client, recorder):
        await until(lambda: client.connected, 10, "the second attempt")
        assert recorder.events[0] == "refused: protocol error: a Receive Maximum of 0", recorder.events


async def test_an_mqtt_5_puback_with_a_failure_reason_code_counts_as_a_failure() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x20\x03\x00\x00\x00")
        await writer.drain()
        await reader.read(4096)  # our two PUBLISHes (they may come in one read or two)
        writer.write(b"\x40\x03\x00\x01\x87" + b"\x40\x02\x00\x02")  # 1: "not authorized"; 2: success
        await writer.drain()

    async with _client_of(script, protocol="5") as (_, client, _recorder):
        await until(lambda: client.connected, 10, "connected")
        assert (client.publish("t/a", b"1", 1), client.publish("t/b", b"2", 1)) == (1, 2)
        assert (await client.published(1, 5), await client.published(2, 5)) == (False, True)
        assert client.publishes_refused == 1


async def test_a_suback_that_refuses_or_grants_qos_0_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Every subscription asks for QoS 1 (deliveries held until the journal has them). A broker may refuse one
    (0x80: those topics are not read) or grant QoS 0 (deliveries at most once): both are counted for the
    external broker's status, and logged. (Mosquitto refuses neither: with an ``acl_file`` it filters
    deliveries instead, and ``max_qos 0`` refuses the gateway's retained QoS 1 will at CONNECT. A raw broker
    says it.)"""
    caplog.set_level(logging.WARNING, logger="gateway.broker.mqtt_client")

    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _accept(writer)  # (RawBroker read the CONNECT)
        data = b""
        while len(data) < 4:  # the SUBSCRIBE's fixed header and packet id
            if not (more := await reader.read(4096)):
                return
            data += more
        assert data[0] == 0x82, data
        writer.write(b"\x90\x05" + data[2:4] + b"\x01\x00\x80")  # granted 1, granted 0, refused
        await writer.drain()

    async with _client_of(script, protocol="3.1.1", subscriptions=["a/#", "b/#", "c/#"]) as (_, client, _recorder):
        await until(lambda: client.subscribe_failures, 10, "the SUBACK")
        assert (client.subscribe_failures, client.subscriptions_at_qos0) == (1, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert any("refused 1 of the gateway's subscriptions" in line for line in lines), lines
    assert any("granted QoS 0 to 1 of the gateway's QoS 1 subscriptions" in line for line in lines), lines
