"""Relay rate of the embedded broker with 20,000 unrelated subscription filters, beside the rate with
none, in the same run (issue 13: one client's 20,000 filters took a linear scan per message).

    .venv/bin/python bench/broker_filters.py [--messages 5000] [--filters 20000] [--rounds 3]

``iotgw run`` serves in a subprocess. A raw-socket publisher sends QoS 0 messages to ``bench/x`` as
fast as the broker reads them; a raw-socket subscriber on ``bench/x`` counts them; a message counts
when the subscriber has it. Then another client subscribes ``--filters`` filters that match nothing
published (``unrelated/<n>/<m>/+``, in SUBSCRIBE packets of 1,000), and the rounds run again.
Medians are reported, and their ratio (target: at least 0.8).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _harness import free_port, mqtt_connect, mqtt_packet, mqtt_string, start_gateway


class _Reader:
    """Counts the packets arriving on a socket (a thread of its own)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.count = 0
        self._buffer = b""
        self._lock = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while chunk := self._sock.recv(1 << 20):
            self._buffer += chunk
            done = 0
            while True:
                length, shift, i = 0, 0, done + 1
                while i < len(self._buffer) and self._buffer[i] & 0x80:
                    length |= (self._buffer[i] & 0x7F) << shift
                    shift, i = shift + 7, i + 1
                if i >= len(self._buffer):
                    break
                length |= self._buffer[i] << shift
                end = i + 1 + length
                if end > len(self._buffer):
                    break
                done = end
                with self._lock:
                    self.count += 1
                    self._lock.notify_all()
            self._buffer = self._buffer[done:]

    def wait(self, count: int, timeout: float = 600) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: self.count >= count, timeout):
                raise SystemExit(f"only {self.count} of {count} packets arrived")


def _client(port: int, client_id: str) -> tuple[socket.socket, _Reader]:
    sock = socket.create_connection(("127.0.0.1", port))
    reader = _Reader(sock)
    sock.sendall(mqtt_connect(client_id))
    reader.wait(1)  # CONNACK
    return sock, reader


def _round(port: int, sub: _Reader, messages: int, n: int) -> float:
    pub, _ = _client(port, f"bench-pub-{n}")
    body = b'{"value": 21.5, "unit": "C"}'
    batch = b"".join(mqtt_packet(0x30, mqtt_string("bench/x") + body) for _ in range(500))
    target = sub.count + messages
    start = time.perf_counter()
    for _ in range(messages // 500):
        pub.sendall(batch)
    sub.wait(target)
    elapsed = time.perf_counter() - start
    pub.close()
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--filters", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.toml"
        config.write_text(f'site = "bench"\n[broker]\nport = {port}\nallow_anonymous = true\n'
                          f"max_filters_per_client = {args.filters}\n"
                          f'[storage]\ndata_dir = "{Path(tmp) / "data"}"\n')
        gateway = start_gateway(config, port)
        try:
            sub_sock, sub = _client(port, "bench-sub")
            sub_sock.sendall(mqtt_packet(0x82, b"\x00\x01" + mqtt_string("bench/x") + b"\x00"))
            sub.wait(2)  # SUBACK
            _round(port, sub, 1000, 0)  # warm up
            before = [_round(port, sub, args.messages, i) for i in range(args.rounds)]
            flood, flood_reader = _client(port, "bench-flood")
            started = time.perf_counter()
            for batch in range(args.filters // 1000):
                filters = b"".join(mqtt_string(f"unrelated/{batch}/{i}/+") + b"\x00" for i in range(1000))
                flood.sendall(mqtt_packet(0x82, (batch + 1).to_bytes(2, "big") + filters))
            flood_reader.wait(1 + args.filters // 1000)  # the SUBACKs
            subscribed = time.perf_counter() - started
            after = [_round(port, sub, args.messages, 100 + i) for i in range(args.rounds)]
            sub_sock.close()
            flood.close()
        finally:
            gateway.terminate()
            gateway.wait(60)
    b, a = statistics.median(before), statistics.median(after)
    print(f"relay, QoS 0, {args.messages:,} messages a round, medians of {args.rounds} rounds:")
    print(f"  no other filters          : {b:8,.0f} msg/s")
    print(f"  {args.filters:,} unrelated filters: {a:8,.0f} msg/s   (subscribed in {subscribed:.1f} s)")
    print(f"  ratio: {a / b:.2f} (target >= 0.80)")


if __name__ == "__main__":
    main()
