"""``kill -9`` of the gateway under load, three times: after each restart, everything that had been
acknowledged to the device reaches the backbone (a real Mosquitto), and an event that arrives twice
arrives with the same event id."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import ROOT
from paho.mqtt.enums import CallbackAPIVersion
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture  # noqa: F401  (pytest fixture)

RAW = "telemetry/raw/1.0/s1/meter/{device}/power"


def _start(config: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gateway exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("gateway did not listen")


def _was_acked(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # published while disconnected: paho says so by raising
        return False


def test_kill_9_under_load_three_times_loses_nothing_acknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(
        f'site = "s1"\ngateway_id = "gw-crash"\n[broker]\nport = {port}\nallow_anonymous = true\n'
        f'[storage]\ndata_dir = "{tmp_path / "d"}"\n'
        f'[pipeline]\nmax_latency_s = 0.05\n'
        f'[[forward]]\nname = "central"\ntype = "mqtt"\nurl = "{mosquitto.url}"\ntopics = ["telemetry/valid/#"]\n'
    )
    collector = MqttCollector(mosquitto.url, ["telemetry/valid/#"], client_id="crash-collector")
    proc = _start(config, port)

    sent: dict[str, list[tuple[int, mqtt.MQTTMessageInfo]]] = defaultdict(list)
    stop = threading.Event()
    clients = []
    for device in ("k-1", "k-2"):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{device}")
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)

    def publish(device: str, client: mqtt.Client) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            body = json.dumps({"value": float(seq), "seq": seq})
            sent[device].append((seq, client.publish(RAW.format(device=device), body, qos=1)))
            time.sleep(0.01)

    threads = [threading.Thread(target=publish, args=(d, c)) for d, c in zip(("k-1", "k-2"), clients, strict=True)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(2.5)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            time.sleep(0.5)
            proc = _start(config, port)
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(10)
        time.sleep(3)  # the devices' last resends after the final reconnect
        acked = {device: [seq for seq, info in items if _was_acked(info)] for device, items in sent.items()}
        expected = sum(len(a) for a in acked.values())
        assert expected > 500
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            got = defaultdict(set)
            for r in collector.messages:
                data = json.loads(r.payload)["data"]
                got[data["device_id"]].add(data["seq"])
            if all(set(acked[d]) <= got[d] for d in acked):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.disconnect()
            client.loop_stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        collector.close()

    ids_by_seq: dict[tuple[str, int], set[str]] = defaultdict(set)
    for r in collector.messages:
        event = json.loads(r.payload)
        ids_by_seq[(event["data"]["device_id"], event["data"]["seq"])].add(event["id"])
    for device, seqs in acked.items():
        missing = [s for s in seqs if (device, s) not in ids_by_seq]
        assert not missing, f"{device}: {len(missing)} acknowledged readings never reached the backbone: {missing[:10]}"
    twice = {key: ids for key, ids in ids_by_seq.items() if len(ids) > 1}
    assert not twice, f"the same reading under different event ids: {list(twice.items())[:5]}"
