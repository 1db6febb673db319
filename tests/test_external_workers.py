"""External broker mode as users run it (``iotgw run`` processes) beside a real Mosquitto: ``kill -9`` of
the gateway under QoS 1 load loses nothing Mosquitto acknowledged to the devices, and two gateways on one
shared subscription store every message exactly once between them."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import ROOT
from paho.mqtt.enums import CallbackAPIVersion
from peers import Mosquitto, free_port, mosquitto_fixture  # noqa: F401  (pytest fixture)

RAW = "telemetry/raw/1.0/s1/meter/{device}/power"


def write_config(path: Path, mosquitto: Mosquitto, *, gateway_id: str, http_port: int, extra: str = "") -> Path:
    path.write_text(
        f'site = "s1"\ngateway_id = "{gateway_id}"\n'
        f'[storage]\ndata_dir = "{path.parent / gateway_id}"\n'
        f'[pipeline]\nmax_latency_s = 0.05\n'
        f'[http]\nenabled = true\nport = {http_port}\n'
        f'[broker]\nmode = "external"\n[broker.external]\nurl = "{mosquitto.url}"\n{extra}'
    )
    return path


class Running:
    """``iotgw run`` in the background, ready once ``/readyz`` answers 200 (connected and subscribed)."""

    def __init__(self, config: Path, http_port: int) -> None:
        self.config, self.http_port = config, http_port
        self.log = config.with_suffix(".log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.ready():
            assert self.proc.poll() is None, f"gateway exited: {config.with_suffix('.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "gateway not ready within 30 s"
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log.close()
        return code


class Publisher:
    """A device on the site's broker: paho, QoS 1, sequence numbers and device time; remembers what
    Mosquitto acknowledged."""

    def __init__(self, url_port: int, device: str, rate_hz: float) -> None:
        self.device = device
        self.sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{device}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()
        self._rate = rate_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            body = json.dumps({"value": float(seq), "seq": seq, "ts": time.time()})
            self.sent.append((seq, self.client.publish(RAW.format(device=self.device), body, qos=1)))
            time.sleep(1 / self._rate)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def acked(self) -> set[int]:
        return {seq for seq, info in self.sent if info.is_published()}

    def close(self) -> None:
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


def stored(data_dir: Path) -> dict[str, dict[int, set[str]]]:
    """device -> seq -> the event ids it is stored under (read while the gateway may be writing)."""
    out: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    path = data_dir / "iotgw.sqlite3"
    if not path.exists():
        return out
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        for device, seq, event_id in db.execute(
            "SELECT s.device_id, r.seq, r.event_id FROM readings r JOIN series s USING (series_id)"
        ):
            out[device][seq].add(event_id)
    return out


def test_kill_9_under_load_twice_loses_nothing_the_broker_acknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    http_port = free_port()
    config = write_config(tmp_path / "gw.toml", mosquitto, gateway_id="gw-k", http_port=http_port)
    gateway = Running(config, http_port)
    devices = [Publisher(mosquitto.port, d, 150) for d in ("k-1", "k-2")]
    try:
        for _ in range(2):
            time.sleep(2.5)
            gateway.kill()  # mid-stream: deliveries in the inbox, in the journal, acknowledged or not
            time.sleep(1.0)  # Mosquitto keeps queueing for the persistent session meanwhile
            gateway = Running(config, http_port)
        time.sleep(2)
        for device in devices:
            device.stop()
        acked = {d.device: d.acked() for d in devices}
        assert sum(map(len, acked.values())) > 800
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = stored(tmp_path / "gw-k")
            if all(seqs <= got[name].keys() for name, seqs in acked.items()):
                break
            time.sleep(0.5)
        assert gateway.stop() == 0
    finally:
        for device in devices:
            device.close()
        if gateway.proc.poll() is None:
            gateway.kill()
    got = stored(tmp_path / "gw-k")
    for name, seqs in acked.items():
        missing = sorted(seqs - got[name].keys())
        assert not missing, f"{name}: {len(missing)} readings Mosquitto acknowledged were lost: {missing[:10]}"
    twice = {(d, s): ids for d, by_seq in got.items() for s, ids in by_seq.items() if len(ids) > 1}
    assert not twice, f"the same reading under different event ids: {list(twice.items())[:5]}"
    log = config.with_suffix(".log").read_text()
    assert log.count("replaying") >= 1, "a kill should have left messages in the journal to replay"


def test_two_shared_subscription_workers_store_every_message_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    workers = []
    for name in ("w-1", "w-2"):
        http_port = free_port()
        config = write_config(tmp_path / f"{name}.toml", mosquitto, gateway_id=name, http_port=http_port,
                              extra='shared_group = "iotgw"\n')
        workers.append(Running(config, http_port))
    devices = [Publisher(mosquitto.port, d, 300) for d in ("s-1", "s-2")]
    try:
        time.sleep(4)
        for device in devices:
            device.stop()
        acked = {d.device: d.acked() for d in devices}
        sent = {d.device: {seq for seq, _ in d.sent} for d in devices}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            per_worker = [stored(tmp_path / name) for name in ("w-1", "w-2")]
            if sum(len(by_seq) for got in per_worker for by_seq in got.values()) >= sum(map(len, sent.values())):
                break
            time.sleep(0.5)
        assert [w.stop() for w in workers] == [0, 0]
    finally:
        for device in devices:
            device.close()
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill()
    per_worker = [stored(tmp_path / name) for name in ("w-1", "w-2")]
    for name, seqs in sent.items():
        first, second = (set(got[name]) for got in per_worker)
        assert first, f"{name}: the second worker took everything"
        assert second, f"{name}: the first worker took everything"
        assert not first & second, f"{name}: stored by both workers: {sorted(first & second)[:10]}"
        assert acked[name] <= first | second, f"{name}: {sorted(acked[name] - (first | second))[:10]} lost"
        assert first | second == seqs
