"""The packet firewall's reads (gateway/broker/firewall.py) and the gateway's packet decoder (gateway/
broker/packets.py), against a client that sends more than the broker takes: a burst is read a chunk at
a time, only while the gate lets packets through, so memory follows the bounds and not the client; a
flooding client does not starve another one."""

from __future__ import annotations

import asyncio
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from hypothesis import given
from hypothesis import strategies as st
from mqttwire import GatewayThread, PacketRecorder, Paho, RawClient, connect, packet, publish, pubrel, string, subscribe

from gateway.broker.firewall import CHUNK_BYTES, PacketFirewall, check_packet
from gateway.broker.packets import deliver
from gateway.config import BrokerSettings, GatewayConfig, StorageSettings


class _Flood:
    """A client that has sent ``data`` at once: every read gets as much of it as is asked for."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.taken = 0
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        chunk = self._data[self.taken:self.taken + n]
        self.taken += len(chunk)
        return chunk


def _firewall(source: _Flood, gate: Any, offences: list[str]) -> PacketFirewall:
    return PacketFirewall(source, lambda: None, max_packet_bytes=4096, connect_timeout_s=5, gate=gate,
                          offence=offences.append)


async def test_a_burst_is_read_a_chunk_at_a_time_and_not_while_the_gate_is_shut() -> None:
    one = publish("flood/a", b"x" * 100)
    source = _Flood(connect("flooder") + one * 50_000)  # ~5.6 MB sent at once
    shut = asyncio.Event()
    handed = 0

    async def gate() -> None:
        if handed >= 3:
            await shut.wait()  # the pipeline is full: never opens in this test

    offences: list[str] = []
    firewall = _firewall(source, gate, offences)
    for _ in range(3):
        assert await firewall.next_packet() is not None
        handed += 1
    waiting = asyncio.create_task(firewall.next_packet())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert source.reads == 1  # one chunk, not the whole flood
    assert source.taken <= CHUNK_BYTES
    waiting.cancel()
    firewall.close()
    assert offences == []


async def test_every_packet_of_a_burst_is_handed_over_in_order_after_the_gate() -> None:
    packets = [publish(f"t/{i}", str(i).encode(), qos=1, packet_id=i + 1) for i in range(5000)]
    source = _Flood(connect("c") + b"".join(packets))
    gates = 0

    async def gate() -> None:
        nonlocal gates
        gates += 1

    firewall = _firewall(source, gate, [])
    got = []
    while (p := await firewall.next_packet()) is not None:
        got.append(p)
    assert got[1:] == packets
    assert gates == len(got) + 1  # before each packet handed over, and before the end is told
    assert source.reads < len(packets) / 100  # bursts, not a read a packet


async def test_a_partial_packet_waits_for_its_rest_within_the_bounds() -> None:
    big = publish("t/big", b"y" * 4000)  # near max_packet_bytes
    data = connect("c") + big * 40
    offences: list[str] = []

    async def gate() -> None:
        return None

    class Trickle(_Flood):
        async def read(self, n: int) -> bytes:
            return await super().read(min(n, 777))  # never a whole packet at once

    firewall = _firewall(Trickle(data), gate, offences)
    got = [p async for p in _packets(firewall)]
    assert got[1:] == [big] * 40
    assert offences == []


async def _packets(firewall: PacketFirewall) -> Any:
    while (p := await firewall.next_packet()) is not None:
        yield p


@pytest.mark.parametrize(("data", "expected"), [
    (publish("a/b", b"x", qos=1, packet_id=7), ("publish", "a/b", b"x", 1, False, 7, False)),
    (packet(0x3D, string("é/ü") + b"\x01\x02" + b"p" * 300), ("publish", "é/ü", b"p" * 300, 2, True, 258, True)),
    (publish("a", b""), ("publish", "a", b"", 0, False, None, False)),
    (pubrel(65535), ("pubrel", 65535)),
    (packet(0x50, b"\x00\x09"), ("pubrec", 9)),
    (subscribe("s/+/#", 1, packet_id=3)[:-1] + b"\x01" + string("t") + b"\x02",
     ("subscribe", 3, [("s/+/#", 1), ("t", 2)])),
    (packet(0xA2, b"\x00\x04" + string("x") + string("y/#")), ("unsubscribe", 4, ["x", "y/#"])),
    (b"\xc0\x00", ("ping",)),
    (b"\xe0\x00", ("disconnect",)),
], ids=["publish-qos1", "publish-qos2-dup-retain-utf8-long", "publish-qos0-empty", "pubrel", "pubrec", "subscribe-two",
        "unsubscribe-two", "pingreq", "disconnect"])
def test_deliver_decodes_each_packet(data: bytes, expected: tuple[Any, ...]) -> None:
    header = 2 if data[1] < 0x80 else 3
    assert check_packet(data[0], data[header:], connected=True).reason is None
    sink = PacketRecorder()
    deliver(data, sink)
    assert sink.got == [expected]


@given(first=st.integers(0, 255), body=st.binary(max_size=300))
def test_deliver_never_raises_on_what_the_firewall_lets_through(first: int, body: bytes) -> None:
    if check_packet(first, body, connected=True).reason is None:
        deliver(packet(first, body), PacketRecorder())


# -- a flooding client, against the whole gateway ---------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Path, port: int) -> Iterator[GatewayThread]:
    broker = BrokerSettings(port=port, allow_anonymous=True)
    config = GatewayConfig(site="s1", broker=broker, storage=StorageSettings(data_dir=tmp_path / "data"))
    with GatewayThread(config) as gw:
        yield gw


def test_a_flooding_client_does_not_starve_another(gateway: GatewayThread) -> None:
    sub = Paho(gateway.port, "calm-sub", subscribe=[("calm/flow", 1)])
    pub = Paho(gateway.port, "calm-pub")
    raw = RawClient(gateway.port)
    stop = threading.Event()
    burst = publish("flood/x", b"z" * 200) * 2000  # ~420 kB a send

    def flood() -> None:
        while not stop.is_set():
            try:
                raw.sock.sendall(burst)
            except OSError:
                return

    flooder = threading.Thread(target=flood)
    try:
        raw.send(connect("flooder"))
        assert raw.read() is not None
        flooder.start()
        for i in range(20):
            pub.publish("calm/flow", str(i).encode(), 1)
        wait_for(lambda: len(sub.received()) >= 20, 30, "the calm client's messages while another floods")
        assert [int(m.payload) for m in sub.received()] == list(range(20))
    finally:
        stop.set()
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.close()
        if flooder.is_alive():
            flooder.join(10)
        pub.close()
        sub.close()


async def test_a_burst_of_small_packets_holds_about_its_bytes_not_an_object_each() -> None:
    """A 64 KiB read of 2-byte PINGREQs is not split at once into ~32,000 bytes objects (~1.4 MB held a
    connection): what a connection holds after a burst stays within a small multiple of the burst."""
    source = _Flood(connect("pinger") + b"\xc0\x00" * (CHUNK_BYTES // 2))
    shut = asyncio.Event()
    handed = 0

    async def gate() -> None:
        if handed >= 2:
            await shut.wait()

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        firewall = _firewall(source, gate, [])
        for _ in range(2):  # the CONNECT, then the first PINGREQ of the burst
            assert await firewall.next_packet() is not None
            handed += 1
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    firewall.close()
    assert source.reads == 1
    assert held < 4 * CHUNK_BYTES, held
