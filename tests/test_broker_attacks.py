"""Attacks on the embedded broker, each reproduced against a running gateway over real sockets
(issue 13): wills that skip the write ACL, client-id takeover, sessions that lose their owner on a
restart, WebSocket listeners without the packet firewall, stalled CONNECTs and connection floods,
subscription floods, ghost sessions, retained floods, QoS 2 state held only in memory, login floods.

Every bound these tests hit is a ``[broker]`` setting (gateway/config/broker.py) counted in
``broker.limits`` of the gateway's status."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GatewayProcess, wait_for
from mqttwire import (
    GatewayThread,
    Paho,
    RawClient,
    RawPacket,
    connect,
    packet,
    publish,
    pubrel,
    string,
    subscribe,
    varint,
)
from test_security import NOT_AUTHORIZED, Client, passwd_file

from gateway.broker.auth import hash_password
from gateway.config import GatewayConfig, parse_config

CONNACK, PUBACK, PUBREC, PUBCOMP, SUBACK = 2, 4, 5, 7, 9
IDENTIFIER_REJECTED, SERVER_UNAVAILABLE = 2, 3
USERS = {"alice": "a", "bwriter": "b", "mallory": "m", "meter": "mt"}


def _config(tmp_path: Path, port: int, **broker: Any) -> GatewayConfig:
    return parse_config({"site": "s1", "broker": {"port": port, **broker},
                         "storage": {"data_dir": str(tmp_path / "data")}})


def _secure(tmp_path: Path, port: int, acl: list[dict[str, str]] | None = None, **broker: Any) -> GatewayConfig:
    path = passwd_file(tmp_path / "passwd", USERS)
    rules = acl if acl is not None else [
        {"user": "alice", "topic": "#", "access": "readwrite"},
        {"user": "alice", "topic": "$SYS/#", "access": "readwrite"},
        {"user": "bwriter", "topic": "b/#", "access": "write"},
        {"user": "mallory", "topic": "#", "access": "readwrite"},
        {"topic": "telemetry/raw/+/+/+/%c/#", "access": "write"},
    ]
    return _config(tmp_path, port, password_file=str(path), acl=rules, **broker)


def _connack(raw: RawClient) -> tuple[int, int]:
    """(session present, return code) of the CONNACK; (-1, -1) when the server closed instead."""
    answer = raw.read()
    if answer is None:
        return -1, -1
    assert answer.type == CONNACK, answer
    return answer.body[0], answer.body[1]


def _raw_login(port: int, client_id: str, user: str, *, source: str | None = None, clean: bool = True,
               **kwargs: Any) -> tuple[RawClient, tuple[int, int]]:
    raw = RawClient(port, source=source)
    raw.send(connect(client_id, clean=clean, username=user, password=USERS[user], **kwargs))
    return raw, _connack(raw)


def _limits(gw: GatewayThread) -> dict[str, int]:
    limits: dict[str, int] = gw.stats()["broker"]["limits"]
    return limits


# -- 1. wills ----------------------------------------------------------------------------------------


def test_a_will_is_checked_against_the_write_acl(tmp_path: Path, port: int) -> None:
    """bwriter may write b/# only: a will on a/..., on another device's raw telemetry or on a $ topic
    is refused with the CONNECT, so it is never delivered, retained or stored."""
    foreign = "telemetry/raw/1.0/s1/meter/m-2/power"
    with GatewayThread(_secure(tmp_path, port)) as gw:
        alice = Client(port, "alice-1", username="alice", password="a")
        assert alice.subscribe([("a/#", 1), ("telemetry/#", 1), ("$SYS/#", 1), ("b/#", 1)]) == [1, 1, 1, 1]
        codes = []
        for topic in ("a/will", foreign, "$SYS/will"):
            raw, (_, rc) = _raw_login(port, "m-1", "bwriter", will=(topic, b'{"value": 666}', 1), will_retain=True)
            codes.append(rc)
            raw.close()  # no DISCONNECT: a will that was accepted would be published now
        own, (_, own_rc) = _raw_login(port, "m-1", "bwriter", will=("b/will", b"bye", 1))
        own.close()
        alice.wait_for("b/will")  # an allowed will still works, and everything before it has arrived
        later = Client(port, "alice-2", username="alice", password="a")
        later.subscribe([("a/#", 1), ("telemetry/#", 1)])
        time.sleep(0.5)  # retained messages would have been sent by now
        stats = gw.stats()
        alice.close()
        later.close()
    assert codes == [NOT_AUTHORIZED - 130] * 3  # CONNACK 5: not authorized
    assert own_rc == 0
    assert alice.topics() == ["b/will"]
    assert later.topics() == []
    assert stats["stages"].get("collect", {"in": 0})["in"] == 0  # nothing reached the pipeline as m-2's reading
    assert stats["journal"]["appended"] == 0
    assert stats["broker"]["security"]["denied"]["will"] == 3


def test_queued_and_retained_deliveries_are_checked_like_live_ones(tmp_path: Path, port: int) -> None:
    """The read check is the same for a live delivery, a message queued for an offline persistent
    session, and a retained message sent for a new subscription."""
    acl = [{"user": "alice", "topic": "d/secret/#", "access": "deny"},
           {"user": "alice", "topic": "d/#", "access": "read"}, {"user": "mallory", "topic": "d/#", "access": "write"}]
    with GatewayThread(_secure(tmp_path, port, acl=acl)) as gw:
        reader = Client(port, "reader", username="alice", password="a", clean=False)
        assert reader.subscribe([("d/#", 1)]) == [1]
        reader.close()
        writer = Client(port, "writer", username="mallory", password="m")
        for topic in ("d/secret", "d/open"):
            writer.publish(topic, b"queued", qos=1)
            writer.publish(f"{topic}/kept", b"retained", qos=1, retain=True)
        writer.close()
        reader = Client(port, "reader", username="alice", password="a", clean=False)
        queued = reader.wait_for("d/open/kept")
        assert reader.subscribe([("d/+/kept", 1)]) == [1]
        wait_for(lambda: len(reader.topics()) > len(queued), 30, "the retained message")
        time.sleep(0.3)  # a retained d/secret/kept would have come by now
        retained = reader.messages[len(queued):]
        reader.close()
        denied = gw.stats()["broker"]["security"]["denied"]["receive"]
    assert [t for t, _, _ in queued] == ["d/open", "d/open/kept"]
    assert retained == [("d/open/kept", b"retained", True)]
    assert denied >= 3  # d/secret and d/secret/kept queued, d/secret/kept retained


# -- 2. client-id takeover ------------------------------------------------------------------------------


def test_another_user_cannot_take_over_a_persistent_session(tmp_path: Path, port: int) -> None:
    with GatewayThread(_secure(tmp_path, port)) as gw:
        owner = Client(port, "dev-1", username="alice", password="a", clean=False)
        assert owner.subscribe([("t/#", 1)]) == [1]
        owner.close()
        publisher = Client(port, "pub", username="alice", password="a")
        publisher.publish("t/secret", b"for alice", qos=1)
        thief, (present, rc) = _raw_login(port, "dev-1", "mallory", clean=False)
        stolen = thief.read() if rc == 0 else None
        thief.close()
        back = Client(port, "dev-1", username="alice", password="a", clean=False)
        got = back.wait_for("t/secret")
        back.close()
        publisher.close()
        denied = gw.stats()["broker"]["security"]["denied"]
    assert (present, rc) == (0, IDENTIFIER_REJECTED)
    assert stolen is None
    assert got == [("t/secret", b"for alice", False)]
    assert denied["client_id"] == 1


def test_another_user_cannot_take_over_a_live_session(tmp_path: Path, port: int) -> None:
    with GatewayThread(_secure(tmp_path, port)):
        owner = Client(port, "dev-2", username="alice", password="a")
        assert owner.subscribe([("t/#", 1)]) == [1]
        thief, (_, rc) = _raw_login(port, "dev-2", "mallory")
        thief.close()
        publisher = Client(port, "pub", username="mallory", password="m")
        publisher.publish("t/after", b"1", qos=1)
        got = owner.wait_for("t/after")  # the owner is still connected, still subscribed
        owner.close()
        publisher.close()
    assert rc == IDENTIFIER_REJECTED
    assert got[-1][0] == "t/after"


def test_the_same_user_taking_over_disconnects_the_old_connection(tmp_path: Path, port: int) -> None:
    """[MQTT-3.1.4-2]: the server disconnects the existing client; what the old socket sends after that
    is neither acknowledged nor relayed."""
    with GatewayThread(_secure(tmp_path, port)):
        watcher = Client(port, "watch", username="alice", password="a")
        assert watcher.subscribe([("t/#", 1)]) == [1]
        old, (_, rc_old) = _raw_login(port, "dev-3", "alice")
        new, (_, rc_new) = _raw_login(port, "dev-3", "alice")
        with contextlib.suppress(OSError):  # already closed: as good
            old.send(publish("t/from-old", b"x", qos=1, packet_id=7))
        old.sock.settimeout(5)
        answers = []
        try:
            while (p := old.read()) is not None:
                answers.append(p)
        except (TimeoutError, ConnectionError):
            pass
        new.send(publish("t/from-new", b"y", qos=1, packet_id=8))
        assert new.read() == RawPacket(0x40, b"\x00\x08")
        got = watcher.wait_for("t/from-new")
        old.close()
        new.close()
        watcher.close()
    assert (rc_old, rc_new) == (0, 0)
    assert [p for p in answers if p.type == PUBACK] == []
    assert [t for t, _, _ in got] == ["t/from-new"]


# -- 3. restored sessions keep their identity -----------------------------------------------------------


def test_restored_sessions_keep_their_owner(tmp_path: Path, port: int) -> None:
    """After a restart, messages for an offline persistent session are checked against its owner's
    rights (not an anonymous client's), and only its owner may resume it."""
    acl = [{"user": "alice", "topic": "d/#", "access": "readwrite"}]
    config = _secure(tmp_path, port, acl=acl)
    with GatewayThread(config):
        sub = Client(port, "dash-1", username="alice", password="a", clean=False)
        assert sub.subscribe([("d/#", 1)]) == [1]
        sub.close()
    with GatewayThread(config):
        pub = Client(port, "pub", username="alice", password="a")
        pub.publish("d/x", b"while away", qos=1)
        pub.close()
        thief, (_, rc) = _raw_login(port, "dash-1", "mallory", clean=False)
        thief.close()
        sub = Client(port, "dash-1", username="alice", password="a", clean=False)
        got = sub.wait_for("d/x")
        sub.close()
    assert rc == IDENTIFIER_REJECTED
    assert got == [("d/x", b"while away", False)]


def test_an_anonymous_loopback_device_resumes_its_session_after_a_restart(tmp_path: Path, port: int) -> None:
    config = _config(tmp_path, port, allow_anonymous="loopback")
    with GatewayThread(config):
        device = Paho(port, "dev-9", clean=False, subscribe=[("cmd/dev-9", 1)])
        device.close()
    with GatewayThread(config):
        device = Paho(port, "dev-9", clean=False)  # was refused: the restored session had no address
        assert device.session_present is True
        Paho(port, "ops").publish("cmd/dev-9", b"reboot", 1)
        wait_for(lambda: len(device.received()) == 1, 30, "the command")
        device.close()


def test_a_session_created_anonymously_is_resumed_once_logins_are_required(tmp_path: Path, port: int) -> None:
    """Turning on a password file does not lock devices out of the sessions they made anonymously."""
    with GatewayThread(_config(tmp_path, port, allow_anonymous=True)):
        device = Client(port, "dev-7", clean=False)
        assert device.subscribe([("cmd/dev-7", 1)]) == [1]
        device.close()
    with GatewayThread(_secure(tmp_path, port)):
        raw, answer = _raw_login(port, "dev-7", "meter", clean=False)
        raw.close()
        thief, (_, rc) = _raw_login(port, "dev-7", "mallory", clean=False)  # now it is meter's
        thief.close()
    assert answer == (1, 0)
    assert rc == IDENTIFIER_REJECTED


# -- 4. WebSocket listeners go through the packet firewall ----------------------------------------------


@pytest.fixture
def ws_gateway(tmp_path: Path, port: int) -> Iterator[tuple[GatewayThread, int]]:
    ws_port = port + 1 if port < 65000 else port - 1
    config = _config(tmp_path, port, allow_anonymous=True, max_packet_bytes=2048, connect_timeout_s=1,
                     listeners=[{"type": "ws", "port": ws_port}])
    with GatewayThread(config) as gw:
        yield gw, ws_port


def _ws_offend(ws_port: int, frames: list[bytes], *, timeout: float = 10) -> bool:
    """Send ``frames`` (binary messages) over MQTT-over-WebSocket; True when the server closes."""
    from websockets.exceptions import ConnectionClosed  # noqa: PLC0415  (only these tests speak WebSocket)
    from websockets.sync.client import connect as ws_connect  # noqa: PLC0415

    with ws_connect(f"ws://127.0.0.1:{ws_port}", subprotocols=["mqtt"], open_timeout=10) as ws:  # type: ignore[list-item]
        try:
            for frame in frames:
                ws.send(frame)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ws.recv(timeout=deadline - time.monotonic())
        except TimeoutError:
            return False
        except ConnectionClosed:
            return True
    return False


def test_websocket_clients_go_through_the_packet_firewall(ws_gateway: tuple[GatewayThread, int]) -> None:
    gw, ws_port = ws_gateway
    watcher = Paho(gw.port, "ws-watch", subscribe=[("#", 0)])
    hello = connect("ws-bad")
    cases = {
        "oversized": [hello, publish("a/b", b"x" * 4096)],
        "invalid_utf8": [hello, publish(b"a/\x00", b"nul"), publish(b"a/\xff", b"bad")],
        "connect_timeout": [],  # never sends CONNECT
        "split_oversized": [hello, publish("a/c", b"y" * 4096)[:1000]],  # declared too big: closed on the header
    }
    closed = {name: _ws_offend(ws_port, frames) for name, frames in cases.items()}
    time.sleep(0.3)
    offences = gw.stats()["broker"]["offences"]
    watcher.close()
    assert closed == dict.fromkeys(cases, True)
    assert [m.topic for m in watcher.received()] == []  # nothing was relayed
    assert offences == {"oversized": 2, "invalid_utf8": 1, "connect_timeout": 1}


# -- 5. stalled CONNECTs and connection floods -----------------------------------------------------------


def test_a_connect_must_arrive_whole_within_the_deadline(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port, allow_anonymous=True, connect_timeout_s=1)) as gw:
        one_byte = RawClient(port, timeout=6)
        one_byte.send(b"\x10")
        big = 200_000
        most = RawClient(port, timeout=6)
        body = string("MQTT") + bytes([4, 2, 0, 60]) + string("x" * 100) + b"\0" * big
        most.send((b"\x10" + varint(len(body)) + body)[: big // 2])
        started = time.monotonic()
        closed = (one_byte.closed_by_server(), most.closed_by_server())
        elapsed = time.monotonic() - started
        offences = gw.stats()["broker"]["offences"]
        one_byte.close()
        most.close()
    assert closed == (True, True)
    assert elapsed < 5
    assert offences.get("connect_timeout") == 2


def test_connections_are_capped_in_total_and_per_address(tmp_path: Path, port: int) -> None:
    config = _config(tmp_path, port, allow_anonymous=True, max_connections=6, max_connections_per_address=4,
                     connect_timeout_s=30)
    with GatewayThread(config) as gw:
        mine = [RawClient(port, source="127.0.0.3", timeout=2) for _ in range(6)]
        refused_here = [raw.closed_by_server() for raw in mine]
        theirs = [RawClient(port, source="127.0.0.4", timeout=2) for _ in range(4)]
        refused_there = [raw.closed_by_server() for raw in theirs]
        limits = _limits(gw)
        for raw in mine + theirs:
            raw.close()
        # once they are gone, a client connects again
        wait_for(lambda: gw.stats()["broker"]["connections"] == 0, 30, "the connections to close")
        ok = Paho(port, "after-the-flood")
        ok.close()
    assert refused_here == [False] * 4 + [True] * 2  # per address: 4
    assert refused_there == [False] * 2 + [True] * 2  # in total: 6
    assert limits["connections_refused_per_address"] == 2
    assert limits["connections_refused"] == 2


# -- 6. subscription floods -----------------------------------------------------------------------------


class _CallCounter:
    """Function calls (Python and C) made on one thread while counting: a deterministic stand-in for the time a
    piece of work takes (the relay *rate* is a benchmark's business: bench/broker_filters.py)."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.counting = False
        self.calls = 0

    def __call__(self, frame: object, event: str, arg: object) -> None:
        if self.counting and event in ("call", "c_call") and threading.get_ident() == self.thread:
            self.calls += 1


def _relay_calls(port: int, sub: RawClient, topic: str, count: int, counter: _CallCounter) -> int:
    """The gateway thread's Python calls while ``count`` QoS 0 messages go from a publisher to ``sub``."""
    pub = RawClient(port)
    pub.send(connect(f"rate-pub-{topic}-{counter.calls}"))
    assert pub.read() is not None
    counter.calls, counter.counting = 0, True
    pub.send(b"".join(publish(topic, b"%d" % i) for i in range(count)))
    for _ in range(count):
        assert sub.read() is not None
    counter.counting = False
    pub.close()
    return counter.calls


def test_unrelated_filters_do_not_slow_delivery(tmp_path: Path, port: int) -> None:
    # 20,000 filters of another client that match nothing must not add work per message (a linear scan
    # of the filters would add thousands of calls a message). Counted, not timed.
    counter = _CallCounter()
    threading.setprofile(counter)  # for the threads started from here on: the gateway's
    try:
        with GatewayThread(_config(tmp_path, port, allow_anonymous=True, max_filters_per_client=20_000)) as gw:
            counter.thread = gw.thread_id
            sub = RawClient(port)
            sub.send(connect("rate-sub") + subscribe("rate/x", 0, packet_id=1))
            assert [p.type for p in (sub.read(), sub.read()) if p] == [CONNACK, SUBACK]
            _relay_calls(port, sub, "rate/x", 50, counter)  # the first messages of a topic teach the catalog
            before = _relay_calls(port, sub, "rate/x", 400, counter)
            flood = RawClient(port)
            flood.send(connect("flood"))
            assert flood.read() is not None
            for batch in range(20):  # 20,000 filters, none of them matching
                filters = b"".join(string(f"unrelated/{batch}/{i}/+") + b"\x00" for i in range(1000))
                flood.send(packet(0x82, (batch + 1).to_bytes(2, "big") + filters))
                suback = flood.read()
                assert suback is not None
                assert suback.type == SUBACK
            _relay_calls(port, sub, "rate/x", 50, counter)  # whatever the flood left to do is done by now
            after = _relay_calls(port, sub, "rate/x", 400, counter)
            sub.close()
            flood.close()
    finally:
        threading.setprofile(None)
    assert before > 400  # the counter saw the gateway's work
    assert after <= 3 * before, f"{after // 400} calls a message with 20,000 unrelated filters, {before // 400} without"


def test_filters_per_client_are_capped(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port, allow_anonymous=True, max_filters_per_client=3)) as gw:
        client = Paho(port, "greedy")
        client.subscribe([("a/1", 0), ("a/2", 1), ("a/3", 1), ("a/4", 1), ("a/1", 1)])
        granted = client.granted
        client.close()
        limits = _limits(gw)
    assert granted == [0, 1, 1, 0x80, 1]  # the fourth distinct filter is refused; a repeat replaces its QoS
    assert limits["filters_refused"] == 1


# -- 7. ghost sessions ----------------------------------------------------------------------------------


def test_ghost_sessions_are_bounded_and_expire(tmp_path: Path, port: int) -> None:
    """Persistent sessions nobody resumes: their number, the bytes they hold (memory and
    sessions.sqlite3) and their lifetime are bounded."""
    config = _config(tmp_path, port, allow_anonymous=True, max_persistent_sessions=20, session_expiry_s=3,
                     max_queued_bytes=100_000)
    with GatewayThread(config) as gw:
        refused = 0
        for i in range(25):
            raw = RawClient(port)
            raw.send(connect(f"ghost-{i}", clean=False) + subscribe("ghost/#", 1))
            if _connack(raw)[1] == SERVER_UNAVAILABLE:
                refused += 1
            else:
                assert raw.read() is not None  # SUBACK
            raw.close()
        pub = Paho(port, "ghost-pub")
        for i in range(100):
            pub.publish(f"ghost/{i}", b"x" * 2048, 1)
        pub.close()
        sessions = gw.stats()["broker"]["sessions"]
        size = sum(p.stat().st_size for p in (tmp_path / "data").glob("sessions.sqlite3*"))
        limits = _limits(gw)
        wait_for(lambda: gw.stats()["broker"]["sessions"]["persistent"] == 0, 20, "the sessions to expire")
        expired = _limits(gw)["sessions_expired"]
        fresh = RawClient(port)  # a new persistent session is taken again
        fresh.send(connect("ghost-new", clean=False))
        assert _connack(fresh) == (0, 0)
        fresh.close()
    assert refused == 5
    assert limits["sessions_refused"] == 5
    assert sessions["persistent"] == 20
    assert sessions["bytes"] <= 100_000
    assert limits["queued_bytes_evicted"] > 0
    assert size < 2_000_000, f"sessions.sqlite3 holds {size} bytes"
    assert expired == 20


# -- 8. retained messages -------------------------------------------------------------------------------


def test_retained_messages_are_bounded_and_survive_kill_9(
    tmp_path: Path, port: int, gateway_process: type[GatewayProcess]
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s1"\n[broker]\nport = {port}\nallow_anonymous = true\nmax_retained_messages = 5\n'
                      f'max_retained_bytes = 10000\n[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    gw = gateway_process(["run", "--config", str(config)], port)
    pub = Paho(port, "ret-pub")
    for i in range(8):
        pub.publish(f"ret/{i}", f"kept {i}".encode(), 1, retain=True)
    pub.publish("ret/big", b"x" * 20_000, 1, retain=True)  # more than the bytes bound on its own
    pub.publish("ret/0", b"replaced 0", 1, retain=True)  # replacing one that is kept is always possible
    pub.close()
    gw.stop(signal.SIGKILL)
    gw = gateway_process(["run", "--config", str(config)], port)
    sub = Paho(port, "ret-sub", subscribe=[("ret/#", 1)])
    wait_for(lambda: len(sub.received()) >= 5, 30, "the retained messages")
    time.sleep(0.5)
    got = sorted((m.topic, m.payload) for m in sub.received())
    sub.close()
    gw.stop()
    assert got == [("ret/0", b"replaced 0")] + [(f"ret/{i}", f"kept {i}".encode()) for i in range(1, 5)]


def test_retained_refusals_are_counted(tmp_path: Path, port: int) -> None:
    config = _config(tmp_path, port, allow_anonymous=True, max_retained_messages=2, max_retained_bytes=10_000)
    with GatewayThread(config) as gw:
        pub = Paho(port, "ret-pub")
        for i in range(4):
            pub.publish(f"r/{i}", b"v", 1, retain=True)
        pub.publish("r/0", b"", 1, retain=True)  # clears one: room for another
        pub.publish("r/9", b"v", 1, retain=True)
        pub.close()
        broker = gw.stats()["broker"]
    assert broker["retained"] == {"messages": 2, "bytes": 2 * len("r/x") + 2}
    assert broker["limits"]["retained_refused"] == 2


# -- 9. QoS 2 ------------------------------------------------------------------------------------------


def test_a_qos2_message_answered_with_pubrec_survives_kill_9(
    tmp_path: Path, port: int, gateway_process: type[GatewayProcess]
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s1"\n[broker]\nport = {port}\nallow_anonymous = true\n'
                      f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    gw = gateway_process(["run", "--config", str(config)], port)
    sub = Paho(port, "q2-sub", clean=False, subscribe=[("q2/#", 2)])
    sub.close()
    raw = RawClient(port)
    raw.send(connect("q2-pub", clean=False) + publish("q2/x", b"exactly once", qos=2, packet_id=5))
    assert _connack(raw) == (0, 0)
    assert raw.read() == RawPacket(0x50, b"\x00\x05")  # PUBREC: the broker owns the message now
    gw.stop(signal.SIGKILL)
    raw.close()
    gw = gateway_process(["run", "--config", str(config)], port)
    raw = RawClient(port)
    raw.send(connect("q2-pub", clean=False) + publish("q2/x", b"exactly once", qos=2, packet_id=5) + pubrel(5))
    assert _connack(raw) == (1, 0)
    answers = [raw.read(), raw.read()]
    raw.close()
    sub = Paho(port, "q2-sub", clean=False)
    wait_for(lambda: len(sub.received()) >= 1, 30, "the QoS 2 message")
    time.sleep(1)
    got = [(m.topic, m.payload) for m in sub.received()]
    sub.close()
    gw.stop()
    # the PUBLISH sent again (DUP or not) is recognised: PUBREC again, then PUBCOMP; delivered once
    assert answers == [RawPacket(0x50, b"\x00\x05"), RawPacket(0x70, b"\x00\x05")]
    assert got == [("q2/x", b"exactly once")]


def test_a_reconnecting_qos2_publisher_is_read_at_once(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port, allow_anonymous=True)):
        raw = RawClient(port)
        raw.send(connect("q2-slow", clean=False) + publish("q2/a", b"1", qos=2, packet_id=9))
        assert _connack(raw) == (0, 0)
        assert raw.read() == RawPacket(0x50, b"\x00\x09")
        raw.close()  # no PUBREL yet
        raw = RawClient(port)
        started = time.monotonic()
        raw.send(connect("q2-slow", clean=False) + publish("q2/b", b"2", qos=1, packet_id=10))
        assert _connack(raw) == (1, 0)
        answers = [raw.read()]
        elapsed = time.monotonic() - started
        raw.send(pubrel(9))
        answers.append(raw.read())
        raw.close()
    assert answers == [RawPacket(0x40, b"\x00\x0a"), RawPacket(0x70, b"\x00\x09")]
    assert elapsed < 2, f"the PUBACK took {elapsed:.1f} s"


# -- 11. login floods ------------------------------------------------------------------------------------


def test_a_login_flood_from_one_address_does_not_delay_other_logins(tmp_path: Path, port: int) -> None:
    iterations = 400_000  # about 0.3 s a hash here; a Pi's core takes that long at the default 50,000
    started = time.perf_counter()
    hash_password("probe", iterations=iterations)
    one_hash = time.perf_counter() - started
    path = tmp_path / "passwd"
    path.write_text(f"alice:{hash_password('a', iterations=iterations)}\n")
    config = _config(tmp_path, port, password_file=str(path))
    with GatewayThread(config) as gw:
        flood = []
        for i in range(40):
            raw = RawClient(port, source="127.0.0.2")
            raw.send(connect(f"bogus-{i}", username="alice", password=f"guess-{i}"))
            flood.append(raw)
        time.sleep(0.2)  # the flood is queued first
        started = time.perf_counter()
        alice = Client(port, "alice-real", username="alice", password="a")
        waited = time.perf_counter() - started
        alice.close()
        answers = [_connack(raw)[1] for raw in flood]
        for raw in flood:
            raw.close()
        limits = _limits(gw)
    assert alice.accepted
    # behind the flood's two hashes at most (and its own), not behind forty
    assert waited < 5 * one_hash + 0.5, f"a real login waited {waited:.1f} s (one hash: {one_hash:.2f} s)"
    assert set(answers) <= {NOT_AUTHORIZED - 130, SERVER_UNAVAILABLE}
    assert limits["logins_throttled"] >= 30


# -- 12. smaller ---------------------------------------------------------------------------------------


def test_databases_are_not_readable_by_others(tmp_path: Path, port: int) -> None:
    import os  # noqa: PLC0415

    old = os.umask(0o022)
    try:
        with GatewayThread(_config(tmp_path, port, allow_anonymous=True)):
            pass
    finally:
        os.umask(old)
    for name in ("journal.sqlite3", "sessions.sqlite3"):
        mode = (tmp_path / "data" / name).stat().st_mode & 0o777
        assert mode & 0o007 == 0, f"{name} is {mode:o}"


@pytest.mark.parametrize("token", ["x", "       ", "short", "a token with spaces in it"])
def test_a_weak_http_token_is_a_config_error(token: str) -> None:
    from gateway.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError) as caught:
        parse_config({"http": {"enabled": True, "host": "0.0.0.0", "token": token}})  # noqa: S104
    assert caught.value.problems == ["http: the bearer token (token, token_file or token_env) must be 16 characters "
                                     "or more, without spaces (`openssl rand -hex 16` makes one)"]


def test_tokens_from_files_and_bindkeys_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.ops.logs import secret_values  # noqa: PLC0415

    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789\n")
    monkeypatch.setenv("IOTGW_TEST_TOKEN", "env-token-0123456789")
    bindkey = "231d39c1d7cc1ab1aee224cd096db932"
    by_file = parse_config({"http": {"enabled": True, "host": "0.0.0.0", "token_file": str(token_file)},  # noqa: S104
                            "devices": [{"id": "b-1", "transport": "ble", "protocol": "bthome",
                                         "address": "AA:BB:CC:DD:EE:FF", "bindkey": bindkey}]})
    by_env = parse_config({"http": {"enabled": True, "host": "0.0.0.0", "token_env": "IOTGW_TEST_TOKEN"}})  # noqa: S104
    assert {"file-token-0123456789", bindkey} <= set(secret_values(by_file))
    assert "env-token-0123456789" in secret_values(by_env)



# -- a client that never reads what it is answered ---------------------------------------------------------


def test_a_client_that_never_reads_its_pingresps_is_bounded_then_closed(tmp_path: Path, port: int) -> None:
    """PINGRESPs (and PUBACKs) are written without waiting: a client sending PINGREQs and never reading
    grew the broker's write buffer without limit. Its next packet is now read only once the buffer is
    below max_write_buffer_bytes, and it is closed (write_stalled) when it stays above."""
    bound = 4096
    config = _config(tmp_path, port, allow_anonymous=True, max_write_buffer_bytes=bound, write_stall_timeout_s=2)
    with GatewayThread(config) as gw:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
        sock.settimeout(30)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(connect("pinger"))
        assert sock.recv(4)[:1] == b"\x20"  # CONNACK; nothing more is ever read
        burst = b"\xc0\x00" * 8192
        ended = threading.Event()

        def flood() -> None:
            with contextlib.suppress(OSError):
                while True:
                    sock.sendall(burst)
            ended.set()

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        core: Any = gw._gateway.broker._core  # type: ignore[union-attr]
        peak = 0
        deadline = time.monotonic() + 60
        while not ended.is_set() and time.monotonic() < deadline:
            conn = core.connections.get("pinger")
            if conn is not None:
                peak = max(peak, conn.transport.buffered())
            time.sleep(0.005)
        offences = gw.stats()["broker"]["offences"]
        calm = Paho(gw.port, "calm-sub", subscribe=[("calm/flow", 1)])
        pub = Paho(gw.port, "calm-pub")
        pub.publish("calm/flow", b"still", 1)
        wait_for(lambda: len(calm.received()) >= 1, 20, "another client's message")
        pub.close()
        calm.close()
        sock.close()
    assert ended.is_set()  # the broker closed it
    assert offences.get("write_stalled") == 1
    assert 0 < peak <= bound + 64
