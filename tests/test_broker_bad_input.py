"""Malformed MQTT on the broker port, over raw sockets: each offending connection is closed and
counted by reason, and a paho client publishing and subscribing all along loses nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqttwire import GatewayThread, Paho, RawClient, connect, packet, publish, string

from gateway.broker.firewall import check_packet
from gateway.config import BrokerSettings, GatewayConfig, StorageSettings

MAX_PACKET = 2048
CONNECT = connect("bad-client")

# (id, bytes sent after a valid CONNECT, or before any when the id starts with "pre-", reason counted)
CASES = [
    ("remaining-length-5-bytes", b"\x30\xff\xff\xff\xff\x01", "bad_remaining_length"),
    ("invalid-utf8-topic", publish(b"a/\xff\xfe/b", b"x"), "invalid_utf8"),
    ("nul-in-topic", publish(b"a/\x00", b"x"), "invalid_utf8"),
    ("wildcard-plus-in-publish", publish("a/+/b", b"x"), "wildcard_topic"),
    ("wildcard-hash-in-publish", publish("a/#", b"x", qos=1), "wildcard_topic"),
    ("oversized-payload", publish("a/b", b"x" * (MAX_PACKET + 1)), "oversized"),
    ("oversized-declared-length", b"\x30\xff\xff\xff\x7f", "oversized"),
    ("topic-longer-than-packet", packet(0x30, b"\x00\x10ab"), "bad_length"),
    ("qos-3", packet(0x36, string("a/b") + b"\x00\x01x"), "bad_qos"),
    ("packet-id-0", publish("a/b", b"x", qos=1, packet_id=0), "bad_packet_id"),
    ("subscribe-without-filter", packet(0x82, b"\x00\x01"), "bad_length"),
    ("subscribe-bad-flags", packet(0x80, b"\x00\x01" + string("a") + b"\x00"), "bad_flags"),
    ("second-connect", CONNECT, "second_connect"),
    ("reserved-type", b"\xf0\x00", "reserved_type"),
    ("truncated-then-close", b"\x30\x20\x00\x03abc", "truncated"),
    ("pre-pingreq-before-connect", b"\xc0\x00", "before_connect"),
    ("pre-publish-before-connect", publish("a/b", b"x"), "before_connect"),
    ("pre-truncated-connect", CONNECT[:9], "truncated"),
    ("pre-connect-invalid-utf8-client-id", connect("x").replace(b"\x00\x01x", b"\x00\x01\xff"), "invalid_utf8"),
]


class Traffic:
    """A paho publisher and subscriber (QoS 1) running all through the test."""

    def __init__(self, port: int) -> None:
        self.sub = Paho(port, "good-sub", subscribe=[("good/flow", 1)])
        self.pub = Paho(port, "good-pub")
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pub.publish("good/flow", str(self.sent).encode(), 1)
            self.sent += 1
            self._stop.wait(0.005)

    def still_flowing(self) -> None:
        """Another message gets through now."""
        target = self.sent + 1
        wait_for(lambda: len(self.sub.received()) >= target, 30, "the good client's traffic")

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(30)
        wait_for(lambda: len(self.sub.received()) >= self.sent, 30, "every good message")
        assert [int(m.payload) for m in self.sub.received()] == list(range(self.sent))
        self.pub.close()
        self.sub.close()


@pytest.fixture
def gateway(tmp_path: Path, port: int) -> Iterator[GatewayThread]:
    broker = BrokerSettings(port=port, max_packet_bytes=MAX_PACKET, connect_timeout_s=5, allow_anonymous=True)
    config = GatewayConfig(site="s1", broker=broker, storage=StorageSettings(data_dir=tmp_path / "data"))
    with GatewayThread(config) as gw:
        yield gw


def _offend(port: int, case_id: str, data: bytes) -> bool:
    raw = RawClient(port)
    try:
        if not case_id.startswith("pre-"):
            raw.send(CONNECT)
            connack = raw.read()
            assert connack is not None, case_id
            assert connack.body == b"\x00\x00", case_id
        raw.send(data)
        if case_id.startswith(("truncated", "pre-truncated")):
            raw.sock.shutdown(2 - 1)  # SHUT_WR: the rest never comes
        return raw.closed_by_server()
    finally:
        raw.close()


def test_each_malformed_packet_closes_its_connection_and_is_counted(gateway: GatewayThread) -> None:
    traffic = Traffic(gateway.port)
    expected: dict[str, int] = {}
    for case_id, data, reason in CASES:
        assert _offend(gateway.port, case_id, data), f"{case_id}: connection left open"
        expected[reason] = expected.get(reason, 0) + 1
        offences = gateway.stats()["broker"]["offences"]
        assert offences == expected, case_id
        traffic.still_flowing()
    traffic.finish()


def test_silence_before_connect_is_closed(gateway: GatewayThread) -> None:
    raw = RawClient(gateway.port)
    try:
        assert raw.closed_by_server()
    finally:
        raw.close()
    assert gateway.stats()["broker"]["offences"] == {"connect_timeout": 1}


def test_random_bytes_never_hurt_other_clients(gateway: GatewayThread) -> None:
    traffic = Traffic(gateway.port)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.binary(min_size=1, max_size=300), after_connect=st.booleans())
    def offend(data: bytes, after_connect: bool) -> None:
        raw = RawClient(gateway.port)
        try:
            if after_connect:
                raw.send(CONNECT)
                assert raw.read() is not None
            raw.send(data)
            raw.sock.shutdown(1)  # whatever it was, it ends here: the server must close its side
            assert raw.closed_by_server()
        finally:
            raw.close()
        traffic.still_flowing()

    offend()
    traffic.finish()
    assert sum(gateway.stats()["broker"]["offences"].values()) > 0


@given(first=st.integers(0, 255), body=st.binary(max_size=200), connected=st.booleans())
def test_check_packet_never_raises(first: int, body: bytes, connected: bool) -> None:
    check = check_packet(first, body, connected=connected)
    assert check.packet_type == first >> 4


def test_packets_sent_together_are_taken_up_to_a_bad_one(gateway: GatewayThread) -> None:
    """The firewall reads what the socket has at once: good packets ahead of a bad one in the same
    send are handed over, then the connection closes for the bad one (PUBACKs still waiting for the
    journal go with it: the client sends those messages again)."""
    sub = Paho(gateway.port, "together-sub", subscribe=[("together/#", 1)])
    raw = RawClient(gateway.port)
    try:
        raw.send(CONNECT)
        assert raw.read() is not None
        good = b"".join(publish(f"together/{i}", str(i).encode(), qos=1, packet_id=i + 1) for i in range(20))
        raw.send(good + publish("a/+", b"x") + publish("together/late", b"never"))
        assert raw.closed_by_server()
    finally:
        raw.close()
    wait_for(lambda: len(sub.received()) >= 20, 30, "the good packets")
    assert sorted(int(m.payload) for m in sub.received()) == list(range(20))
    sub.close()
    assert gateway.stats()["broker"]["offences"] == {"wildcard_topic": 1}
