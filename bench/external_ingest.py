"""Messages per second from MQTT publishers through a site's Mosquitto into the gateway's store (external
broker mode), beside the same Mosquitto relaying the same load to one plain subscriber, in the same run;
and the embedded broker's figures (bench/broker_ingest.py) beside them.

    .venv/bin/python bench/external_ingest.py [--messages 20000] [--publishers 4] [--rounds 5] [--workers 1]
                                              [--protocol 3.1.1] [--embedded-rounds 1]

Mosquitto (Debian's, 2.0.x) runs in its own process, started afresh for each round; the publishers
(paho, QoS 1) in other processes. The plain subscriber is a paho client subscribed at QoS 1 that
acknowledges as it reads; its figure counts a message when it has it. The gateway's counts a message
when it is in SQLite: acknowledged to Mosquitto only after its journal commit, then through collect,
clean, define, store and analyze, with its valid event published back to Mosquitto. ``--workers 2``
runs two gateway processes on one shared subscription (each with its own data directory). Rounds
alternate; medians are reported with their ratio, and the gateways' CPU time per message (user and
system, all threads), which varies less than the rates on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from _harness import ROOT, cpu_s, free_port, peak_rss_kib, run_load, wait_listening
from paho.mqtt.enums import CallbackAPIVersion


class Mosquitto:
    """A fresh Mosquitto on a free loopback port, in a temporary directory."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if exe is None:
            raise SystemExit("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.port = free_port()
        conf = directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "max_queued_messages 1000000", "max_queued_bytes 0", f"log_dest file {directory / 'm.log'}"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_plain_subscriber(messages: int, publishers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        try:
            received = 0
            subscribed = threading.Event()

            def on_message(*_: object) -> None:
                nonlocal received
                received += 1

            sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-plain-sub")
            sub.on_connect = lambda c, *_: c.subscribe("telemetry/raw/#", 1)
            sub.on_subscribe = lambda *_: subscribed.set()
            sub.on_message = on_message
            sub.connect("127.0.0.1", broker.port)
            sub.loop_start()
            subscribed.wait(10)
            target = (messages // publishers) * publishers
            elapsed = run_load(broker.port, messages, publishers, lambda: received >= target)
            sub.disconnect()
            sub.loop_stop()
            return target / elapsed
        finally:
            broker.close()


def run_external(messages: int, publishers: int, workers: int, protocol: str) -> tuple[float, int, float]:
    """(messages/s, peak RSS KiB, the gateways' CPU microseconds per message)."""
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            stores = []
            for n in range(workers):
                data = Path(tmp) / f"data-{n}"
                http = free_port()
                config = Path(tmp) / f"gw-{n}.toml"
                shared = 'shared_group = "bench"\n' if workers > 1 else ""
                config.write_text(
                    f'site = "bench"\ngateway_id = "bench-{n}"\n[storage]\ndata_dir = "{data}"\n'
                    f'[http]\nenabled = true\nport = {http}\n'
                    f'[broker]\nmode = "external"\n[broker.external]\nurl = "mqtt://127.0.0.1:{broker.port}"\n{shared}'
                    f'protocol = "{protocol}"\n'
                )
                proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(proc)
                wait_listening(http, proc)
                stores.append(data / "iotgw.sqlite3")
            time.sleep(0.5)  # subscribed
            target = (messages // publishers) * publishers

            def newest(path: Path) -> dict[str, int]:
                """Each series' newest ``seq`` + 1: a publisher's messages arrive in order, so where one worker
                stores everything, that counts them with one index probe a series (``count(*)`` would scan the
                table 100 times a second on the CPUs the gateways need)."""
                try:
                    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                        return {device: seq + 1 for device, seq in db.execute(
                            "SELECT device_id, (SELECT seq FROM readings r WHERE r.series_id = s.series_id "
                            "ORDER BY ts DESC, event_id DESC LIMIT 1) FROM series s") if seq is not None}
                except sqlite3.Error:
                    return {}

            def count(path: Path) -> int:
                try:
                    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])
                except sqlite3.Error:
                    return 0

            def done() -> bool:
                """Every message stored: the newest sequence numbers say so first (with shared subscriptions,
                the highest of any worker), then an exact count confirms it."""
                highest: dict[str, int] = {}
                for path in stores:
                    for device, seen in newest(path).items():
                        highest[device] = max(highest.get(device, 0), seen)
                return sum(highest.values()) >= target and sum(map(count, stores)) >= target

            cpu_before = sum(cpu_s(p.pid) for p in procs)
            elapsed = run_load(broker.port, messages, publishers, done)
            cpu_us = (sum(cpu_s(p.pid) for p in procs) - cpu_before) / target * 1e6
            rss = max(peak_rss_kib(p.pid) for p in procs)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            broker.close()
        return target / elapsed, rss, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes on one shared subscription")
    parser.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="3.1.1")
    parser.add_argument("--embedded-rounds", type=int, default=1, help="rounds of the embedded broker's figures")
    args = parser.parse_args()
    plain: list[float] = []
    external: list[float] = []
    rss: list[int] = []
    cpu: list[float] = []
    for round_no in range(1, args.rounds + 1):
        plain.append(run_plain_subscriber(args.messages, args.publishers))
        rate, peak, cpu_us = run_external(args.messages, args.publishers, args.workers, args.protocol)
        external.append(rate)
        rss.append(peak)
        cpu.append(cpu_us)
        print(f"round {round_no}: Mosquitto -> plain subscriber {plain[-1]:8.0f} msg/s   "
              f"Mosquitto -> gateway ({args.workers} worker(s)) -> SQLite {rate:8.0f} msg/s   "
              f"ratio {rate / plain[-1]:.2f}   gateway CPU {cpu_us:.0f} us/msg   peak RSS {peak / 1024:.0f} MiB",
              flush=True)
    embedded = ""
    if args.embedded_rounds:  # bench/broker_ingest.py, in the same run
        result = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("broker_ingest.py")), "--messages", str(args.messages),
             "--publishers", str(args.publishers), "--rounds", str(args.embedded_rounds)],
            capture_output=True, text=True, check=True)
        embedded = result.stdout.strip().splitlines()[-1]
    p, e = statistics.median(plain), statistics.median(external)
    print(f"median ({args.messages} messages, {args.publishers} publishers, QoS 1, {args.rounds} rounds):")
    print(f"  Mosquitto relaying to one plain subscriber      {p:8.0f} msg/s")
    print(f"  external mode (MQTT {args.protocol}), {args.workers} worker(s), into SQLite {e:8.0f} msg/s   "
          f"ratio {e / p:.2f}   gateway CPU {statistics.median(cpu):.0f} us/msg   peak RSS {max(rss) / 1024:.0f} MiB")
    if embedded:
        print(f"  embedded mode (bench/broker_ingest.py, {args.embedded_rounds} round(s)): {embedded}")


if __name__ == "__main__":
    main()
