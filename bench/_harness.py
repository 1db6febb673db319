"""What the MQTT ingest benchmarks share (bench/broker_ingest.py, bench/external_ingest.py): free loopback ports,
waiting for a server to listen, a process's CPU time and peak RSS, and the publisher processes that make the load.

The publishers are paho clients in processes of their own (spawned), QoS 1 by default with 100 messages in
flight each, ~100-byte JSON readings on the raw stage; they connect first and are released together, and the
clock runs from their release until ``done()`` says everything arrived.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "telemetry/raw/1.0/bench/meter/m-{p}/power"
LOAD_DEADLINE_S = 600  # a round that has not seen everything arrive by then fails (a publisher that died, say)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not listen")


def start_gateway(config: Path, port: int, *, stderr: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``iotgw run --config config`` in a process of its own, returned once its broker listens on ``port``."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        wait_listening(port, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def mqtt_string(text: str) -> bytes:
    """An MQTT UTF-8 string: its length in two bytes, then the bytes."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def mqtt_packet(first: int, body: bytes) -> bytes:
    """An MQTT packet: the first byte, the remaining length (variable-length integer), the body."""
    length, out = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(out) + body


def mqtt_connect(client_id: str, *, clean: bool = True) -> bytes:
    """A 3.1.1 CONNECT without keep-alive, will or login."""
    return mqtt_packet(0x10, mqtt_string("MQTT") + bytes([4, 2 if clean else 0, 0, 0]) + mqtt_string(client_id))


class Progress:
    """How many messages have arrived, over time: pass ``progress.saw(count)`` as ``run_load``'s ``done()``.

    ``sustained()`` is the rate between the moments 10 % and 90 % of them had arrived: the steady state,
    without the start (publishers connecting, a gateway's first batch filling) or the drain (the last few
    messages waiting out a gateway's batch linger and commit interval, ``[pipeline] max_latency_s`` and
    ``[storage] commit_interval_s``: a latency, not a rate)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._seen: list[tuple[float, int]] = []

    def saw(self, count: int) -> bool:
        self._seen.append((time.perf_counter(), count))
        return count >= self.target

    def _when(self, fraction: float) -> float:
        return next(t for t, count in self._seen if count >= fraction * self.target)

    def sustained(self, low: float = 0.1, high: float = 0.9) -> float:
        return (high - low) * self.target / (self._when(high) - self._when(low))

    def end_to_end(self) -> float:
        """The rate from the publishers' release (``run_load`` polls first right then) to the last arrival."""
        return self.target / (self._when(1.0) - self._seen[0][0])

    def drain_s(self) -> float:
        """From 90 % arrived to all of them."""
        return self._when(1.0) - self._when(0.9)


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def publisher(port: int, index: int, count: int, qos: int, *, ready: Any, go: Any, password: str | None) -> None:
    """One device process: paho, 100 in flight; logs in as ``meter-<index>`` when given a ``password``."""
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}")
    if password is not None:
        client.username_pw_set(f"meter-{index}", password)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    # A login the broker refuses for now (the embedded broker lets 2 logins an address wait for the password hash
    # at once: 4 publishers starting together can meet that) is tried again, before the clock starts.
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not connected.wait(60):
        raise SystemExit(f"publisher {index} could not connect")
    topic = TOPIC.format(p=index)
    payloads = [json.dumps({"value": float(i % 500), "unit": "W", "seq": i}) for i in range(count)]
    ready.release()
    go.wait()
    infos = [client.publish(topic, body, qos=qos) for body in payloads]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def run_load(port: int, messages: int, publishers: int, done: Callable[[], bool], *, qos: int = 1,
             password: str | None = None, server: int | None = None, cpu: list[float] | None = None) -> float:
    """Start publishers, release them together, return seconds until ``done()`` is true (and append the
    ``server`` process's CPU seconds meanwhile to ``cpu``)."""
    ctx = mp.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    per = messages // publishers
    procs = [ctx.Process(target=publisher, args=(port, i, per, qos),
                         kwargs={"ready": ready, "go": go, "password": password})
             for i in range(publishers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    start, used = time.perf_counter(), cpu_s(server) if server else 0.0
    go.set()
    while not done():
        if time.perf_counter() - start > LOAD_DEADLINE_S:
            codes = [p.exitcode for p in procs]
            for p in procs:
                p.kill()
            raise SystemExit(f"not everything arrived within {LOAD_DEADLINE_S} s (publishers' exit codes: {codes})")
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    if server and cpu is not None:
        cpu.append(cpu_s(server) - used)
    for p in procs:
        p.join(60)
    return elapsed
