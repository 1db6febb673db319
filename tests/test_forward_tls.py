"""The MQTT bridge's TLS with client certificates (a real Mosquitto requiring them), and its fallback
to MQTT 3.1.1 against a broker that refuses MQTT 5 (amqtt, which speaks only 3.1.1)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from conftest import until
from peers import Mosquitto, MqttCollector, free_port, mqtt_publish

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.forward.mqtt.destination import MqttDestination

RAW = "telemetry/raw/1.0/s1/meter/t-1/power"


def _config(tmp_path: Path, forward: dict[str, Any]) -> Any:
    return parse_config({
        "site": "s1", "gateway_id": "gw-tls", "broker": {"port": free_port(), "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")}, "pipeline": {"max_latency_s": 0.05},
        "forward": [{"name": "central", "type": "mqtt", "topics": ["telemetry/valid/#"], **forward}],
    })


async def test_tls_with_client_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls_port = free_port()
    extra = [
        f"listener {tls_port} 127.0.0.1", f"cafile {pki['ca_pem']}", f"certfile {pki['server_pem']}",
        f"keyfile {pki['server_key']}", "require_certificate true",
    ]
    with Mosquitto(tmp_path / "mq", extra_config=extra) as mosquitto:
        collector = MqttCollector(mosquitto.url, ["telemetry/#"], client_id="tls-collector")
        good = _config(tmp_path / "good", {
            "url": f"mqtts://127.0.0.1:{tls_port}",
            "tls": {"ca_file": str(pki["ca_pem"]), "cert_file": str(pki["client_pem"]),
                    "key_file": str(pki["client_key"])},
        })
        without_cert = _config(tmp_path / "bad", {
            "url": f"mqtts://127.0.0.1:{tls_port}", "tls": {"ca_file": str(pki["ca_pem"])},
        })
        try:
            async with Gateway(good) as gw:
                await until(lambda: gw.stats()["forward"]["destinations"]["central"]["connected"], 10, "connect")
                await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}",
                                        [(RAW, json.dumps({"value": i, "seq": i})) for i in range(1, 4)])
                got = await asyncio.to_thread(collector.wait_for, 3, 15)
            async with Gateway(without_cert) as gw:
                await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}",
                                        [(RAW, json.dumps({"value": 9, "seq": 9}))])
                await asyncio.sleep(3)
                refused = gw.stats()["forward"]["destinations"]["central"]
        finally:
            collector.close()
    assert [json.loads(r.payload)["data"]["seq"] for r in got] == [1, 2, 3]
    assert not refused["connected"]  # the broker requires a client certificate
    assert refused["depth"] == 1  # kept in the outbox, not lost


async def test_falls_back_to_mqtt_3_1_1_when_the_remote_refuses_mqtt_5(tmp_path: Path) -> None:
    port = free_port()
    remote = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await remote.start()
    try:
        collector = await asyncio.to_thread(MqttCollector, f"mqtt://127.0.0.1:{port}", ["telemetry/#"],
                                            client_id="old-collector")
        try:
            async with Gateway(_config(tmp_path, {"url": f"mqtt://127.0.0.1:{port}"})) as gw:
                await until(lambda: gw.stats()["forward"]["destinations"]["central"]["connected"], 20, "connect")
                forwarder = gw.destinations.forwarder
                destination = forwarder.routes["central"].destination if forwarder else None
                assert isinstance(destination, MqttDestination)
                assert destination.protocol_in_use == "3.1.1"
                await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}",
                                        [(RAW, json.dumps({"value": 1, "seq": 1}))])
                got = await asyncio.to_thread(collector.wait_for, 1, 15)
        finally:
            collector.close()
    finally:
        await remote.shutdown()
    assert json.loads(got[0].payload)["data"]["seq"] == 1
