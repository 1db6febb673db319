"""Shared fixtures: free loopback ports, the gateway as a subprocess, and an independent MQTT
client (paho) to watch it from outside."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def port() -> int:
    return free_port()


def iotgw(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI exactly as a user would (``python -m gateway``), from a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout, check=check,
        cwd=ROOT,
    )


class GatewayProcess:
    """``iotgw ...`` in the background; waits for the broker to listen."""

    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=None if env is None else {**os.environ, **env},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early: {self.proc.communicate()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise AssertionError("gateway did not listen within 30 s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@pytest.fixture
def gateway_process() -> Iterator[type[GatewayProcess]]:
    started: list[GatewayProcess] = []

    class Tracked(GatewayProcess):
        def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None) -> None:
            super().__init__(args, port, env)
            started.append(self)

    yield Tracked
    for gw in started:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.communicate()


class Watcher:
    """An independent paho client subscribed to the gateway's broker; records every message."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{os.getpid()}-{port}")
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 0) for t in topics])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "watcher could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.messages]

    def json(self, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p in self.messages if t.startswith(prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate for the gateway."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
             "-days", "2", "-subj", "/CN=iotgw-test-ca")
    for name, cn, ext in (("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1"), ("client", "gw-tls", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out",
                 str(d / f"{name}.csr"), "-subj", f"/CN={cn}")
        extfile = d / f"{name}.ext"
        extfile.write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(extfile))
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition", *, interval: float = 0.05,
    fail: bool = True,
) -> Any:
    """:func:`until` for tests without an event loop: poll ``condition()`` until it returns something truthy,
    and return that. At the timeout, fail naming ``what``; with ``fail=False`` return the last result instead
    (the caller's own assertions then say what is missing)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            return result
        time.sleep(interval)
    return result


async def until(
    check: Callable[[], Any], timeout: float = 30.0, what: str | Callable[[], str] = "condition"
) -> None:
    """Wait for a condition (polled), failing with ``what`` (or what it returns then) after ``timeout``
    seconds: tests wait for conditions with generous timeouts instead of sleeping and asserting. The one
    polling helper of the tests: import it from here."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what() if callable(what) else what}") from None
