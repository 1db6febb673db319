"""systemd: the sd_notify protocol over a real datagram socket, the watchdog withheld while the
pipeline is stuck, the unit checked by systemd-analyze, and `iotgw service install`.

No systemd manager runs here (it is not PID 1 in this container), so the tests play its part: they
bind the NOTIFY_SOCKET the gateway writes to, exactly as systemd would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import ROOT, GatewayProcess, free_port, iotgw

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.ops.systemd import DEFAULT_EXECUTABLE, Notifier, notifying, render_unit
from gateway.status import Health
from pipeline.stage import Emitter, StageStats


class NotifySocket:
    """What systemd listens on: a datagram socket; collects every message the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def _receive(self) -> None:
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, value: str | None = None, *, after: int = 0, timeout: float = 30) -> dict[str, str]:
        """The first message from index ``after`` on that has ``key`` (with ``value``)."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages[after:]:
                if key in message and (value is None or message[key] == value):
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value} from the service; got {self.messages}")
            self._receive()

    def drain(self, seconds: float) -> list[dict[str, str]]:
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._receive()
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    notifier.notify(READY=1)
    assert notifier.sent == 0


def test_notifier_speaks_the_protocol(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_s == 4.0
    notifier.notify(READY=1, STATUS="up: stored=3")
    assert notify_socket.wait_for("READY") == {"READY": "1", "STATUS": "up: stored=3"}
    notifier.close()


def test_watchdog_for_another_pid_is_not_ours() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_s is None


def test_abstract_socket_address() -> None:
    name = f"iotgw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.notify(READY=1)
        assert sock.recv(100) == b"READY=1"
        notifier.close()


def test_unreachable_socket_never_stops_the_gateway(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.notify(READY=1)
    notifier.notify(WATCHDOG=1)
    notifier.close()
    assert notifier.failures == 2
    assert len([r for r in caplog.records if "sd_notify" in r.message]) == 1  # logged once


def test_gateway_reports_ready_feeds_the_watchdog_and_says_stopping(
    tmp_path: Path, notify_socket: NotifySocket, gateway_process: type[GatewayProcess]
) -> None:
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s"\n[broker]\nport = {port}\nallow_anonymous = true\n'
                      f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    gw = gateway_process(["run", "--config", str(config)], port,
                         env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    ready = notify_socket.wait_for("READY", "1")
    assert "stored=0" in ready["STATUS"]
    assert ready["MAINPID"] == str(gw.proc.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # ready means the broker accepts clients
    pings = [m for m in notify_socket.drain(2.5) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3  # every half WATCHDOG_USEC
    mark = len(notify_socket.messages)
    code, _, err = gw.stop(signal.SIGTERM)
    assert code == 0, err
    notify_socket.drain(0.5)
    assert notify_socket.wait_for("STOPPING", "1", after=mark, timeout=1)


class _Stuck:
    """A stage that hangs on its batch until released (a wedged disk, a bug in a stage)."""

    name = "collect"

    def __init__(self) -> None:
        self.stats = StageStats()
        self.release = asyncio.Event()

    async def process(self, batch: Sequence[object], emit: Emitter) -> list[object]:
        await self.release.wait()
        return []


async def test_watchdog_is_withheld_while_the_pipeline_is_stuck(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = parse_config({
        "site": "s", "broker": {"port": 0, "allow_anonymous": True}, "storage": {"data_dir": str(tmp_path / "data")},
        "pipeline": {"stall_s": 0.5, "max_latency_s": 0},
    })
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"})
    async with Gateway(config) as gw, notifying(notifier, gw.health):
        stuck = _Stuck()
        gw.pipeline.stages = (stuck,)  # the test's stand-in for a wedged stage
        await asyncio.to_thread(notify_socket.wait_for, "WATCHDOG", "1")
        await gw.broker.publish("telemetry/raw/1.0/s/generic/d1/temperature", b'{"value": 1}')
        unhealthy = await asyncio.to_thread(notify_socket.wait_for, "STATUS", None, after=0, timeout=10)
        deadline = time.monotonic() + 10
        while not unhealthy["STATUS"].startswith("unhealthy"):
            assert time.monotonic() < deadline, notify_socket.messages
            unhealthy = await asyncio.to_thread(notify_socket.wait_for, "STATUS", None,
                                                after=len(notify_socket.messages), timeout=10)
        assert "inside one batch" in unhealthy["STATUS"]
        assert "WATCHDOG" not in unhealthy
        quiet = await asyncio.to_thread(notify_socket.drain, 0.6)
        assert not any("WATCHDOG" in m for m in quiet)  # systemd would now kill and restart us
        assert gw.health().problems
        stuck.release.set()
        mark = len(notify_socket.messages)
        await asyncio.to_thread(notify_socket.wait_for, "WATCHDOG", "1", after=mark)
        assert gw.health() == Health((), gw.health().status)
    notifier.close()


def test_checked_in_unit_is_the_rendered_one() -> None:
    assert (ROOT / "systemd" / "iotgw.service").read_text() == render_unit(DEFAULT_EXECUTABLE)


def test_unit_has_what_production_needs() -> None:
    lines = set(render_unit().splitlines())
    for needed in (
        "Type=notify", "WatchdogSec=30", "Restart=on-failure", "User=iotgw", "Group=iotgw", "StateDirectory=iotgw",
        "RemoveIPC=yes", "ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes",
        "CapabilityBoundingSet=", "SupplementaryGroups=dialout bluetooth", "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert needed in lines, needed
    families = next(line for line in lines if line.startswith("RestrictAddressFamilies="))
    assert "AF_BLUETOOTH" in families.split("=", 1)[1].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    unit = tmp_path / "iotgw.service"
    unit.write_text(render_unit(str(Path(sys.executable).parent / "iotgw")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # warnings (unknown keys, bad values) fail the test too
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("PrivateTmp=yes", "PrivateTmpp=yes"))
    result = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, check=False)
    assert "PrivateTmpp" in result.stdout + result.stderr  # the check can fail


@pytest.mark.skipif(os.geteuid() != 0, reason="the config is handed to the service's group: needs root")
def test_service_install_writes_unit_and_example_config(tmp_path: Path) -> None:
    units, etc = tmp_path / "units", tmp_path / "etc"
    args = ("service", "install", "--unit-dir", str(units), "--config-dir", str(etc), "--no-reload",
            "--executable", "/opt/x/bin/iotgw", "--root", str(tmp_path / "image"))  # the user goes into the image
    result = iotgw(*args)
    assert result.returncode == 0, result.stderr
    unit = (units / "iotgw.service").read_text()
    assert "ExecStart=/opt/x/bin/iotgw run --config /etc/iotgw/iotgw.toml --data-dir /var/lib/iotgw" in unit
    config = etc / "iotgw.toml"
    assert 'data_dir = "/var/lib/iotgw"' in config.read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert iotgw("check-config", str(config)).returncode == 0
    config.write_text('site = "mine"\n')
    assert "kept the existing config" in iotgw(*args).stdout
    assert config.read_text() == 'site = "mine"\n'  # never overwrites what the user edited
