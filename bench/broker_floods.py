"""The gateway's resident memory (RSS) under connection, session and retained-message floods, each at
two sizes, with the broker's default bounds (issue 13): memory follows the bounds, not the flood.

    .venv/bin/python bench/broker_floods.py

``iotgw run`` serves in a subprocess (anonymous clients allowed, every bound at its default); the
floods come over raw sockets from this process, and the broker's counters are read from
``/api/v1/stats``:

- connections: sockets from 30 loopback addresses that send one byte of a CONNECT and stall;
- sessions: CleanSession 0 clients subscribing ``flood/#`` at QoS 1 and leaving, then 2 KB QoS 1
  messages published to ``flood/x`` for all of them to keep;
- retained: 1 KB retained messages on distinct topics.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

from _harness import free_port, mqtt_connect, mqtt_packet, mqtt_string, start_gateway

MIB = 1024 * 1024


class _Acks:
    """Counts the packets arriving on a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.count = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buffer = b""
        while chunk := self._recv():
            buffer += chunk
            while len(buffer) >= 2 and len(buffer) >= 2 + buffer[1]:  # the broker sends only short packets here
                buffer = buffer[2 + buffer[1]:]
                with self._cond:
                    self.count += 1
                    self._cond.notify_all()

    def _recv(self) -> bytes:
        try:
            return self._sock.recv(1 << 16)
        except OSError:
            return b""  # closed by the bench

    def wait(self, count: int, timeout: float = 900) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.count >= count, timeout):
                raise SystemExit(f"only {self.count} of {count} acknowledgements arrived")


class Gateway:
    def __init__(self, tmp: Path) -> None:
        self.port, self.http = free_port(), free_port()
        config = tmp / "gw.toml"
        self.data = tmp / "data"
        config.write_text(f'site = "bench"\n[broker]\nport = {self.port}\nallow_anonymous = true\n'
                          f'[http]\nenabled = true\nport = {self.http}\n[storage]\ndata_dir = "{self.data}"\n')
        self.proc = start_gateway(config, self.port)

    def rss_mib(self) -> float:
        """VmRSS from /proc (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise SystemExit("no VmRSS in /proc: this bench needs Linux")

    def broker(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/api/v1/stats", timeout=30) as answer:
            stats = json.load(answer)
        return cast(dict[str, Any], stats["broker"])

    def sessions_file_mib(self) -> float:
        return sum(p.stat().st_size for p in self.data.glob("sessions.sqlite3*")) / MIB

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def connection_flood(gw: Gateway, count: int) -> list[socket.socket]:
    held = []
    for i in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=2,
                                            source_address=(f"127.0.1.{i % 30 + 1}", 0))
            sock.sendall(b"\x10")  # the first byte of a CONNECT, and nothing more
            held.append(sock)
        except OSError:
            pass
    time.sleep(1)
    return held


def session_flood(gw: Gateway, sessions: int, messages: int, start: int) -> float:
    """Returns the publisher's rate (acknowledged messages a second) while every session keeps them."""
    for i in range(start, start + sessions):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            subscribe = mqtt_packet(0x82, b"\x00\x01" + mqtt_string("flood/#") + b"\x01")
            sock.sendall(mqtt_connect(f"ghost-{i}", clean=False) + subscribe)
            answer = sock.recv(4)
            if answer[3:4] == b"\x00":  # accepted: wait for the SUBACK before leaving
                sock.recv(5)
    with socket.create_connection(("127.0.0.1", gw.port)) as pub:
        acks = _Acks(pub)
        pub.sendall(mqtt_connect(f"flood-pub-{start}"))
        acks.wait(1)
        payload = b"x" * 2048
        started = time.perf_counter()
        for i in range(messages):
            pub.sendall(mqtt_packet(0x32, mqtt_string("flood/x") + (i % 65535 + 1).to_bytes(2, "big") + payload))
        acks.wait(1 + messages)
        return messages / (time.perf_counter() - started)


def retained_flood(gw: Gateway, count: int, start: int) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as pub:
        acks = _Acks(pub)
        pub.sendall(mqtt_connect(f"retain-pub-{start}"))
        acks.wait(1)
        payload = b"r" * 1024
        for i in range(start, start + count):
            pub.sendall(mqtt_packet(0x33, mqtt_string(f"retained/{i}") + (i % 65535 + 1).to_bytes(2, "big") + payload))
        acks.wait(1 + count)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(Path(tmp))
        try:
            time.sleep(2)
            rows = [("idle", gw.rss_mib(), "")]
            held: list[socket.socket] = []
            for count in (1500, 3000):
                held += connection_flood(gw, count - len(held))
                b = gw.broker()
                rows.append((f"{count:,} stalled connections", gw.rss_mib(),
                             f"open {b['connections']}, refused {b['limits']['connections_refused']} (total) + "
                             f"{b['limits']['connections_refused_per_address']} (per address)"))
            for sock in held:
                sock.close()
            time.sleep(2)
            for sessions, messages, start in ((2500, 1000, 0), (2500, 2000, 2500)):
                rate = session_flood(gw, sessions, messages, start)
                b = gw.broker()
                rows.append((f"{start + sessions:,} sessions, +{messages:,} x 2 KB", gw.rss_mib(),
                             f"published {rate:,.0f} msg/s; persistent {b['sessions']['persistent']}, refused "
                             f"{b['limits']['sessions_refused']}, "
                             f"queued {b['sessions']['bytes'] / MIB:.1f} MiB, evicted "
                             f"{b['limits']['queued_bytes_evicted']:,}, "
                             f"sessions.sqlite3 {gw.sessions_file_mib():.1f} MiB"))
            for count, start in ((25_000, 0), (25_000, 25_000)):
                retained_flood(gw, count, start)
                b = gw.broker()
                rows.append((f"{start + count:,} retained x 1 KB", gw.rss_mib(),
                             f"kept {b['retained']['messages']:,} ({b['retained']['bytes'] / MIB:.1f} MiB), refused "
                             f"{b['limits']['retained_refused']:,}"))
        finally:
            gw.stop()
    print("gateway RSS under floods, default bounds:")
    for what, rss, detail in rows:
        print(f"  {what:<36} {rss:7.1f} MiB  {detail}")


if __name__ == "__main__":
    main()
