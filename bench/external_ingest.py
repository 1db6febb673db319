"""Messages per second from MQTT publishers through a site's Mosquitto into the gateway's store (external
broker mode), beside the same Mosquitto relaying the same load to one plain subscriber, in the same run;
and the embedded broker's figures (bench/broker_ingest.py) beside them.

    .venv/bin/python bench/external_ingest.py [--messages 100000] [--publishers 4] [--rounds 5] [--workers 1]
                                              [--protocol 3.1.1] [--embedded-rounds 1]

Mosquitto (Debian's, 2.0.x) runs in its own process, started afresh for each round; the publishers
(paho, QoS 1) in other processes. The plain subscriber is a paho client subscribed at QoS 1 that
acknowledges as it reads; its figure counts a message when it has it. The gateway's counts a message
when it is in SQLite: acknowledged to Mosquitto only after its journal commit, then through collect,
clean, define, store and analyze, with its valid event published back to Mosquitto. ``--workers 2``
runs two gateway processes on one shared subscription (each with its own data directory). Rounds
alternate; medians are reported with their ratio, and the gateways' CPU time per message (user and
system, all threads), which varies less than the rates on a shared machine.

The rate compared is the sustained one: from the moment 10 % of the messages had arrived to the moment
90 % had (bench/_harness.py ``Progress``). The end-to-end rates and the drain (90 % to all) are printed
beside it: under the gateway's defaults its last few messages wait out the batch linger and the journal's
commit interval (about a second: a latency the SD card's write budget buys, not a rate), which in a round
of a few seconds would otherwise be most of the difference.
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
from _harness import Progress, cpu_s, free_port, peak_rss_kib, run_load, start_gateway, wait_listening
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


def run_plain_subscriber(messages: int, publishers: int) -> Progress:
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
            progress = Progress((messages // publishers) * publishers)
            run_load(broker.port, messages, publishers, lambda: progress.saw(received))
            sub.disconnect()
            sub.loop_stop()
            return progress
        finally:
            broker.close()


def run_external(messages: int, publishers: int, workers: int, protocol: str) -> tuple[Progress, int, float]:
    """(arrivals in the stores over time, peak RSS KiB, the gateways' CPU microseconds per message)."""
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        procs: list[subprocess.Popen[str]] = []
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
                procs.append(start_gateway(config, http))
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

            def stored() -> int:
                """How many are stored, from the newest sequence numbers (with shared subscriptions, the highest
                of any worker) until they say all; then an exact count."""
                highest: dict[str, int] = {}
                for path in stores:
                    for device, seen in newest(path).items():
                        highest[device] = max(highest.get(device, 0), seen)
                estimate = sum(highest.values())
                return estimate if estimate < target else sum(map(count, stores))

            cpu_before = sum(cpu_s(p.pid) for p in procs)
            progress = Progress(target)
            run_load(broker.port, messages, publishers, lambda: progress.saw(stored()))
            cpu_us = (sum(cpu_s(p.pid) for p in procs) - cpu_before) / target * 1e6
            rss = max(peak_rss_kib(p.pid) for p in procs)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            broker.close()
        return progress, rss, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes on one shared subscription")
    parser.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="3.1.1")
    parser.add_argument("--embedded-rounds", type=int, default=1, help="rounds of the embedded broker's figures")
    args = parser.parse_args()
    plain: list[Progress] = []
    external: list[Progress] = []
    rss: list[int] = []
    cpu: list[float] = []
    for round_no in range(1, args.rounds + 1):
        plain.append(run_plain_subscriber(args.messages, args.publishers))
        progress, peak, cpu_us = run_external(args.messages, args.publishers, args.workers, args.protocol)
        external.append(progress)
        rss.append(peak)
        cpu.append(cpu_us)
        p, e = plain[-1], external[-1]
        print(f"round {round_no}: sustained: plain subscriber {p.sustained():7.0f} msg/s, gateway ({args.workers} "
              f"worker(s)) -> SQLite {e.sustained():7.0f} msg/s, ratio {e.sustained() / p.sustained():.2f}   "
              "end to end: "
              f"{p.end_to_end():7.0f} vs {e.end_to_end():7.0f} msg/s, ratio {e.end_to_end() / p.end_to_end():.2f}, "
              f"drain {p.drain_s():.2f} vs {e.drain_s():.2f} s   gateway CPU {cpu_us:.0f} us/msg   "
              f"peak RSS {peak / 1024:.0f} MiB", flush=True)
    embedded = ""
    if args.embedded_rounds:  # bench/broker_ingest.py, in the same run
        result = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("broker_ingest.py")), "--messages", str(args.messages),
             "--publishers", str(args.publishers), "--rounds", str(args.embedded_rounds)],
            capture_output=True, text=True, check=True)
        embedded = result.stdout.strip().splitlines()[-1]
    ps, es = (statistics.median(p.sustained() for p in plain), statistics.median(e.sustained() for e in external))
    pe, ee = (statistics.median(p.end_to_end() for p in plain), statistics.median(e.end_to_end() for e in external))
    print(f"median ({args.messages} messages, {args.publishers} publishers, QoS 1, {args.rounds} rounds), "
          "sustained (10 % to 90 % arrived) and end to end:")
    print(f"  Mosquitto relaying to one plain subscriber      {ps:8.0f} msg/s   end to end {pe:8.0f} msg/s")
    print(f"  external mode (MQTT {args.protocol}), {args.workers} worker(s), into SQLite {es:8.0f} msg/s   "
          f"end to end {ee:8.0f} msg/s   gateway CPU {statistics.median(cpu):.0f} us/msg   "
          f"peak RSS {max(rss) / 1024:.0f} MiB")
    print(f"  ratio, sustained: {es / ps:.2f} (target >= 0.75); end to end: {ee / pe:.2f}; by round (sustained): "
          + ", ".join(f"{e.sustained() / p.sustained():.2f}" for p, e in zip(plain, external, strict=True)))
    print(f"  drain, 90 % to all arrived (median): plain {statistics.median(p.drain_s() for p in plain):.2f} s, "
          f"gateway {statistics.median(e.drain_s() for e in external):.2f} s (the gateway's last messages wait out "
          "[pipeline] max_latency_s and [storage] commit_interval_s)")
    if embedded:
        print(f"  embedded mode (bench/broker_ingest.py, {args.embedded_rounds} round(s)): {embedded}")


if __name__ == "__main__":
    main()
