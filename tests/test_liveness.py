"""Liveness: device inactivity alerts (pipeline/liveness.py) on a clock the test turns, then end to end on
an external Mosquitto; and the gateway's own retained online/offline status, a birth message and a last
will, on the external broker and on an MQTT forward destination, through a ``kill -9``."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture, mqtt_publish  # noqa: F401  (fixture)
from test_external import external_config, retained
from test_external_workers import running

from gateway.app import Gateway
from gateway.config import ConfigError, inactivity_rules, parse_config
from pipeline.liveness import InactivityRule, InactivityStage
from pipeline.model import Reading
from pipeline.rules import AlertChange, Selector
from pipeline.stage import Emitter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def reading(device: str, metric: str = "temperature", at: float = 1_000_000.0, device_class: str = "air") -> Reading:
    when = datetime.fromtimestamp(at, tz=UTC)
    return Reading(id="01J000000000000000000000AA", site="s1", device_id=device, device_class=device_class,
                   transport="mqtt", metric=metric, value=1.0, unit=None, device_ts=None, received_at=when)


async def test_silence_raises_and_a_reading_clears() -> None:
    clock = Clock()
    recorded: list[AlertChange] = []

    async def record(changes: list[AlertChange]) -> None:
        recorded.extend(changes)

    stage = InactivityStage([InactivityRule("silent", Selector(device_class="air"), 30)], site="s1",
                            on_alerts=record, clock=clock)
    stage.watch("never-heard", "air")  # configured: watched from now
    stage.watch("old", "air", last_s=clock.now - 100)  # the store heard it 100 s ago
    stage.watch("other", "water")  # not selected
    await stage.process([reading("t-1", at=clock.now)], Emitter())
    emit = Emitter()
    await stage.tick(emit)
    assert [t for t, _ in emit.events] == ["alert/raised/1.0/s1/air/old/inactive"]
    clock.now += 31
    emit = Emitter()
    await stage.tick(emit)
    assert sorted(t for t, _ in emit.events) == [
        "alert/raised/1.0/s1/air/never-heard/inactive", "alert/raised/1.0/s1/air/t-1/inactive"]
    event = dict(emit.events)["alert/raised/1.0/s1/air/t-1/inactive"]
    assert (event["type"], event["data"]["kind"], event["data"]["rule"], event["data"]["value"]) == (
        "io.iotgw.alert.raised.v1", "inactivity", "silent", 31.0)
    emit = Emitter()
    await stage.tick(emit)
    assert emit.events == []  # raised once
    assert stage.stats_dict() == {"watched": 3, "silent": 3,
                                  "alerts": {"raised": 3, "cleared": 0, "record_failures": 0}}
    emit = Emitter()
    await stage.process([reading("t-1", at=clock.now)], emit)
    assert [(t, e["data"]["message"]) for t, e in emit.events] == [
        ("alert/cleared/1.0/s1/air/t-1/inactive", "silent: t-1 is back (temperature)")]
    assert stage.stats_dict() == {"watched": 3, "silent": 2,
                                  "alerts": {"raised": 3, "cleared": 1, "record_failures": 0}}
    assert [(c.raised, c.device_id) for c in recorded] == [
        (True, "old"), (True, "never-heard"), (True, "t-1"), (False, "t-1")]


async def test_an_alert_active_at_start_is_cleared_by_the_next_reading_and_not_raised_twice() -> None:
    clock = Clock()
    stage = InactivityStage([InactivityRule("silent", Selector(), 30)], site="s1", clock=clock)
    raised_at = datetime.fromtimestamp(clock.now - 500, tz=UTC)
    stage.seed([("silent", "d-1", "inactive", raised_at), ("other-rule", "d-1", "x", raised_at)])
    stage.watch("d-1", "air", last_s=clock.now - 600)
    emit = Emitter()
    await stage.tick(emit)
    assert emit.events == []
    await stage.process([reading("d-1", at=clock.now)], emit)
    assert [t for t, _ in emit.events] == ["alert/cleared/1.0/s1/air/d-1/inactive"]
    assert emit.events[0][1]["data"]["raised_at"] == raised_at.isoformat().replace("+00:00", "Z")


async def test_a_rule_on_one_metric_waits_for_that_metric() -> None:
    clock = Clock()
    stage = InactivityStage([InactivityRule("no-co2", Selector(metric="co2"), 10)], site="s1", clock=clock)
    stage.watch("d-1", "air")  # a metric rule does not watch devices before it hears the metric
    await stage.process([reading("d-1", "temperature", clock.now), reading("d-2", "co2", clock.now)], Emitter())
    clock.now += 11
    emit = Emitter()
    await stage.tick(emit)
    assert [t for t, _ in emit.events] == ["alert/raised/1.0/s1/air/d-2/co2"]


def test_inactivity_rules_in_the_config() -> None:
    config = parse_config({"rules": [
        {"name": "silent", "kind": "inactivity", "after_s": 300, "device_class": "zigbee", "severity": "critical"},
        {"name": "hot", "kind": "threshold", "high": 80},
    ]})
    expected = InactivityRule("silent", Selector(device_class="zigbee"), 300, "critical")
    assert inactivity_rules(config.rules) == [expected]
    with pytest.raises(ConfigError, match="after_s"):
        parse_config({"rules": [{"name": "x", "kind": "inactivity", "after_s": 0}]})


async def test_inactivity_alerts_on_the_external_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = external_config(tmp_path, mosquitto, dialects=[{"preset": "zigbee2mqtt"}], rules=[
        {"name": "silent", "kind": "inactivity", "after_s": 1.5, "device_class": "zigbee"}])
    watcher = await asyncio.to_thread(MqttCollector, mosquitto.url, ["alert/#"], client_id="alert-watcher")
    try:
        async with Gateway(config) as gw:
            await asyncio.to_thread(mqtt_publish, mosquitto.url, [("zigbee2mqtt/door", b'{"contact": true}')])
            got = await asyncio.to_thread(watcher.wait_for, 1, 10)
            assert got[0].topic == "alert/raised/1.0/s1/zigbee/door/inactive"
            await asyncio.to_thread(mqtt_publish, mosquitto.url, [("zigbee2mqtt/door", b'{"contact": false}')])
            got = await asyncio.to_thread(watcher.wait_for, 2, 10)
            assert got[1].topic == "alert/cleared/1.0/s1/zigbee/door/inactive"
            alerts = await gw.store.active_alerts()
            liveness = gw.stats()["liveness"]  # what /api/v1/stats answers
            assert liveness == {"watched": 1, "silent": 0, "alerts": {"raised": 1, "cleared": 1, "record_failures": 0}}
        assert alerts == []
    finally:
        watcher.close()


def test_birth_and_last_will_on_the_external_broker_and_a_forward_destination(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Online once connected, on both brokers (the destination's under its topic prefix); after a
    ``kill -9`` each broker publishes the gateway's will once the keep-alive runs out."""
    backbone = Mosquitto(tmp_path / "backbone")
    backbone.start()
    try:
        http_port = free_port()
        config = tmp_path / "gw.toml"
        config.write_text(
            f'site = "s1"\ngateway_id = "gw-l"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[http]\nenabled = true\nport = {http_port}\n'
            f'[broker]\nmode = "external"\n[broker.external]\nurl = "{mosquitto.url}"\nkeepalive_s = 5\n'
            f'[[forward]]\nname = "central"\ntype = "mqtt"\nurl = "{backbone.url}"\ntopics = ["alert/#"]\n'
            f'topic_prefix = "plant-7/"\n'
        )
        gateway = running(config, http_port)
        site_status, central_status = "status/s1/gw-l", "plant-7/status/s1/gw-l"
        deadline = time.monotonic() + 10
        while retained(backbone.url, central_status) != b"online":  # the destination connects in the background
            assert time.monotonic() < deadline, "no birth message on the destination"
        assert retained(mosquitto.url, site_status) == b"online"
        gateway.kill()
        deadline = time.monotonic() + 20  # 1.5 x the keep-alive (the destination's is 30 s: a lost socket is faster)
        while (retained(mosquitto.url, site_status), retained(backbone.url, central_status)) != (b"offline",) * 2:
            assert time.monotonic() < deadline, "the brokers did not publish the last will"
    finally:
        backbone.close()
