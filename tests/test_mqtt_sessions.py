"""MQTT 3.1.1 behaviour of the embedded broker, seen from independent clients (paho-mqtt with
MQTTv311, and raw sockets where a client must misbehave): persistent sessions queue and redeliver,
wills are published when they should be and only then, delivery QoS is min(publish, subscription),
per-client queues are bounded by a counted policy, and persistent sessions survive kill -9."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import GatewayProcess, wait_for
from mqttwire import GatewayThread, Paho, RawClient, RawPacket, connect, packet, puback, subscribe

from gateway.broker.sessions import _SCHEMA, Restored, SessionStore, _apply, _Op
from gateway.config import BrokerSettings, GatewayConfig, StorageSettings


def _config(tmp_path: Path, port: int, **broker: object) -> GatewayConfig:
    return GatewayConfig(site="s1", broker=BrokerSettings(port=port, allow_anonymous=True, **broker),
                         storage=StorageSettings(data_dir=tmp_path / "data"))


def test_offline_persistent_session_gets_qos1_and_qos2_on_reconnect(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port)):
        sub = Paho(port, "sub-offline", clean=False, subscribe=[("sess/offline", 2)])
        sub.close()
        pub = Paho(port, "pub-offline")
        sent = [(f"m{i}".encode(), qos) for i, qos in enumerate([1, 2, 0, 1, 2, 1, 0, 2])]
        for payload, qos in sent:
            pub.publish("sess/offline", payload, qos)
        pub.close()
        sub = Paho(port, "sub-offline", clean=False)
        expected = [(p, q) for p, q in sent if q]  # QoS 0 is not kept for an offline client
        wait_for(lambda: len(sub.received()) >= len(expected), 30, "the queued messages")
        assert sub.session_present is True
        got = [(m.payload, m.qos) for m in sub.received()]
        # paho hands a QoS 2 message over at PUBREL, a QoS 1 one at PUBLISH: compare per QoS.
        for qos in (1, 2):
            assert [m for m in got if m[1] == qos] == [m for m in expected if m[1] == qos]
        assert len(got) == len(expected)
        sub.close()
        # A clean session ends the persistent one: nothing is kept for it afterwards.
        clean = Paho(port, "sub-offline", clean=True)
        assert clean.session_present is False
        clean.close()


def test_unacknowledged_messages_are_redelivered_with_dup_in_order(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port)):
        sub = Paho(port, "sub-noack", clean=False, manual_ack=True, subscribe=[("sess/noack", 1)])
        pub = Paho(port, "pub-noack")
        for i in range(5):
            pub.publish("sess/noack", f"n{i}".encode(), 1)
        wait_for(lambda: len(sub.received()) == 5, 30, "first delivery")
        assert [m.dup for m in sub.received()] == [False] * 5
        sub.close()  # never acknowledged
        again = Paho(port, "sub-noack", clean=False)  # acknowledges automatically
        wait_for(lambda: len(again.received()) >= 5, 30, "redelivery")
        assert [(m.payload, m.dup, m.qos) for m in again.received()] == [(f"n{i}".encode(), True, 1) for i in range(5)]
        pub.publish("sess/noack", b"after", 1)
        wait_for(lambda: len(again.received()) == 6, 30, "a new message after the redelivery")
        again.close()
        third = Paho(port, "sub-noack", clean=False)
        pub.publish("sess/noack", b"last", 1)
        wait_for(lambda: len(third.received()) >= 1, 30, "the next message")
        assert [m.payload for m in third.received()] == [b"last"]  # acknowledged ones are not sent again
        third.close()
        pub.close()


def test_raw_client_sees_same_packet_ids_with_dup_after_reconnect(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port)):
        raw = RawClient(port)
        raw.send(connect("raw-noack", clean=False) + subscribe("sess/raw", 1))
        assert [p.type for p in (raw.read(), raw.read()) if p] == [2, 9]  # CONNACK, SUBACK
        pub = Paho(port, "pub-raw")
        for i in range(3):
            pub.publish("sess/raw", f"r{i}".encode(), 1)
        first = [raw.read() for _ in range(3)]
        raw.close()
        raw = RawClient(port)
        raw.send(connect("raw-noack", clean=False))
        connack = raw.read()
        assert connack is not None
        assert connack.body == b"\x01\x00"
        again = [raw.read() for _ in range(3)]
        assert all(p is not None for p in first + again)
        assert [p.first for p in first if p] == [0x32] * 3
        assert [p.first for p in again if p] == [0x3A] * 3  # PUBLISH, QoS 1, DUP
        assert [p.body for p in again if p] == [p.body for p in first if p]  # same topic, packet id, payload
        for p in again:
            assert p is not None
            raw.send(puback(int.from_bytes(p.body[2 + 8:2 + 8 + 2], "big")))
        raw.close()
        pub.close()


def _packet_id(p: RawPacket | None, topic_len: int = 0) -> int:
    """The packet id of a PUBLISH (after its topic) or of an acknowledgement."""
    assert p is not None
    offset = 2 + topic_len if p.type == 3 else 0
    return int.from_bytes(p.body[offset:offset + 2], "big")


def test_qos2_in_flight_resumes_where_it_stopped(tmp_path: Path, port: int) -> None:
    topic = "sess/qos2"
    with GatewayThread(_config(tmp_path, port)):
        raw = RawClient(port)
        raw.send(connect("raw-qos2", clean=False) + subscribe(topic, 2))
        assert [p.type for p in (raw.read(), raw.read()) if p] == [2, 9]
        pub = Paho(port, "pub-qos2")
        pub.publish(topic, b"one", 2)
        pub.publish(topic, b"two", 2)
        one, two = raw.read(), raw.read()
        assert one is not None
        assert two is not None
        assert (one.first, two.first) == (0x34, 0x34)  # PUBLISH QoS 2, no DUP
        raw.send(packet(0x50, _packet_id(one, len(topic)).to_bytes(2, "big")))  # PUBREC for the first only
        pubrel = raw.read()
        assert pubrel is not None
        assert (pubrel.first, _packet_id(pubrel)) == (0x62, _packet_id(one, len(topic)))
        raw.close()  # no PUBCOMP, no PUBREC for the second

        raw = RawClient(port)
        raw.send(connect("raw-qos2", clean=False))
        assert raw.read() is not None
        again_rel, again_two = raw.read(), raw.read()
        assert again_rel is not None
        assert again_two is not None
        # [MQTT-4.4.0-1]: the PUBREL again (not the PUBLISH), then the second PUBLISH with DUP, same ids.
        assert (again_rel.first, _packet_id(again_rel)) == (0x62, _packet_id(one, len(topic)))
        assert (again_two.first, again_two.body) == (0x3C, two.body)
        raw.send(packet(0x70, again_rel.body))  # PUBCOMP
        raw.send(packet(0x50, _packet_id(two, len(topic)).to_bytes(2, "big")))  # PUBREC
        rel_two = raw.read()
        assert rel_two is not None
        assert (rel_two.first, _packet_id(rel_two)) == (0x62, _packet_id(two, len(topic)))
        raw.send(packet(0x70, rel_two.body))
        raw.close()

        raw = RawClient(port)  # everything was completed: only new messages now
        raw.send(connect("raw-qos2", clean=False))
        assert raw.read() is not None
        pub.publish(topic, b"three", 2)
        three = raw.read()
        assert three is not None
        assert (three.first, three.body[2 + len(topic) + 2:]) == (0x34, b"three")
        raw.close()
        pub.close()


def test_unknown_pubrel_is_answered_with_pubcomp(tmp_path: Path, port: int) -> None:
    """A publisher's QoS 2 flow that began before a restart ends: its PUBREL gets a PUBCOMP."""
    with GatewayThread(_config(tmp_path, port)):
        raw = RawClient(port)
        raw.send(connect("raw-pubrel", clean=False) + packet(0x62, b"\x00\x2a"))
        assert raw.read() is not None  # CONNACK
        pubcomp = raw.read()
        assert pubcomp == RawPacket(0x70, b"\x00\x2a")
        raw.close()


def test_will_on_keepalive_expiry_and_on_dropped_connection_but_not_after_disconnect(
    tmp_path: Path, port: int
) -> None:
    with GatewayThread(_config(tmp_path, port)):
        watcher = Paho(port, "will-watcher", subscribe=[("will/#", 1)])
        silent = RawClient(port)
        started = time.monotonic()  # the broker's clock for this client starts later than this
        silent.send(connect("silent", keepalive=1, will=("will/silent", b"gone quiet", 1)))
        assert silent.read() is not None  # CONNACK; then nothing more from this client
        wait_for(lambda: any(m.topic == "will/silent" for m in watcher.received()), 30, "the keep-alive will")
        assert time.monotonic() - started >= 1.45  # not before one and a half keep-alive periods
        assert silent.closed_by_server()
        silent.close()

        polite = RawClient(port)
        polite.send(connect("polite", will=("will/polite", b"should not appear", 1)))
        assert polite.read() is not None
        polite.send(b"\xe0\x00")  # DISCONNECT
        assert polite.closed_by_server()
        polite.close()

        dropped = RawClient(port)
        dropped.send(connect("dropped", will=("will/dropped", b"connection lost", 1)))
        assert dropped.read() is not None
        dropped.close()  # no DISCONNECT
        wait_for(lambda: any(m.topic == "will/dropped" for m in watcher.received()), 30,
                 "the dropped connection's will")
        assert [(m.topic, m.payload) for m in watcher.received()] == [
            ("will/silent", b"gone quiet"), ("will/dropped", b"connection lost")]
        watcher.close()


def test_delivery_qos_is_minimum_of_publish_and_subscription(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port)):
        subs = {granted: Paho(port, f"sub-q{granted}", subscribe=[("qos/min", granted)]) for granted in (0, 1, 2)}
        assert {g: s.granted for g, s in subs.items()} == {0: [0], 1: [1], 2: [2]}
        pub = Paho(port, "pub-qos")
        for qos in (0, 1, 2):
            pub.publish("qos/min", str(qos).encode(), qos)
        for granted, sub in subs.items():
            wait_for(lambda s=sub: len(s.received()) == 3, 30, f"messages at subscription QoS {granted}")  # type: ignore[misc]
            on_wire = {int(m.payload): m.qos for m in sub.received()}
            assert on_wire == {p: min(p, granted) for p in (0, 1, 2)}, f"subscription QoS {granted}"
        # Subscribing again to the same filter replaces the subscription's QoS [MQTT-3.8.4-3].
        subs[0].subscribe([("qos/min", 2)])
        pub.publish("qos/min", b"2", 2)
        wait_for(lambda: len(subs[0].received()) == 4, 30, "the message after resubscribing")
        assert subs[0].received()[-1].qos == 2
        # Overlapping subscriptions of one client: one copy, at the highest granted QoS [MQTT-3.3.5-1].
        both = Paho(port, "sub-overlap", subscribe=[("qos/#", 0), ("qos/min", 1)])
        pub.publish("qos/min", b"2", 2)
        wait_for(lambda: len(subs[2].received()) == 5, 30, "the overlap message")
        wait_for(lambda: len(both.received()) >= 1, 30, "the overlap message")
        assert [(m.payload, m.qos) for m in both.received()] == [(b"2", 1)]
        for client in (*subs.values(), pub, both):
            client.close()


def test_retained_messages_go_to_a_new_subscription_only(tmp_path: Path, port: int) -> None:
    with GatewayThread(_config(tmp_path, port)):
        other = Paho(port, "ret-other", subscribe=[("ret/#", 1)])
        pub = Paho(port, "ret-pub")
        pub.publish("ret/a", b"kept", 1, retain=True)
        wait_for(lambda: len(other.received()) == 1, 30, "the live copy")
        assert other.received()[0].retain is False  # [MQTT-3.3.1-9]: a live delivery is not marked retained
        # amqtt sent a newly connected client the retained messages of every filter anyone subscribed to.
        newcomer = Paho(port, "ret-new", clean=False)
        newcomer.subscribe([("ret/a", 2)])
        wait_for(lambda: len(newcomer.received()) >= 1, 30, "the retained message")
        newcomer.close()
        assert [(m.payload, m.qos, m.retain) for m in newcomer.received()] == [(b"kept", 1, True)]
        # A persistent session reconnecting made no new subscription: no retained message again.
        back = Paho(port, "ret-new", clean=False)
        pub.publish("ret/a", b"live", 1)
        wait_for(lambda: len(back.received()) >= 1, 30, "the live message")
        assert [(m.payload, m.retain) for m in back.received()] == [(b"live", False)]
        for client in (other, pub, back):
            client.close()


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_new"])
def test_offline_queue_is_bounded_and_drops_are_counted(
    tmp_path: Path, port: int, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.broker.sessions")
    with GatewayThread(_config(tmp_path, port, max_queued_messages=5, queue_full=policy)) as gw:
        sub = Paho(port, "sub-bounded", clean=False, subscribe=[("bound/x", 1)])
        sub.close()
        pub = Paho(port, "pub-bounded")
        for i in range(12):
            pub.publish("bound/x", str(i).encode(), 1)
        sessions = gw.stats()["broker"]["sessions"]
        assert sessions["dropped"] == {"sub-bounded": 7}
        assert sessions["queued"] == 5
        sub = Paho(port, "sub-bounded", clean=False)
        wait_for(lambda: len(sub.received()) >= 5, 30, "the bounded queue")
        kept = range(7, 12) if policy == "drop_oldest" else range(5)
        assert [int(m.payload) for m in sub.received()] == list(kept)
        wait_for(lambda: gw.stats()["broker"]["sessions"]["queued"] == 0, 30, "the queue to empty")
        sub.close()
        pub.close()
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    room = [r for r in caplog.records if "room again" in r.getMessage()]
    assert len(full) == 1
    assert len(room) == 1


def test_persistent_sessions_survive_kill_9(tmp_path: Path, port: int, gateway_process: type[GatewayProcess]) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s1"\n[broker]\nport = {port}\nallow_anonymous = true\n'
                      f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    gw = gateway_process(["run", "--config", str(config)], port)
    sub = Paho(port, "sub-durable", clean=False, subscribe=[("durable/a", 1), ("durable/b", 2)])
    sub.close()
    pub = Paho(port, "pub-durable")
    sent = []
    for i in range(60):
        topic, qos = ("durable/a", 1) if i % 2 else ("durable/b", 2)
        pub.publish(topic, f"d{i}".encode(), qos)  # acknowledged: must survive
        sent.append((topic, f"d{i}".encode()))
    pub.close()
    gw.stop(signal.SIGKILL)
    gw = gateway_process(["run", "--config", str(config)], port)
    sub = Paho(port, "sub-durable", clean=False)
    wait_for(lambda: len(sub.received()) >= len(sent), 30, "the messages queued before kill -9")
    assert sub.session_present is True
    got = [(m.topic, m.payload) for m in sub.received()]
    for topic in ("durable/a", "durable/b"):  # each topic in order (paho hands QoS 2 over at PUBREL)
        assert [m for m in got if m[0] == topic] == [m for m in sent if m[0] == topic]
    assert len(got) == len(sent)
    # The subscriptions survived too: a new message after the restart reaches the client.
    pub = Paho(port, "pub-durable-2")
    pub.publish("durable/a", b"after restart", 1)
    wait_for(lambda: len(sub.received()) == len(sent) + 1, 30, "a message after the restart")
    sub.close()
    pub.close()
    gw.stop()


def test_a_message_delivered_within_one_commit_costs_no_write() -> None:
    conn = sqlite3.connect(":memory:")
    conn.executescript(_SCHEMA)
    _apply(conn, [[_Op("session", "c", number=1.0), _Op("subscribe", "c", text="a/#", qos=1)]])
    before = conn.total_changes
    _apply(conn, [[_Op("body", text="a/b", payload=b"x", number=1), _Op("message", "c", 1, qos=1, number=1),
                   _Op("sent", "c", 1, packet_id=7), _Op("done", "c", 1), _Op("unbody", number=1)],
                  [_Op("body", text="a/b", payload=b"y", number=2), _Op("message", "c", 2, qos=1, number=2),
                   _Op("sent", "c", 2, packet_id=8)]])
    assert conn.total_changes - before == 2  # only the message still in flight is written, with its body
    assert conn.execute("SELECT seq, packet_id FROM queued").fetchall() == [(2, 8)]
    assert conn.execute("SELECT id, payload FROM body").fetchall() == [(2, b"y")]
    _apply(conn, [[_Op("released", "c", 2), _Op("done", "c", 2), _Op("unbody", number=2), _Op("drop_session", "c")]])
    for table in ("queued", "body", "subscription", "session"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table  # noqa: S608


def test_sessions_files_of_the_previous_layout_are_migrated(tmp_path: Path) -> None:
    """Sessions stored before they had owners and shared bodies keep their messages; their owner is
    unknown until their client next logs in (it then claims them)."""
    path = tmp_path / "sessions.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE session (client_id TEXT PRIMARY KEY) WITHOUT ROWID;"
        "CREATE TABLE subscription (client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,"
        " PRIMARY KEY (client_id, filter)) WITHOUT ROWID;"
        "CREATE TABLE message (client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, packet_id INTEGER, released INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (client_id, seq)) WITHOUT ROWID;"
        "INSERT INTO session VALUES ('old');"
        "INSERT INTO subscription VALUES ('old', 'a/#', 1);"
        "INSERT INTO message VALUES ('old', 1, 'a/b', x'6869', 1, NULL, 0), ('old', 2, 'a/c', x'21', 2, 5, 1);")
    conn.commit()
    conn.close()

    async def load() -> Restored:
        store = SessionStore(path)
        try:
            return await store.open()
        finally:
            await store.close()

    restored = asyncio.run(load())
    old = restored.sessions["old"]
    assert (old.username, old.owner_known, old.subscriptions) == (None, False, {"a/#": 1})
    assert [(d.seq, d.body.topic, d.body.payload, d.qos, d.packet_id, d.released) for d in old.messages] == [
        (1, "a/b", b"hi", 1, None, False), (2, "a/c", b"!", 2, 5, True)]
