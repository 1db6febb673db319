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
import logging
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from _harness import free_port, peak_rss_kib, run_load, start_gateway, wait_listening
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker.auth import hash_password

PASSWORD = "bench-secret"  # noqa: S105 (the benchmark's own throwaway users)


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


def run_bare(messages: int, publishers: int, qos: int) -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)])
    try:
        wait_listening(port, proc)
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
        elapsed = run_load(port, messages, publishers, lambda: received >= target, qos=qos, server=proc.pid, cpu=cpu)
        sub.disconnect()
        sub.loop_stop()
        return target / elapsed, cpu[0] / target
    finally:
        proc.terminate()
        proc.wait(30)


def run_gateway(messages: int, publishers: int, qos: int) -> tuple[float, int, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.toml"
        data = Path(tmp) / "data"
        passwd = Path(tmp) / "passwd"
        encoded = hash_password(PASSWORD)
        passwd.write_text("".join(f"meter-{i}:{encoded}\n" for i in range(publishers)))
        config.write_text(f'site = "bench"\n[broker]\nport = {port}\npassword_file = "{passwd}"\n'
                          f'[storage]\ndata_dir = "{data}"\n')
        proc = start_gateway(config, port)
        try:
            target = (messages // publishers) * publishers
            db_path = data / "iotgw.sqlite3"

            def stored() -> bool:
                try:
                    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
                        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0]) >= target
                except sqlite3.Error:
                    return False

            cpu: list[float] = []
            elapsed = run_load(port, messages, publishers, stored, qos=qos, password=PASSWORD, server=proc.pid,
                               cpu=cpu)
            rss_kib = peak_rss_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        return target / elapsed, rss_kib, cpu[0] / target


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
