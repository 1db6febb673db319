"""Messages per second from external MQTT publishers through the embedded broker into the store,
beside a bare amqtt broker relaying the same load to one subscriber, in the same run.

    .venv/bin/python bench/broker_ingest.py [--messages 20000] [--publishers 4] [--qos 1] [--rounds 3]

Both brokers run in their own process, as in production; the publishers run in other processes.
The gateway runs as configured by default but for the port and data directory: publishers log in
with a username and password (a password file, PBKDF2; logins happen before the clock starts), MQTT
sessions, the packet firewall, the journal and the catalog's traffic learning are on; nobody
subscribes to the valid events. The bare broker is amqtt with anonymous logins only. The gateway's
figure counts a message when it is in SQLite; the bare broker's when the subscriber has it. Rounds
alternate between the two, and medians are reported, with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker.auth import hash_password

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "telemetry/raw/1.0/bench/meter/m-{p}/power"
PASSWORD = "bench-secret"  # noqa: S105 (the benchmark's own throwaway users)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
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


def bare_broker(port: int) -> None:
    """The baseline: amqtt with only anonymous auth, as the gateway embeds it, relaying."""
    logging.disable(logging.ERROR)  # the readiness probe's empty connection is not news

    async def main() -> None:
        broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        })
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _connect(client: mqtt.Client, port: int) -> None:
    """Connect before the clock starts, again while the broker refuses: the gateway lets at most
    ``max_logins_per_address`` logins from one address wait for the password hash and refuses the
    others (CONNACK 3), which publishers started together from one machine can be."""
    answer: list[bool] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.append(not reason.is_failure)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer.clear()
        client.connect("127.0.0.1", port)
        while not answer and time.monotonic() < deadline:
            client.loop(0.1)
        if answer and answer[0]:
            return
        client.disconnect()
        time.sleep(0.2 + random.random())
    raise SystemExit("a publisher could not connect")


def _publisher(port: int, index: int, count: int, qos: int, *, ready: Any, go: Any, login: bool) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}")
    if login:
        client.username_pw_set(f"meter-{index}", PASSWORD)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    _connect(client, port)
    client.loop_start()
    topic = TOPIC.format(p=index)
    payloads = [json.dumps({"value": float(i % 500), "unit": "W", "seq": i}) for i in range(count)]
    ready.release()
    go.wait()
    infos = [client.publish(topic, body, qos=qos) for body in payloads]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_load(port: int, messages: int, publishers: int, qos: int, done: Any, *, login: bool = False,
              server: int | None = None, cpu: list[float] | None = None) -> float:
    """Start publishers, release them together, return seconds until ``done()`` is true (and append the
    ``server`` process's CPU seconds meanwhile to ``cpu``)."""
    ctx = mp.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    per = messages // publishers
    procs = [ctx.Process(target=_publisher, args=(port, i, per, qos),
                         kwargs={"ready": ready, "go": go, "login": login})
             for i in range(publishers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    start, used = time.perf_counter(), _cpu_s(server) if server else 0.0
    go.set()
    while not done():
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    if server and cpu is not None:
        cpu.append(_cpu_s(server) - used)
    for p in procs:
        p.join(60)
    return elapsed


def run_bare(messages: int, publishers: int, qos: int) -> tuple[float, float]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)])
    try:
        _wait_listening(port, proc)
        received = 0
        subscribed = threading.Event()

        def on_message(*_: object) -> None:
            nonlocal received
            received += 1

        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub")
        sub.on_connect = lambda c, *_: c.subscribe("telemetry/raw/#", qos)
        sub.on_subscribe = lambda *_: subscribed.set()
        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        subscribed.wait(10)
        target = (messages // publishers) * publishers
        cpu: list[float] = []
        elapsed = _run_load(port, messages, publishers, qos, lambda: received >= target, server=proc.pid, cpu=cpu)
        sub.disconnect()
        sub.loop_stop()
        return target / elapsed, cpu[0] / target
    finally:
        proc.terminate()
        proc.wait(30)


def run_gateway(messages: int, publishers: int, qos: int) -> tuple[float, int, float]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.toml"
        data = Path(tmp) / "data"
        passwd = Path(tmp) / "passwd"
        encoded = hash_password(PASSWORD)
        passwd.write_text("".join(f"meter-{i}:{encoded}\n" for i in range(publishers)))
        config.write_text(f'site = "bench"\n[broker]\nport = {port}\npassword_file = "{passwd}"\n'
                          f'[storage]\ndata_dir = "{data}"\n')
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_listening(port, proc)
            target = (messages // publishers) * publishers
            db_path = data / "iotgw.sqlite3"

            def stored() -> bool:
                try:
                    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
                        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0]) >= target
                except sqlite3.Error:
                    return False

            cpu: list[float] = []
            elapsed = _run_load(port, messages, publishers, qos, stored, login=True, server=proc.pid, cpu=cpu)
            rss_kib = _peak_rss_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        return target / elapsed, rss_kib, cpu[0] / target


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        bare_broker(args.serve_bare)
        return
    bare: list[float] = []
    gateway: list[float] = []
    bare_cpu: list[float] = []
    gateway_cpu: list[float] = []
    rss: list[int] = []
    for round_no in range(1, args.rounds + 1):
        rate, cpu = run_bare(args.messages, args.publishers, args.qos)
        bare.append(rate)
        bare_cpu.append(cpu)
        rate, peak, cpu = run_gateway(args.messages, args.publishers, args.qos)
        gateway.append(rate)
        gateway_cpu.append(cpu)
        rss.append(peak)
        print(f"round {round_no}: bare amqtt relay {bare[-1]:8.0f} msg/s ({bare_cpu[-1] * 1e6:4.0f} us CPU/msg)   "
              f"gateway into SQLite {rate:8.0f} msg/s ({cpu * 1e6:4.0f} us CPU/msg)   ratio {rate / bare[-1]:.2f}   "
              f"gateway peak RSS {peak / 1024:.0f} MiB", flush=True)
    b, g = statistics.median(bare), statistics.median(gateway)
    bc, gc = statistics.median(bare_cpu) * 1e6, statistics.median(gateway_cpu) * 1e6
    print(f"median ({args.messages} messages, {args.publishers} publishers, QoS {args.qos}): "
          f"bare amqtt relay {b:.0f} msg/s at {bc:.0f} us CPU/msg, gateway broker->pipeline->SQLite {g:.0f} msg/s "
          f"at {gc:.0f} us CPU/msg (all threads), ratio {g / b:.2f} (CPU {bc / gc:.2f}), "
          f"gateway peak RSS {max(rss) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
