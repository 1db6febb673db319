"""A clean stop loses nothing that was accepted: every message the broker acknowledged (PUBACK)
before SIGTERM is in the store after the process exits."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import GatewayProcess
from paho.mqtt.enums import CallbackAPIVersion

TOPIC = "telemetry/raw/1.0/s1/meter/m-1/power"


def _config(tmp_path: Path, port: int, queue_size: int) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        f'site = "s1"\n[broker]\nport = {port}\nallow_anonymous = true\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f"[pipeline]\nqueue_size = {queue_size}\nbatch_size = 200\n"
    )
    return path


def test_sigterm_under_load_stores_every_acknowledged_message(
    tmp_path: Path, port: int, gateway_process: type[GatewayProcess]
) -> None:
    gw = gateway_process(["run", "--config", str(_config(tmp_path, port, queue_size=64))], port)

    sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
    acks = 0

    def on_publish(client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        nonlocal acks
        acks += 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="meter-1")
    client.max_inflight_messages_set(50)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.is_set() and seq < 200_000:
            seq += 1
            sent.append((seq, client.publish(TOPIC, json.dumps({"value": seq, "unit": "W", "seq": seq}), qos=1)))
            if seq % 200 == 0:
                time.sleep(0.001)

    publisher = threading.Thread(target=publish)
    publisher.start()
    deadline = time.monotonic() + 20
    while acks < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    rc, out, err = gw.stop(signal.SIGTERM)  # mid-stream: the publisher is still sending
    stop.set()
    publisher.join(10)
    client.loop_stop()
    assert rc == 0, err
    assert "Traceback" not in err

    acknowledged = {seq for seq, info in sent if _acknowledged(info)}  # PUBACK received
    assert len(acknowledged) >= 1500
    assert len(acknowledged) < len(sent)  # the stop really came mid-stream
    with sqlite3.connect(tmp_path / "data" / "iotgw.sqlite3") as db:
        stored = {row[0] for row in db.execute("SELECT seq FROM readings")}
    missing = sorted(acknowledged - stored)
    assert not missing, f"{len(missing)} acknowledged messages lost, first {missing[:10]}"
    assert f"stored={len(stored)}" in out


def _acknowledged(info: mqtt.MQTTMessageInfo) -> bool:
    """PUBACK received. paho raises for a message it could not even send (published after the gateway
    closed the connection): that one was never acknowledged."""
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        return False
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False
