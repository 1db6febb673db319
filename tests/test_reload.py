"""SIGHUP reloads devices, pipeline rules and destinations while MQTT clients stay connected."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import GatewayProcess, free_port
from paho.mqtt.enums import CallbackAPIVersion
from peers import Mosquitto, MqttCollector, mosquitto_fixture  # noqa: F401 (the fixture)

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.config.reload import plan_reload

BASE: dict[str, Any] = {"site": "s", "storage": {"data_dir": "/tmp/x"}}


def config(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def test_plan_names_what_changes_and_what_needs_a_restart() -> None:
    mqtt_dev = {"id": "a", "transport": "mqtt"}
    serial = {"id": "b", "transport": "serial", "port": "/dev/ttyUSB0", "protocol": "sds011"}
    dest = {"name": "central", "type": "mqtt", "url": "mqtt://127.0.0.1:1", "topics": ["#"]}
    old = parse_config(config(devices=[mqtt_dev, serial], forward=[dest]))
    new = parse_config(config(
        broker={"port": 2883},
        devices=[mqtt_dev, {**serial, "baudrate": 19200}, {"id": "c", "transport": "mqtt"}],
        forward=[{**dest, "name": "other"}],
        pipeline={"clean": {"metrics": {"temperature": {"max": 60}}}},
    ))
    plan = plan_reload(old, new)
    assert (plan.devices_added, plan.devices_removed, plan.devices_changed) == (("c",), (), ("b",))
    assert (plan.destinations_added, plan.destinations_removed, plan.destinations_changed) == (
        ("other",), ("central",), ())
    assert plan.pipeline_changed
    assert plan.needs_restart == ("broker (the broker's listeners)",)
    assert plan_reload(old, old).summary() == "nothing changed"


class Client:
    """A device connected throughout: it must never be disconnected by a reload."""

    def __init__(self, port: int) -> None:
        self.disconnects = 0
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="steady-device")
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = self._gone
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _gone(self, *_: object) -> None:
        self.disconnects += 1

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(body), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(path: Path, port: int, data: Path, extra: str) -> None:
    path.write_text(f'site = "s"\n[broker]\nport = {port}\nallow_anonymous = true\n'
                    f'[storage]\ndata_dir = "{data}"\n{extra}')


def test_sighup_applies_rules_devices_and_destinations_without_dropping_clients(
    tmp_path: Path, mosquitto: Mosquitto, gateway_process: type[GatewayProcess]
) -> None:
    port = free_port()
    cfg, data = tmp_path / "gw.toml", tmp_path / "data"
    write_config(cfg, port, data, "[pipeline.clean.metrics]\ntemperature = { min = -40, max = 100 }\n")
    gw = gateway_process(["run", "--config", str(cfg)], port)
    topic = "telemetry/raw/1.0/s/generic/dev-1/temperature"
    device = Client(port)
    watch = MqttCollector(f"mqtt://127.0.0.1:{port}", ["telemetry/valid/#", "telemetry/rejected/#"],
                          client_id="reload-watch")
    central = MqttCollector(mosquitto.url, ["telemetry/#"], client_id="reload-central")
    # A jsonlines serial device appears with the reload: a real pty, as the serial driver opens it.
    master, slave = os.openpty()
    link = tmp_path / "ttyJSON"
    link.symlink_to(os.ttyname(slave))
    try:
        device.publish(topic, {"value": 150})
        watch.wait_for(1)
        assert watch.messages[0].topic.startswith("telemetry/rejected/")  # above the first rules' max

        write_config(cfg, port + 1, data, (
            "[pipeline.clean.metrics]\ntemperature = { min = -40, max = 200 }\n"
            f'[[devices]]\nid = "gps-1"\ntransport = "serial"\nport = "{link}"\nprotocol = "jsonlines"\n'
            "baudrate = 115200\n"
            f'[[forward]]\nname = "central"\ntype = "mqtt"\nurl = "{mosquitto.url}"\ntopics = ["telemetry/valid/#"]\n'
        ))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not any(m.topic.startswith("telemetry/valid/") for m in watch.messages):
            assert time.monotonic() < deadline, "the new rules never applied"
            device.publish(topic, {"value": 150})
            time.sleep(0.3)
        while not any("/gps-1/" in m.topic for m in watch.messages):
            assert time.monotonic() < deadline, "the new serial device never produced"
            os.write(master, b'{"speed": 12.5}\n')
            time.sleep(0.3)
        got = central.wait_for(1, timeout=30)  # the new destination forwards
        assert all(m.topic.startswith("telemetry/valid/") for m in got)
        assert device.disconnects == 0  # the broker was never restarted
        assert device.client.is_connected()
    finally:
        device.close()
        watch.close()
        central.close()
        os.close(master)
        os.close(slave)
    code, _, err = gw.stop()
    assert code == 0, err
    assert "reloaded: devices added: gps-1; destinations added: central; pipeline rules changed" in err
    assert "broker (the broker's listeners) changed; that takes effect at the next restart" in err


@pytest.mark.parametrize("bad", ['site = "s"\n[broker]\nport = "nope"\n', "not toml ["])
def test_a_bad_config_on_sighup_keeps_the_running_one(
    tmp_path: Path, bad: str, gateway_process: type[GatewayProcess]
) -> None:
    port = free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port, tmp_path / "data", "")
    gw = gateway_process(["run", "--config", str(cfg)], port)
    device = Client(port)
    cfg.write_text(bad)
    gw.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)  # nothing to wait for: the point is that nothing happens
    device.publish("telemetry/raw/1.0/s/generic/dev-1/temperature", {"value": 20})
    assert device.disconnects == 0
    device.close()
    code, _, err = gw.stop()
    assert code == 0, err
    assert "reload refused, the running configuration stays" in err


async def test_reload_applies_a_stricter_catalog(tmp_path: Path) -> None:
    base = {"site": "s", "broker": {"port": 0, "allow_anonymous": True},
            "storage": {"data_dir": str(tmp_path / "data")}, "pipeline": {"max_latency_s": 0}}
    declared = {"strict": True, "types": [{
        "name": "com.example.temperature.v1", "version": "1.0", "metric": "temperature",
        "device_classes": ["environment"], "value": {"unit": "°C", "minimum": -40, "maximum": 85},
    }]}
    async with Gateway(parse_config(base)) as gw:
        topic = "telemetry/raw/1.0/s/environment/d1/{}"

        async def rejected_unknown() -> int:
            count: int = gw.pipeline.stats()["define"]["rejected"].get("unknown_event_type", 0)
            return count

        await gw.broker.publish(topic.format("humidity"), b'{"value": 40}', origin="device-1")
        await _until_processed(gw, 1)
        assert await rejected_unknown() == 0  # lenient: any numeric metric is a reading
        plan = await gw.reload(parse_config({**base, "catalog": declared}))
        assert plan.pipeline_changed
        await gw.broker.publish(topic.format("humidity"), b'{"value": 41}', origin="device-1")
        await gw.broker.publish(topic.format("temperature"), b'{"value": 21}', origin="device-1")
        await _until_processed(gw, 3)
        assert await rejected_unknown() == 1  # strict now: humidity is declared nowhere
        assert gw.pipeline.stats()["define"]["out"] == 2


async def _until_processed(gw: Gateway, count: int) -> None:
    deadline = time.monotonic() + 20
    while gw.pipeline.stats()["define"]["in"] < count:
        assert time.monotonic() < deadline, gw.pipeline.stats()
        await asyncio.sleep(0.05)
