"""The gateway as users run it (``iotgw run`` in the background), MQTT devices publishing under QoS 1, and
the ``kill -9`` harness built from them: run the devices, SIGKILL the gateway and start it again a few
times, stop the devices and return what each had acknowledged (test_crash.py, test_forward_rabbitmq.py,
test_forward_redis.py, test_external_workers.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

import paho.mqtt.client as mqtt
from conftest import ROOT
from paho.mqtt.enums import CallbackAPIVersion

RAW = "telemetry/raw/1.0/s1/meter/{device}/power"
START_S = 30.0


def was_acked(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # published while disconnected: paho says so by raising
        return False


class Device:
    """An MQTT device: paho, QoS 1, a sequence number per message on ``RAW``; remembers what was acknowledged.

    ``unit`` goes into each reading (None: none); ``stamped`` adds the device's time (``ts``)."""

    def __init__(self, port: int, device_id: str, rate_hz: float, *, unit: str | None = "W", stamped: bool = False,
                 reconnect_max_s: int = 2, max_inflight: int | None = None) -> None:
        self.device_id = device_id
        self.rate_hz = rate_hz
        self._unit, self._stamped = unit, stamped
        self.sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self._stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{device_id}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        if max_inflight is not None:
            self.client.max_inflight_messages_set(max_inflight)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            reading: dict[str, object] = {"value": float(seq), "seq": seq}
            if self._unit is not None:
                reading["unit"] = self._unit
            if self._stamped:
                reading["ts"] = time.time()
            self.sent.append((seq, self.client.publish(RAW.format(device=self.device_id), json.dumps(reading), qos=1)))
            time.sleep(1 / self.rate_hz)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def acked(self) -> list[int]:
        return [seq for seq, info in self.sent if was_acked(info)]

    def close(self) -> None:
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


class RunningGateway:
    """``iotgw run --config CONFIG`` in the background, started again in place by :meth:`start` after a
    :meth:`kill`. Ready once ``/readyz`` answers 200 (with ``http_port``) or else once its broker listens on
    ``mqtt_port``. Its output goes to ``log`` (appended; None: discarded)."""

    def __init__(self, config: Path, *, mqtt_port: int | None = None, http_port: int | None = None,
                 log: Path | None = None) -> None:
        assert mqtt_port is not None or http_port is not None, "how would it be known to be ready?"
        self.config, self.mqtt_port, self.http_port, self.log = config, mqtt_port, http_port, log
        self._out: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes]
        self.start()

    def start(self) -> None:
        self._out = self.log.open("ab") if self.log is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(self.config)], cwd=ROOT,
                                     stdout=self._out or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while not self.ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log.read_text()[-2000:] if self.log else ''}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"gateway not ready within {START_S:.0f} s")
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            if self.http_port is not None:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as resp:
                    return bool(resp.status == 200)
            assert self.mqtt_port is not None
            with socket.create_connection(("127.0.0.1", self.mqtt_port), timeout=0.2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def _closed(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._closed()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._closed()
        return code

    def close(self) -> None:
        """For a ``finally``: kill it if it still runs."""
        if self.proc.poll() is None:
            self.kill()
        self._closed()


def crash_config(path: Path, port: int, forward: str) -> Path:
    """``iotgw run``'s config for the kill -9 tests: the embedded broker on ``port`` (anonymous), its data in
    ``d`` beside ``path``, and one ``[[forward]]`` destination (its TOML lines)."""
    path.write_text(
        f'site = "s1"\ngateway_id = "gw-crash"\n[broker]\nport = {port}\nallow_anonymous = true\n'
        f'[storage]\ndata_dir = "{path.parent / "d"}"\n[pipeline]\nmax_latency_s = 0.05\n[[forward]]\n{forward}'
    )
    return path


def crash_load(port: int) -> list[Device]:
    """Two devices (k-1, k-2) publishing to the gateway's broker at 100/s, reconnecting every second."""
    return [Device(port, d, 100, unit=None, reconnect_max_s=1).start() for d in ("k-1", "k-2")]


def kill_9_under_load(gateway: RunningGateway, devices: Sequence[Device], *, kills: int, run_s: float,
                      away_s: float, settle_s: float, resend_s: float) -> dict[str, list[int]]:
    """With ``devices`` publishing (started): ``kills`` times, let the gateway run ``run_s``, SIGKILL it, wait
    ``away_s`` and start it again; ``settle_s`` later stop the devices, give them ``resend_s`` for their last resends,
    and return what each had acknowledged (device id -> sequence numbers). The gateway is left running."""
    for _ in range(kills):
        time.sleep(run_s)
        gateway.kill()
        time.sleep(away_s)
        gateway.start()
    time.sleep(settle_s)
    for device in devices:
        device.stop()
    time.sleep(resend_s)
    return {device.device_id: device.acked() for device in devices}
