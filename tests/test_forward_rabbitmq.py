"""Forwarding to RabbitMQ: Debian's rabbitmq-server, a node of its own per test on free loopback ports.

The routing-key mapping is checked against the broker itself (queues bound with the mapped filters
receive exactly, or for the broader bindings at least, what the filters match); the gateway runs
in-process (outage, downlink) or as ``iotgw run`` killed with SIGKILL, with MQTT devices publishing
over TCP, and what the broker holds is read back from a durable queue.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import aiormq
import pytest
from conftest import until, wait_for
from gatewayproc import RAW, Device, RunningGateway, crash_config, crash_load, kill_9_under_load
from hypothesis import given
from hypothesis import strategies as st
from peers import (
    AmqpMessage,
    MqttCollector,
    RabbitMq,
    amqp_messages,
    amqp_publish,
    free_port,
    mqtt_publish,
    rabbitmq_fixture,  # noqa: F401  (pytest fixture)
)
from test_forward import _dest, _valid_seqs, devices, gateway_config  # noqa: F401  (a fixture)

from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.forward.base import OutboundEvent
from gateway.forward.rabbitmq.destination import RabbitDestination, RabbitSettings, message_properties
from gateway.forward.rabbitmq.routing import binding_key, routing_key_to_topic, topic_to_routing_key
from pipeline.errors import TopicError
from pipeline.topics import compile_filter

# -- the mapping, without a broker ---------------------------------------------------------------


@pytest.mark.parametrize(("topic", "key"), [
    ("telemetry/valid/1.0/site-a/air/co2-1/co2", "telemetry.valid.1%2E0.site-a.air.co2-1.co2"),
    ("cmd/s1/valve-1/open", "cmd.s1.valve-1.open"),
    ("a/b*c/100%", "a.b%2Ac.100%25"),
    ("alert/raised/x/", "alert.raised.x."),  # an empty level is an empty word
    ("/lead", ".lead"),
], ids=["taxonomy", "command", "star-and-percent", "empty-last-level", "empty-first-level"])
def test_topics_become_routing_keys_and_back(topic: str, key: str) -> None:
    assert topic_to_routing_key(topic) == key
    assert routing_key_to_topic(key) == topic


@given(st.lists(st.text(st.characters(exclude_characters="/+#\0", exclude_categories=["Cs"]), max_size=8),
                min_size=1, max_size=6))
def test_every_topic_maps_to_a_key_that_maps_back(levels: list[str]) -> None:
    topic = "/".join(levels)
    if topic == "" or any(level in ("*", ">") for level in levels) or len(topic.encode()) > 60:
        return
    assert routing_key_to_topic(topic_to_routing_key(topic)) == topic


def test_a_routing_key_longer_than_255_bytes_is_refused() -> None:
    with pytest.raises(TopicError, match="255 bytes"):
        topic_to_routing_key("telemetry/" + "x" * 250)


@pytest.mark.parametrize(("pattern", "key", "exact"), [
    ("telemetry/valid/+/s1/#", "telemetry.valid.*.s1.#", True),
    ("cmd/s1/#", "cmd.s1.#", True),
    ("#", "#", False),  # MQTT's '#' skips $ topics; AMQP's does not
    ("+/valid/x", "*.valid.x", False),
    ("telemetry/valid/>", "telemetry.valid.*.#", True),
    ("telemetry/*/1.0/x", "telemetry.*.1%2E0.x", False),  # smf '*' needs a non-empty level
    ("telemetry/val*/x", "telemetry.*.x", False),  # no prefix wildcard in AMQP
], ids=["mqtt-plus-hash", "mqtt-parent", "mqtt-hash-alone", "mqtt-leading-plus", "smf-gt", "smf-star",
        "smf-prefix"])
def test_filters_become_binding_keys(pattern: str, key: str, exact: bool) -> None:
    syntax: Literal["auto", "smf"] = "smf" if pattern.endswith("/val*/x") else "auto"
    binding = binding_key(compile_filter(pattern, syntax))
    assert (binding.key, binding.exact) == (key, exact)


def test_message_properties_carry_the_cloudevent() -> None:
    event = OutboundEvent(7, "01JABC", "telemetry/valid/1.0/s/c/d/m", "d", json.dumps({
        "specversion": "1.0", "id": "01JABC", "source": "/iotgw/s/d", "type": "io.iotgw.telemetry.reading.v1",
        "subject": "telemetry/valid/1.0/s/c/d/m", "time": "2026-11-28T07:00:00.250Z", "data": {"value": 1},
    }).encode(), 1_700_000_000_000)
    props = message_properties(event, "gw-a")
    assert props.message_id == "01JABC"
    assert props.delivery_mode == 2
    assert props.content_type == "application/cloudevents+json"
    assert props.message_type == "io.iotgw.telemetry.reading.v1"
    assert props.timestamp is not None
    assert props.timestamp.isoformat().startswith("2026-11-28T07:00:00")
    assert props.headers == {
        "cloudEvents:specversion": "1.0", "cloudEvents:source": "/iotgw/s/d",
        "cloudEvents:subject": "telemetry/valid/1.0/s/c/d/m", "iotgw-gateway": "gw-a",
    }
    plain = message_properties(OutboundEvent(8, "01JABD", "x/y", "", b"\x00\x01", 1_700_000_000_000), "gw-a")
    assert (plain.content_type, plain.message_id, plain.headers) == (
        "application/octet-stream", "01JABD", {"iotgw-gateway": "gw-a"})


@pytest.mark.parametrize(("extra", "problem"), [
    ({"url": "http://rabbit:5672/"}, "amqp:// or amqps://"),
    ({"exchange": "bad name"}, "exchange"),
    ({"password": "p", "password_env": "NOPE_NOT_SET"}, "password"),
], ids=["scheme", "exchange-name", "two-passwords"])
def test_settings_refuse_what_cannot_work(extra: dict[str, Any], problem: str) -> None:
    forward = {"name": "amq", "type": "rabbitmq", "url": "amqp://rabbit:5672/", "topics": ["telemetry/#"], **extra}
    with pytest.raises(ConfigError, match=problem):
        parse_config({"forward": [forward]})


# -- against the broker ---------------------------------------------------------------------------

PROBES = [
    "telemetry/valid/1.0/s1/air/co2-1/co2", "telemetry/valid/2.0/s2/air/co2-1/co2", "telemetry/valid",
    "telemetry/raw/1.0/s1/air/co2-1/co2", "telemetry/valid/1.0/s1/air/co2-1/co2/extra", "cmd/s1",
    "cmd/s1/valve-1/open", "cmd/s2/valve-1/open", "telemetry//1.0/x", "telemetry/value/1.0/x", "a/b/c",
    "$SYS/broker/load", "telemetry/valid/1.0/x",
]
FILTERS = ["telemetry/valid/+/s1/#", "cmd/s1/#", "#", "telemetry/valid/>", "telemetry/*/1.0/x", "+/b/c",
           "telemetry/+/1.0/x", "cmd/+"]


async def test_bindings_route_what_the_filters_match(rabbitmq: RabbitMq) -> None:
    """Each filter's binding on a real topic exchange: exact bindings deliver exactly the topics the
    filter matches; broader ones a superset (the consumer checks against the filter)."""
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.exchange_declare("probe", exchange_type="topic", durable=True)
        for i, pattern in enumerate(FILTERS):
            await channel.queue_declare(f"f{i}", durable=True)
            await channel.queue_bind(f"f{i}", "probe", routing_key=binding_key(compile_filter(pattern)).key)
    await amqp_publish(rabbitmq.url, "probe", [(topic_to_routing_key(t), t.encode()) for t in PROBES])
    for i, pattern in enumerate(FILTERS):
        f = compile_filter(pattern)
        routed = {m.body.decode() for m in await amqp_messages(rabbitmq.url, f"f{i}")}
        matched = {t for t in PROBES if f.matches(t)}
        if binding_key(f).exact:
            assert routed == matched, pattern
        else:
            assert routed >= matched, pattern


def _event(i: int, device: str = "d-1") -> OutboundEvent:
    body = {"specversion": "1.0", "id": f"01J{i:023d}", "source": f"/iotgw/s/{device}", "type": "t.v1",
            "data": {"device_id": device, "seq": i}}
    return OutboundEvent(i, f"01J{i:023d}", f"telemetry/valid/1.0/s/c/{device}/m", device,
                         json.dumps(body).encode(), 1_700_000_000_000)


async def _connected(destination: RabbitDestination) -> RabbitDestination:
    await destination.start()
    await until(lambda: destination.connected, 20, "connect")
    return destination


async def test_what_the_broker_confirmed_is_never_published_again(rabbitmq: RabbitMq) -> None:
    """The ledger: a second gateway process (a new destination) sending the same events, as after a
    kill -9 before the outbox recorded the confirmations, publishes none of them again."""
    def settings() -> RabbitSettings:
        return RabbitSettings(url=rabbitmq.url, gateway_id="gw", queue="events", topics=("telemetry/#",),
                              own_prefix="iotgw.gw.central", dedupe_window=100)
    events = [_event(i) for i in range(1, 31)]
    first = await _connected(RabbitDestination("central", settings()))
    try:
        assert await first.send(events[:20]) == 20
        assert await first.send(events[10:20]) == 10  # resent in the same process
        assert first.duplicates == 10
    finally:
        await first.close()
    second = await _connected(RabbitDestination("central", settings()))
    try:
        assert await second.send(events) == 30
        assert (second.duplicates, second.sent) == (20, 10)
    finally:
        await second.close()
    stored = await amqp_messages(rabbitmq.url, "events")
    assert [m.message_id for m in stored] == [e.event_id for e in events]
    assert len(await amqp_messages(rabbitmq.url, "iotgw.gw.central.sent")) == 30


def _sized(i: int, size: int) -> OutboundEvent:
    event = _event(i)
    pad = size - len(event.payload)
    body = json.loads(event.payload)
    body["data"]["pad"] = "p" * (pad - len(', "pad": ""'))
    payload = json.dumps(body).encode()
    assert len(payload) == size
    return OutboundEvent(event.seq, event.event_id, event.topic, event.key, payload, event.created_ms)


async def test_an_event_nacked_before_a_confirmed_one_keeps_the_order(rabbitmq: RabbitMq) -> None:
    """A queue with x-overflow = reject-publish nacks A2 (no room for its bytes) and confirms A3 after it.
    Only the confirmed prefix counts as the broker's: A3 is published again after A2, and a consumer
    that keeps the last copy of each event id sees the outbox order (A3 alone, remembered from its own
    confirm, left the queue with A3 before A2)."""
    settings = RabbitSettings(url=rabbitmq.url, gateway_id="gw", own_prefix="iotgw.gw.order", dedupe_window=100)
    a1, a2, a3 = _sized(1, 400), _sized(2, 400), _sized(3, 170)
    destination = await _connected(RabbitDestination("order", settings))
    try:
        async with aiormq.connect(rabbitmq.url) as connection:
            channel = await connection.channel()
            await channel.queue_declare("limited", durable=True, arguments={
                "x-max-length-bytes": 600, "x-overflow": "reject-publish"})
            await channel.queue_bind("limited", settings.exchange, routing_key="telemetry.#")
        assert await destination.send([a1, a2, a3]) == 1  # A2 nacked, A3 confirmed
        stored = await amqp_messages(rabbitmq.url, "limited")  # the consumer takes them: room again
        assert await destination.send([a2, a3]) == 2
        stored += await amqp_messages(rabbitmq.url, "limited")
    finally:
        await destination.close()
    ids = [m.message_id for m in stored]
    last = sorted(set(ids), key=lambda i: max(n for n, x in enumerate(ids) if x == i))
    assert last == [a1.event_id, a2.event_id, a3.event_id], ids


async def test_the_ledger_keeps_only_the_newest_ids(rabbitmq: RabbitMq) -> None:
    def settings() -> RabbitSettings:
        return RabbitSettings(url=rabbitmq.url, gateway_id="gw", own_prefix="iotgw.gw.small", dedupe_window=5)
    first = await _connected(RabbitDestination("small", settings()))
    try:
        assert await first.send([_event(i) for i in range(1, 11)]) == 10
    finally:
        await first.close()
    second = await _connected(RabbitDestination("small", settings()))
    try:
        assert await second.send([_event(i) for i in range(1, 11)]) == 10
        assert second.duplicates == 5  # events 6..10: the ledger's five newest
    finally:
        await second.close()


def _by_device(stored: list[AmqpMessage]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in stored:
        data = json.loads(m.body)["data"]
        seqs[data["device_id"]].append(data["seq"])
    return seqs


def _assert_once_in_order(stored: list[AmqpMessage], acked: dict[str, list[int]], *, device_order: bool = True
                          ) -> None:
    """Each event once, every acknowledged reading there, each device's events in the order the gateway
    accepted them (their time-sorted ids), which is the device's own order unless a crash made the
    device resend (``device_order=False``: then paho resends what was in flight after newer ones)."""
    ids = [m.message_id for m in stored]
    assert len(ids) == len(set(ids)), f"a message_id twice: {[i for i in ids if ids.count(i) > 1][:5]}"
    seqs = _by_device(stored)
    for device, want in acked.items():
        got = seqs[device]
        device_ids = [m.message_id or "" for m in stored if json.loads(m.body)["data"]["device_id"] == device]
        assert device_ids == sorted(device_ids), f"{device}: not in the order the gateway accepted them"
        if device_order:
            assert got == sorted(got), f"{device}: out of order"
        missing = sorted(set(want) - set(got))
        assert not missing, f"{device}: {len(missing)} acknowledged readings missing: {missing[:10]}"
        assert len(got) == len(set(got)), f"{device}: a reading twice"


async def test_outage_loses_nothing_keeps_order_and_publishes_each_event_once(
    tmp_path: Path, rabbitmq: RabbitMq, devices: list[Device]  # noqa: F811  (the fixture)
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "amq", "type": "rabbitmq", "url": rabbitmq.url, "topics": ["telemetry/valid/>"], "queue": "events",
    }])
    async with Gateway(config) as gw:
        def amq() -> dict[str, Any]:
            return _dest(gw, "amq")
        await until(lambda: amq()["connected"], 30, "connect")
        devices += [Device(gw.broker.port, f"r-{i}", rate_hz=20).start() for i in (1, 2)]
        await asyncio.sleep(3)
        await asyncio.to_thread(rabbitmq.stop)
        await asyncio.sleep(12)
        during = amq()
        assert not during["connected"]
        assert during["depth"] > 200  # about 40 events/s queued while the broker is away
        await asyncio.to_thread(rabbitmq.restart)
        await asyncio.sleep(3)
        for device in devices:
            device.stop()
        await until(lambda: amq()["depth"] == 0, 60, "the outbox to drain")
    stored = await amqp_messages(rabbitmq.url, "events")
    assert {m.routing_key.split(".")[1] for m in stored} == {"valid"}
    assert all(m.content_type == "application/cloudevents+json" for m in stored)
    assert all(m.message_id == json.loads(m.body)["id"] for m in stored)
    _assert_once_in_order(stored, {d.device_id: d.acked() for d in devices})
    assert len(_valid_seqs([m.body for m in stored], "r-1")) > 300


def test_kill_9_of_the_gateway_twice_loses_nothing_and_publishes_each_event_once(
    tmp_path: Path, rabbitmq: RabbitMq
) -> None:
    port = free_port()
    config = crash_config(tmp_path / "gw.toml", port, f'name = "amq"\ntype = "rabbitmq"\nurl = "{rabbitmq.url}"\n'
                                                     'topics = ["telemetry/valid/#"]\nqueue = "events"\n')
    gateway = RunningGateway(config, mqtt_port=port)
    load: list[Device] = []
    stored: list[AmqpMessage] = []
    try:
        load += crash_load(port)
        acked = kill_9_under_load(gateway, load, kills=2, run_s=3, away_s=0.5, settle_s=3, resend_s=3)
        assert sum(len(a) for a in acked.values()) > 500

        def delivered() -> bool:
            stored.extend(asyncio.run(amqp_messages(rabbitmq.url, "events")))
            seqs = _by_device(stored)
            return all(set(acked[d]) <= set(seqs[d]) for d in acked)

        wait_for(delivered, 90, interval=0.5, fail=False)
    finally:
        for d in load:
            d.close()
        gateway.stop(30)
    _assert_once_in_order(stored, acked, device_order=False)


async def test_downlink_commands_come_from_a_durable_queue(tmp_path: Path, rabbitmq: RabbitMq) -> None:
    config = gateway_config(tmp_path, [{
        "name": "amq", "type": "rabbitmq", "url": rabbitmq.url, "topics": ["cmdack/#"], "queue": "acks",
        "subscribe": ["cmd/s1/#"],
    }])
    async with Gateway(config) as gw:
        await until(lambda: _dest(gw, "amq")["connected"], 30, "connect")
        device = await asyncio.to_thread(
            MqttCollector, f"mqtt://127.0.0.1:{gw.broker.port}", ["cmd/s1/valve-1/#"], client_id="valve-1")
        try:
            await amqp_publish(rabbitmq.url, "iotgw", [
                (topic_to_routing_key("cmd/s1/valve-1/open"), b'{"percent": 40}'),
                (topic_to_routing_key("cmd/s2/valve-1/open"), b'{"percent": 99}'),  # another site's
            ])
            got = await asyncio.to_thread(device.wait_for, 1, 10)
            await until(lambda: _dest(gw, "amq")["delivered"] >= 1, 10, "the command's ack")
        finally:
            device.close()
    assert [(m.topic, json.loads(m.payload)) for m in got] == [("cmd/s1/valve-1/open", {"percent": 40})]
    acks = await amqp_messages(rabbitmq.url, "acks")
    assert [m.routing_key for m in acks] == ["cmdack.s1.valve-1.open"]
    assert json.loads(acks[0].body)["data"]["status"] == "delivered"


async def test_a_broker_that_is_not_there_yet_is_waited_for(tmp_path: Path) -> None:
    """Started before the broker: the destination keeps trying and sends once it is up."""
    server = RabbitMq(tmp_path / "late")
    destination = RabbitDestination("late", RabbitSettings(url=server.url, gateway_id="gw", queue="events",
                                                           topics=("telemetry/#",), own_prefix="iotgw.gw.late"))
    await destination.start()
    try:
        await asyncio.sleep(1)
        assert not destination.connected
        await asyncio.to_thread(server.start)
        await until(lambda: destination.connected, 30, "connect")
        assert await destination.send([_event(1)]) == 1
    finally:
        await destination.close()
        await asyncio.to_thread(server.close)


async def test_mqtt_publish_reaches_the_exchange_through_the_whole_gateway(tmp_path: Path, rabbitmq: RabbitMq) -> None:
    config = gateway_config(tmp_path, [{
        "name": "amq", "type": "rabbitmq", "url": rabbitmq.url, "topics": ["telemetry/valid/#"], "queue": "events",
    }])
    async with Gateway(config) as gw:
        await until(lambda: _dest(gw, "amq")["connected"], 30, "connect")
        await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}",
                                [(RAW.format(device="m-1"), json.dumps({"value": i, "seq": i})) for i in range(1, 6)])
        await until(lambda: _dest(gw, "amq")["delivered"] == 5, 15, "confirmations")
    stored = await amqp_messages(rabbitmq.url, "events")
    assert [m.routing_key for m in stored] == ["telemetry.valid.1%2E0.s1.meter.m-1.power"] * 5
    assert [json.loads(m.body)["data"]["seq"] for m in stored] == [1, 2, 3, 4, 5]
    assert all(m.headers["iotgw-gateway"] == "gw-a" and m.message_type == "io.iotgw.telemetry.reading.v1"
               for m in stored)
