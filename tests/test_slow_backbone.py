"""A backbone that accepts slowly (a real Mosquitto behind a throttling TCP proxy): the gateway's
memory stays bounded, the outbox stays within its byte budget, and the configured policy applies:
``drop_oldest`` drops and counts (and raises an alert event), ``refuse`` pushes back on the device
and loses nothing it acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, Watcher
from paho.mqtt.enums import CallbackAPIVersion
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture  # noqa: F401  (pytest fixture)

RAW = "telemetry/raw/1.0/s1/meter/slow-1/power"
MAX_BYTES = 100_000


class ThrottlingProxy:
    """TCP proxy on loopback: client -> upstream at ``rate`` bytes/s, upstream -> client unthrottled."""

    def __init__(self, upstream_port: int, rate: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._rate = rate
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> ThrottlingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks(self._loop) - {asyncio.current_task()}:
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: int | None) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(512):
                    dst.write(data)
                    await dst.drain()
                    if rate:
                        await asyncio.sleep(len(data) / rate)
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, self._rate), pipe(up_reader, writer, None))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _outbox_bytes(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT coalesce(sum(size), 0) FROM outbox").fetchone()[0])


class Sampler:
    """Once a second during the load: the gateway's resident memory and its outbox's bytes."""

    def __init__(self, pid: int, outbox: Path) -> None:
        self.pid, self.outbox = pid, outbox
        self.rss: list[int] = []
        self.budgets: list[int] = []

    def sample(self) -> None:
        self.rss.append(_rss_kib(self.pid))
        with contextlib.suppress(sqlite3.Error):
            self.budgets.append(_outbox_bytes(self.outbox))


@pytest.fixture
def gateway_with_slow_backbone(tmp_path: Path, mosquitto: Mosquitto, request: pytest.FixtureRequest
                               ) -> Iterator[tuple[subprocess.Popen[str], int, Path, ThrottlingProxy]]:
    policy = request.param
    with ThrottlingProxy(mosquitto.port, rate=20_000) as proxy:
        port = free_port()
        config = tmp_path / "gw.toml"
        config.write_text(
            f'site = "s1"\n[broker]\nport = {port}\nallow_anonymous = true\n[storage]\ndata_dir = "{tmp_path / "d"}"\n'
            f'[pipeline]\nmax_latency_s = 0.05\nqueue_size = 200\n'
            f'[[forward]]\nname = "central"\ntype = "mqtt"\nurl = "mqtt://127.0.0.1:{proxy.port}"\n'
            f'topics = ["telemetry/valid/#"]\nmax_bytes = {MAX_BYTES}\nwhen_full = "{policy}"\n'
        )
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "gateway did not listen"
                    time.sleep(0.05)
            yield proc, port, tmp_path / "d" / "outbox.sqlite3", proxy
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _load(port: int, seconds: float, sample: Callable[[], None]) -> list[tuple[int, mqtt.MQTTMessageInfo]]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fast-meter")
    client.max_inflight_messages_set(50)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent = []
    end = time.monotonic() + seconds
    seq = 0
    next_sample = time.monotonic() + 1
    while time.monotonic() < end:
        seq += 1
        sent.append((seq, client.publish(RAW, json.dumps({"value": float(seq), "seq": seq}), qos=1)))
        time.sleep(0.004)  # about 250 readings/s: far more than the backbone takes
        if time.monotonic() > next_sample:
            sample()
            next_sample += 1
    client.disconnect()
    client.loop_stop()
    return sent


def _stats_line(out: str, key: str) -> dict[str, str]:
    line = next(x for x in out.splitlines() if x.strip().startswith(key))
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


@pytest.mark.parametrize("gateway_with_slow_backbone", ["drop_oldest"], indirect=True)
def test_drop_oldest_keeps_the_budget_counts_drops_and_raises_alerts(
    gateway_with_slow_backbone: tuple[subprocess.Popen[str], int, Path, ThrottlingProxy],
) -> None:
    proc, port, outbox, _ = gateway_with_slow_backbone
    alerts = Watcher(port, ["alert/#"])
    sampler = Sampler(proc.pid, outbox)

    _load(port, 14, sampler.sample)
    time.sleep(11)  # the alert loop reports drops every 10 s
    alerts.close()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    central = _stats_line(out, "forward central")
    assert int(central["dropped"]) > 100
    assert max(sampler.budgets) <= MAX_BYTES
    grown = sampler.rss[-1] - sampler.rss[2]
    assert grown < 15 * 1024, f"resident memory grew by {grown} KiB"
    raised = alerts.json("alert/raised/")
    assert raised
    assert {a["data"]["alert"] for a in raised} == {"outbox_dropped"}
    assert sum(a["data"]["dropped"] for a in raised) == int(central["dropped"])


@pytest.mark.parametrize("gateway_with_slow_backbone", ["refuse"], indirect=True)
def test_refuse_pushes_back_on_the_device_and_loses_nothing(
    gateway_with_slow_backbone: tuple[subprocess.Popen[str], int, Path, ThrottlingProxy], mosquitto: Mosquitto,
) -> None:
    proc, port, outbox, _ = gateway_with_slow_backbone
    collector = MqttCollector(mosquitto.url, ["telemetry/valid/#"], client_id="refuse-collector")
    sampler = Sampler(proc.pid, outbox)

    sent = _load(port, 12, sampler.sample)
    acked = []
    for seq, info in sent:
        with contextlib.suppress(RuntimeError, ValueError):
            if info.is_published():
                acked.append(seq)
    assert len(acked) < len(sent) * 0.8, "the device was not slowed down"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = {json.loads(r.payload)["data"]["seq"] for r in collector.messages}
            if set(acked) <= got:
                break
            time.sleep(0.5)
    finally:
        collector.close()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    central = _stats_line(out, "forward central")
    assert int(central["dropped"]) == 0
    assert int(central["refused_waits"]) > 0
    assert max(sampler.budgets) <= MAX_BYTES
    assert sampler.rss[-1] - sampler.rss[2] < 15 * 1024
    missing = sorted(set(acked) - got)
    assert not missing, f"{len(missing)} acknowledged readings lost: {missing[:10]}"
