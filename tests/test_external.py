"""External broker mode against a real Mosquitto: the gateway attaches to the site's broker instead of
embedding one. End to end in-process (devices and dialects in, events back, forwarding, downlink, HTTP,
the retained online/offline status), then the broker going away and coming back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture, mqtt_publish  # noqa: F401  (fixture)

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from pipeline.store import StoreReader


def external_config(tmp_path: Path, mosquitto: Mosquitto, **extra: Any) -> GatewayConfig:
    broker = extra.pop("broker", {})
    return parse_config({
        "site": "s1", "gateway_id": "gw-x", "storage": {"data_dir": str(tmp_path / "gw")},
        "pipeline": {"max_latency_s": 0.05},
        "broker": {"mode": "external", "external": {"url": mosquitto.url, **broker}},
        **extra,
    })


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def retained(url: str, topic: str) -> bytes | None:
    """The retained message on ``topic``, read by a fresh clean session (None when there is none)."""
    with MqttCollector(url, [topic], client_id=f"retained-{time.monotonic_ns()}") as probe:
        try:
            return probe.wait_for(1, timeout=1.0)[0].payload
        except AssertionError:
            return None


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
async def test_external_mode_end_to_end(tmp_path: Path, mosquitto: Mosquitto, protocol: str) -> None:
    """The site's broker (``mosquitto``) and a backbone (a second Mosquitto) the gateway forwards to."""
    http_port = free_port()
    backbone = Mosquitto(tmp_path / "backbone")
    await asyncio.to_thread(backbone.start)
    config = external_config(
        tmp_path, mosquitto, broker={"protocol": protocol},
        dialects=[{"preset": "zigbee2mqtt"}, {"preset": "multi"}],
        http={"enabled": True, "port": http_port},
        forward=[{"name": "central", "type": "mqtt", "url": backbone.url, "topics": ["telemetry/valid/#"],
                  "subscribe": ["cmd/s1/#"], "topic_prefix": "central/"}],
    )
    url = mosquitto.url
    watcher = await asyncio.to_thread(
        MqttCollector, url, ["telemetry/valid/#", "telemetry/rejected/#", "cmd/#", "cmdack/#"],
        client_id="site-watcher")
    central = await asyncio.to_thread(MqttCollector, backbone.url, ["central/#"], client_id="central-watcher")
    try:
        async with Gateway(config) as gw:
            assert gw.broker.serving
            assert await asyncio.to_thread(retained, url, "status/s1/gw-x") == b"online"
            await asyncio.to_thread(mqtt_publish, url, [
                ("telemetry/raw/1.0/s1/meter/m-1/power", b'{"value": 12.5, "unit": "W", "seq": 1}'),
                ("zigbee2mqtt/kitchen", b'{"temperature": 19.5, "humidity": 41}'),
                ("telemetry/raw/1.0/s1/air/room-1", b'{"co2": 612, "ts": 1764312000}'),
                ("telemetry/raw/1.0/s1/meter/m-1/power", b'{"value": "high"}'),
                ("zigbee2mqtt/plug", b'{"power": 5, "retained": false}'),
            ], client_id="site-devices")
            await until(lambda: gw.store.rows_written >= 5, 10, "5 stored readings")
            # The backbone sends a command; the gateway publishes it on the site's broker for the device.
            await asyncio.to_thread(mqtt_publish, backbone.url, [("cmd/s1/valve-1/open", b'{"percent": 40}')],
                                    client_id="backbone")
            expected = {
                "telemetry/valid/1.0/s1/meter/m-1/power", "telemetry/valid/1.0/s1/zigbee/kitchen/temperature",
                "telemetry/valid/1.0/s1/zigbee/kitchen/humidity", "telemetry/valid/1.0/s1/air/room-1/co2",
                "telemetry/valid/1.0/s1/zigbee/plug/power",
            }

            def seen() -> set[str]:
                return {m.topic for m in (*watcher.messages, *central.messages)}

            wanted = expected | {f"central/{t}" for t in expected} | {
                "telemetry/rejected/1.0/s1/meter/m-1/power", "cmd/s1/valve-1/open", "cmdack/s1/valve-1/open",
            }
            await until(lambda: wanted <= seen(), 10,
                        lambda: f"events back on the site's broker, forwarded, the command and its ack: "
                                f"missing {sorted(wanted - seen())}")
            devices = {d["device_id"] for d in await asyncio.to_thread(get_json, http_port, "/api/v1/devices")}
            assert (await asyncio.to_thread(get_json, http_port, "/readyz"))["checks"]["broker"] == "up"
            status = gw.status()
        assert devices == {"m-1", "kitchen", "room-1", "plug"}
        external = status.broker.external
        assert external is not None
        assert (status.broker.mode, external.connected, external.protocol) == (
            "external", True, "5" if protocol == "auto" else "3.1.1")
        assert external.received == external.acknowledged == 5
        assert (external.subscriptions_refused, external.subscriptions_at_qos0) == (0, 0)  # Mosquitto granted QoS 1
        assert status.stages["clean"].rejected == {"non_numeric": 1}
        ack = next(json.loads(m.payload) for m in watcher.messages if m.topic == "cmdack/s1/valve-1/open")
        assert ack["data"]["status"] == "delivered"
        # Stopped cleanly: the status says so (a clean disconnect sends no will).
        assert await asyncio.to_thread(retained, url, "status/s1/gw-x") == b"offline"
    finally:
        watcher.close()
        central.close()
        backbone.close()
    with StoreReader(tmp_path / "gw") as store:
        assert [v for _, v in store.series("m-1", "power")[1]] == [12.5]  # type: ignore[index]


async def test_published_while_the_gateway_was_away_is_read_when_it_is_back(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The persistent session: the broker queues for the gateway while it is stopped."""
    config = external_config(tmp_path, mosquitto)
    async with Gateway(config):
        pass
    await asyncio.to_thread(mqtt_publish, mosquitto.url, [
        ("telemetry/raw/1.0/s1/meter/m-2/power", json.dumps({"value": i, "seq": i}).encode()) for i in range(50)
    ], client_id="while-away")
    async with Gateway(config) as gw:
        await until(lambda: gw.store.rows_written >= 50, 10, "the 50 readings queued while away")


async def test_an_outage_of_the_broker_is_survived_and_logged_once(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.broker.external")
    config = external_config(tmp_path, mosquitto)
    raw = "telemetry/raw/1.0/s1/meter/m-3/power"
    async with Gateway(config) as gw:
        await asyncio.to_thread(mqtt_publish, mosquitto.url, [(raw, b'{"value": 1, "seq": 1}')], client_id="before")
        await until(lambda: gw.store.rows_written >= 1, 10, "the first reading")
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: not gw.broker.serving, 10, "the gateway to see the broker gone")
        assert gw.health().ok  # an external broker away is not the gateway's fault (the watchdog keeps going)
        await asyncio.sleep(3)  # several reconnect attempts: still one line
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: gw.broker.serving, 40, "the gateway to reconnect")
        await asyncio.to_thread(mqtt_publish, mosquitto.url, [(raw, b'{"value": 2, "seq": 2}')], client_id="after")
        await until(lambda: gw.store.rows_written >= 2, 10, "the reading after the outage")
        external = gw.status().broker.external
        assert external is not None
        assert external.disconnects == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.broker.external"]
    assert sum("lost" in line for line in lines) == 1, lines
    assert sum("connected to" in line for line in lines) == 2, lines  # at start, and once back


async def test_readyz_says_the_external_broker_is_unreachable(tmp_path: Path) -> None:
    """Nothing listens where the site's broker should be: /readyz answers 503 and names the broker as away
    (not the gateway as starting or stopping); the gateway itself is healthy and keeps trying."""
    http_port, away = free_port(), free_port()
    config = parse_config({
        "site": "s1", "gateway_id": "gw-x", "storage": {"data_dir": str(tmp_path / "gw")},
        "broker": {"mode": "external", "external": {"url": f"mqtt://user:secret@127.0.0.1:{away}"}},
        "http": {"enabled": True, "port": http_port},
    })
    async with Gateway(config) as gw:
        with pytest.raises(urllib.error.HTTPError) as answer:
            await asyncio.to_thread(get_json, http_port, "/readyz")
        assert answer.value.code == 503
        body = json.loads(answer.value.read())
        assert body["checks"]["broker"] == f"the external MQTT broker 127.0.0.1:{away} is unreachable (reconnecting)"
        assert "secret" not in json.dumps(body)
        assert "secret" not in str(answer.value.reason)
        assert body["checks"]["pipeline"] == "up"
        assert gw.health().ok


def test_the_samples_external_block_is_a_valid_config(tmp_path: Path) -> None:
    """gateway/sample-config.toml shows [broker.external] commented out: uncommented, it loads (with Home
    Assistant's discovery)."""
    text = (Path(__file__).parent.parent / "gateway" / "sample-config.toml").read_text()
    start = text.index("# [broker.external]")
    block = text[start:text.index("\n[storage]", start)]
    lines = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    secret = tmp_path / "broker.pass"
    secret.write_text("s3cret\n")
    external = tomllib.loads("\n".join(lines).replace("/etc/iotgw/broker.pass", str(secret)))["broker"]["external"]
    config = parse_config({"broker": {"mode": "external", "external": external}, "homeassistant": {"discovery": True}})
    assert config.broker.external is not None
    assert (config.broker.external.host, config.broker.external.port, config.broker.external.tls_on) == (
        "mosquitto.local", 8883, True)
    assert config.broker.external.password is not None
    assert config.broker.external.password.get_secret_value() == "s3cret"
