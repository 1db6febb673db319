"""Forwarding to a real backbone: Mosquitto and nats-server (JetStream) started by fixtures.

The gateway runs in-process here so its counters can be read; a device publishes to it over TCP
with paho, exactly as in the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from gatewayproc import RAW, Device
from paho.mqtt.enums import MQTTProtocolVersion
from peers import (
    Mosquitto,
    MqttCollector,
    NatsServer,
    free_port,
    jetstream_messages,
    mosquitto_fixture,  # noqa: F401  (pytest fixture)
    mqtt_publish,
    nats_server_fixture,  # noqa: F401  (pytest fixture)
)

from firmware_sim.serial_sensor import Sds011Sim
from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config


def gateway_config(tmp_path: Path, forward: list[dict[str, Any]], **extra: Any) -> GatewayConfig:
    return parse_config({
        "site": "s1", "gateway_id": "gw-a", "broker": {"port": free_port(), "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")}, "pipeline": {"max_latency_s": 0.05}, "forward": forward,
        **extra,
    })




@pytest.fixture
def devices() -> Iterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        device.close()


def _dest(gw: Gateway, name: str) -> dict[str, Any]:
    stats: dict[str, Any] = gw.stats()["forward"]["destinations"][name]
    return stats


def _increasing_runs_needed(seqs: list[int]) -> int:
    """The fewest increasing subsequences that together make up ``seqs`` (first deliveries only)."""
    tails: list[int] = []
    seen: set[int] = set()
    for seq in seqs:
        if seq in seen:
            continue
        seen.add(seq)
        fits = [i for i, tail in enumerate(tails) if tail < seq]
        if fits:
            best = max(fits, key=lambda i: tails[i])
            tails[best] = seq
        else:
            tails.append(seq)
    return len(tails)


def _valid_seqs(payloads: list[bytes], device: str) -> list[int]:
    events = [json.loads(p) for p in payloads]
    return [e["data"]["seq"] for e in events if e["data"]["device_id"] == device]


def _assert_complete_in_order(seqs: list[int], acked: list[int], device: str) -> None:
    assert seqs, device
    assert set(acked) <= set(seqs), f"{device}: acknowledged but not delivered: {sorted(set(acked) - set(seqs))[:10]}"
    first_seen: list[int] = []
    for seq in seqs:  # duplicates may come (at least once) but the first delivery of each is in order
        if seq not in first_seen:
            first_seen.append(seq)
    assert first_seen == sorted(first_seen), f"{device}: out of order"


async def test_valid_events_reach_mosquitto_with_ids_and_rewritten_topics(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = gateway_config(tmp_path, [{
        "name": "central", "type": "mqtt", "url": mosquitto.url, "topics": ["telemetry/valid/>"],
        "rewrite": [{"from": "telemetry/", "to": "plant/"}], "topic_prefix": "edge/",
    }])
    collector = MqttCollector(mosquitto.url, ["edge/#"], protocol=MQTTProtocolVersion.MQTTv5)
    try:
        async with Gateway(config) as gw:
            await until(lambda: gw.stats()["forward"]["destinations"]["central"]["connected"], 10, "connect")
            messages = [(RAW.format(device="m-1"), json.dumps({"value": i, "seq": i})) for i in range(1, 21)]
            await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}", messages)
            got = await asyncio.to_thread(collector.wait_for, 21, 15)  # and the gateway's status (its birth)
            status = [r for r in got if r.topic == "edge/status/s1/gw-a"]
            received = [r for r in got if r not in status]
            def central() -> dict[str, Any]:
                return _dest(gw, "central")
            await until(lambda: central()["delivered"] == 20, 10, "acknowledgements")
            stats = central()
    finally:
        collector.close()
    assert {r.topic for r in received} == {"edge/plant/valid/1.0/s1/meter/m-1/power"}
    assert [r.payload for r in status] == [b"online"]  # under the destination's topic mapping
    events = [json.loads(r.payload) for r in received]
    assert [e["data"]["seq"] for e in events] == list(range(1, 21))
    for r, event in zip(received, events, strict=True):
        assert r.user_properties["event-id"] == event["id"]  # MQTT 5: the id travels as a property too
        assert r.user_properties["iotgw-gateway"] == "gw-a"
    assert stats["delivered"] == 20
    assert stats["depth"] == 0


async def test_mqtt_3_1_1_bridge(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = gateway_config(tmp_path, [{
        "name": "old", "type": "mqtt", "url": mosquitto.url, "topics": ["telemetry/valid/#"], "protocol": "3.1.1",
    }])
    collector = MqttCollector(mosquitto.url, ["telemetry/#"])
    try:
        async with Gateway(config) as gw:
            await until(lambda: gw.stats()["forward"]["destinations"]["old"]["connected"], 10, "connect")
            messages = [(RAW.format(device="m-2"), json.dumps({"value": i, "seq": i})) for i in range(1, 6)]
            await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}", messages)
            received = await asyncio.to_thread(collector.wait_for, 5, 15)
    finally:
        collector.close()
    assert [json.loads(r.payload)["data"]["seq"] for r in received] == [1, 2, 3, 4, 5]
    assert all(r.user_properties == {} for r in received)  # no properties in 3.1.1: the id is in the CloudEvent


async def test_backbone_outage_of_30_s_loses_nothing_and_keeps_order(
    tmp_path: Path, mosquitto: Mosquitto, devices: list[Device]
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "central", "type": "mqtt", "url": mosquitto.url, "topics": ["telemetry/valid/>"],
    }])
    collector = MqttCollector(mosquitto.url, ["telemetry/valid/#"], client_id="outage-collector")
    try:
        async with Gateway(config) as gw:
            def central() -> dict[str, Any]:
                return _dest(gw, "central")
            await until(lambda: central()["connected"], 10, "connect")
            devices += [Device(gw.broker.port, f"m-{i}", rate_hz=20).start() for i in (1, 2)]
            await asyncio.sleep(3)
            await asyncio.to_thread(mosquitto.stop)
            await asyncio.sleep(30)
            during = central()
            assert not during["connected"]
            assert during["depth"] > 500  # about 40 events/s queued while the backbone is away
            assert during["oldest_age_s"] > 25
            await asyncio.to_thread(mosquitto.restart)
            await asyncio.sleep(3)
            for device in devices:
                device.stop()
            await until(lambda: central()["depth"] == 0, 60, "the outbox to drain")
            total = sum(len(d.acked()) for d in devices)
            await asyncio.to_thread(collector.wait_for, total, 60)
            await until(lambda: central()["delivered"] >= total, 10, "acknowledgements to be committed")
            after = central()
    finally:
        collector.close()
    payloads = [r.payload for r in collector.messages]
    for device in devices:
        _assert_complete_in_order(_valid_seqs(payloads, device.device_id), device.acked(), device.device_id)
    assert after["delivered"] >= total
    assert after["delivery_lag_s"] is not None


async def test_nats_jetstream_outage_and_dedup_by_event_id(
    tmp_path: Path, nats_server: NatsServer, devices: list[Device]
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "js", "type": "nats", "url": nats_server.url, "topics": ["telemetry/valid/>"],
        "stream": "IOTGW", "create_stream": True,
    }])
    async with Gateway(config) as gw:
        def js() -> dict[str, Any]:
            return _dest(gw, "js")
        await until(lambda: js()["connected"], 15, "connect")
        devices += [Device(gw.broker.port, f"n-{i}", rate_hz=20).start() for i in (1, 2)]
        await asyncio.sleep(3)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(30)
        assert js()["depth"] > 500
        await asyncio.to_thread(nats_server.restart)
        await asyncio.sleep(3)
        for device in devices:
            device.stop()
        await until(lambda: js()["depth"] == 0, 60, "the outbox to drain")
    stored = await jetstream_messages(nats_server.url, "IOTGW", timeout=10)
    assert {m.subject.split(".")[1] for m in stored} == {"valid"}
    ids = [m.headers["Nats-Msg-Id"] for m in stored]
    assert len(ids) == len(set(ids)), "JetStream kept a duplicate event id"
    payloads = [m.data for m in stored]
    for device in devices:
        _assert_complete_in_order(_valid_seqs(payloads, device.device_id), device.acked(), device.device_id)


async def test_downlink_command_reaches_the_device_and_is_acknowledged(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "central", "type": "mqtt", "url": mosquitto.url, "topics": ["cmdack/#"],
        "subscribe": ["cmd/s1/#"],
    }])
    acks = MqttCollector(mosquitto.url, ["cmdack/#"], client_id="ops-console")
    try:
        async with Gateway(config) as gw:
            await until(lambda: gw.stats()["forward"]["destinations"]["central"]["connected"], 10, "connect")
            device = await asyncio.to_thread(  # the embedded broker runs on this loop: do not block it
                MqttCollector, f"mqtt://127.0.0.1:{gw.broker.port}", ["cmd/s1/valve-1/#"], client_id="valve-1")
            try:
                await asyncio.sleep(0.5)  # the bridge's subscription is in place once connected
                await asyncio.to_thread(mqtt_publish, mosquitto.url, [("cmd/s1/valve-1/open", b'{"percent": 40}')])
                got = await asyncio.to_thread(device.wait_for, 1, 10)
            finally:
                device.close()
            ack = await asyncio.to_thread(acks.wait_for, 1, 10)
    finally:
        acks.close()
    assert got[0].topic == "cmd/s1/valve-1/open"
    assert json.loads(got[0].payload) == {"percent": 40}
    event = json.loads(ack[0].payload)
    assert ack[0].topic == "cmdack/s1/valve-1/open"
    assert event["data"]["status"] == "delivered"
    assert event["data"]["via"] == "central"


async def test_event_mesh_two_gateways_one_backbone_no_loops(tmp_path: Path, mosquitto: Mosquitto) -> None:
    def mesh(name: str, site: str) -> GatewayConfig:
        return parse_config({
            "site": site, "gateway_id": name, "broker": {"port": free_port(), "allow_anonymous": True},
            "storage": {"data_dir": str(tmp_path / name)}, "pipeline": {"max_latency_s": 0.05},
            "forward": [{"name": "backbone", "type": "mqtt", "url": mosquitto.url,
                         "topics": ["telemetry/valid/#"], "subscribe": ["telemetry/valid/#"]}],
        })

    spy = MqttCollector(mosquitto.url, ["telemetry/#"], client_id="backbone-spy")
    try:
        async with Gateway(mesh("gw-a", "site-a")) as a, Gateway(mesh("gw-b", "site-b")) as b:
            for gw in (a, b):
                def connected(gw: Gateway = gw) -> bool:
                    return bool(_dest(gw, "backbone")["connected"])
                await until(connected, 10, "mesh")
            await asyncio.sleep(0.5)
            on_b = await asyncio.to_thread(
                MqttCollector, f"mqtt://127.0.0.1:{b.broker.port}", ["telemetry/valid/1.0/site-a/#"],
                client_id="subscriber-on-b")
            try:
                raw = "telemetry/raw/1.0/site-a/meter/m-a/power"
                await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{a.broker.port}",
                                        [(raw, json.dumps({"value": i, "seq": i})) for i in range(1, 6)])
                got = await asyncio.to_thread(on_b.wait_for, 5, 15)
                await asyncio.sleep(2)  # time for any loop to show
                extra = on_b.messages
            finally:
                on_b.close()
            a_stats, b_stats = a.stats()["forward"], b.stats()["forward"]
    finally:
        spy.close()
    assert [json.loads(r.payload)["data"]["seq"] for r in got] == [1, 2, 3, 4, 5]
    assert len(extra) == 5  # each event reached B once
    on_backbone = [r for r in spy.messages if r.topic.startswith("telemetry/valid/1.0/site-a/")]
    assert len(on_backbone) == 5  # B never sent A's events back, A never re-sent its echoes
    assert a_stats["destinations"]["backbone"]["delivered"] == 5
    assert b_stats["destinations"]["backbone"]["delivered"] == 0
    assert a_stats["echoes_dropped"] == 5  # A saw its own events come back and dropped them


async def test_fresh_first_serves_live_data_during_a_long_backlog(
    tmp_path: Path, mosquitto: Mosquitto, devices: list[Device]
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "central", "type": "mqtt", "url": mosquitto.url, "topics": ["telemetry/valid/>"],
        "replay": "fresh_first", "batch_size": 20,
    }])
    collector = MqttCollector(mosquitto.url, ["telemetry/valid/#"], client_id="fresh-collector")
    await asyncio.to_thread(mosquitto.stop)
    try:
        async with Gateway(config) as gw:
            def central() -> dict[str, Any]:
                return _dest(gw, "central")

            backlog = [(RAW.format(device="b-1"), json.dumps({"value": i, "seq": i})) for i in range(1, 3001)]
            await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}", backlog, timeout=60)
            await until(lambda: central()["depth"] == 3000, 30, "the backlog to be queued")
            await asyncio.to_thread(mosquitto.restart)
            await until(lambda: central()["connected"], 30, "reconnect")
            devices.append(Device(gw.broker.port, "l-1", rate_hz=50).start())
            await asyncio.sleep(4)
            devices[0].stop()
            await until(lambda: central()["depth"] == 0, 60, "the outbox to drain")
            await asyncio.to_thread(collector.wait_for, 3000 + len(devices[0].acked()), 60)
    finally:
        collector.close()
    arrivals = [json.loads(r.payload)["data"] for r in collector.messages]
    backlog_positions = [i for i, d in enumerate(arrivals) if d["device_id"] == "b-1"]
    live_positions = [i for i, d in enumerate(arrivals) if d["device_id"] == "l-1"]
    assert live_positions[0] < backlog_positions[-1], "fresh data waited for the whole backlog"
    backlog_seqs = [d["seq"] for d in arrivals if d["device_id"] == "b-1"]
    assert backlog_seqs == sorted(backlog_seqs)  # all of it queued during the outage: one lane, in order
    # The live device's first readings may have been queued before the gateway saw the backbone
    # return (backlog lane), the rest after (live lane): each lane in order, so its sequence is at
    # most two increasing runs interleaved.
    assert _increasing_runs_needed([d["seq"] for d in arrivals if d["device_id"] == "l-1"]) <= 2
    assert sorted({d["seq"] for d in arrivals if d["device_id"] == "b-1"}) == list(range(1, 3001))


async def test_downlink_to_a_serial_device_writes_the_protocols_command(tmp_path: Path, mosquitto: Mosquitto) -> None:
    link = tmp_path / "ttySDS011"
    config = parse_config({
        "site": "s1", "gateway_id": "gw-a", "broker": {"port": free_port(), "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")},
        "devices": [{"id": "pm-1", "transport": "serial", "protocol": "sds011", "port": str(link)}],
        "forward": [{"name": "central", "type": "mqtt", "url": mosquitto.url, "topics": ["cmdack/#"],
                     "subscribe": ["cmd/s1/#"]}],
    })
    acks = MqttCollector(mosquitto.url, ["cmdack/#"], client_id="ops")
    try:
        async with Sds011Sim(link, interval_s=0.1) as sim, Gateway(config) as gw:
            await until(lambda: _dest(gw, "central")["connected"] and gw.devices.drivers[0].stats.frames > 2, 15,
                        "start")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(mqtt_publish, mosquitto.url, [("cmd/s1/pm-1/sleep", b"")])
            await until(lambda: sim.sleeping, 10, "the sensor to sleep")
            frames = gw.devices.drivers[0].stats.frames
            await asyncio.sleep(1)
            assert gw.devices.drivers[0].stats.frames <= frames + 1  # asleep: no more reports
            await asyncio.to_thread(mqtt_publish, mosquitto.url, [
                ("cmd/s1/pm-1/fly", b"{}"), ("cmd/s1/pm-1/set_period", b'{"minutes": 99}'),
                ("cmd/s1/pm-1/work", b""),
            ])
            await until(lambda: not sim.sleeping, 10, "the sensor to wake")
            got = await asyncio.to_thread(acks.wait_for, 4, 10)
    finally:
        acks.close()
    assert sim.commands[0] == (0x06, bytes([0x01, 0x00]) + bytes(10))  # set sleep, per the datasheet
    statuses = {r.topic.rsplit("/", 1)[1]: json.loads(r.payload)["data"]["status"] for r in got}
    assert statuses == {"sleep": "delivered", "fly": "unsupported_command", "set_period": "invalid_argument",
                        "work": "delivered"}


async def test_an_event_a_destination_can_never_take_is_dropped_counted_not_blocking(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = gateway_config(tmp_path, [{
        "name": "js", "type": "nats", "url": nats_server.url, "topics": ["alert/#"],
        "stream": "ALERTS", "create_stream": True,
    }])
    async with Gateway(config) as gw:
        await until(lambda: _dest(gw, "js")["connected"], 15, "connect")
        # An empty level has no NATS subject; the event after it must still go through.
        await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}",
                                [("alert/raised/x/", b'{"n": 1}'), ("alert/raised/x/y", b'{"n": 2}')])
        await until(lambda: _dest(gw, "js")["delivered"] == 1 and _dest(gw, "js")["depth"] == 0, 15, "delivery")
        stats = _dest(gw, "js")
        # The drop is raised as an alert event (within the 10 s alert interval) and forwarded too.
        await until(lambda: _dest(gw, "js")["delivered"] == 2, 30, "the drop alert")
    stored = [json.loads(m.data) for m in await jetstream_messages(nats_server.url, "ALERTS", timeout=10)]
    assert [m for m in stored if "n" in m] == [{"n": 2}]
    assert stats["dropped"] == 1
    raised = [m["data"] for m in stored if m.get("type") == "io.iotgw.alert.raised.v1"]
    assert raised == [{"alert": "outbox_dropped", "destination": "js", "dropped": 1, "policy": "drop_oldest"}]
