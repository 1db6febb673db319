"""systemd integration: the sd_notify protocol, the watchdog, and the unit file.

The gateway speaks sd_notify itself (a datagram to ``$NOTIFY_SOCKET``; no libsystemd): ``READY=1``
once broker, pipeline and store are up; ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` but only while
the event loop turns (the ping is sent from it) and :func:`gateway.status.health` finds
nothing wrong; ``STATUS=`` with key counters; ``STOPPING=1`` when a stop begins; ``RELOADING=1``
around a SIGHUP reload. Without ``$NOTIFY_SOCKET`` (not under systemd) all of it is a no-op.

:func:`render_unit` writes the unit; ``systemd/iotgw.service`` in the repository is its output for
the default paths (a test keeps the two identical), and ``iotgw service install`` writes it with
the paths of the installation it runs from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.status import Health

log = logging.getLogger(__name__)
STATUS_INTERVAL_S = 10.0


class Notifier:
    """Sends sd_notify messages; every method is a no-op when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address  # abstract namespace
        self._socket: socket.socket | None = None
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000
        self.sent = 0
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str | int) -> None:
        """``notify(READY=1, STATUS="...")``: one datagram, one ``KEY=value`` line per field."""
        if not self._address:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self._address)
            self.sent += 1
        except OSError as exc:  # systemd gone or the socket full: never a reason to stop the gateway
            self.failures += 1
            if self.failures == 1:
                log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def supervise(notifier: Notifier, health: Callable[[], Health]) -> None:
    """Until cancelled: ping the watchdog while healthy, refresh STATUS, log health changes once."""
    interval = notifier.watchdog_s / 2 if notifier.watchdog_s else STATUS_INTERVAL_S
    last_status = 0.0
    problems: tuple[str, ...] = ()
    while True:
        current = health()
        if current.problems != problems:
            if current.problems:
                log.error("unhealthy (%s): %s", "withholding the watchdog" if notifier.watchdog_s else "no watchdog",
                          "; ".join(current.problems))
            else:
                log.warning("healthy again")
            problems = current.problems
        fields: dict[str, str | int] = {}
        if current.ok and notifier.watchdog_s:
            fields["WATCHDOG"] = 1
        now = time.monotonic()
        if now - last_status >= STATUS_INTERVAL_S or fields.get("WATCHDOG") is None:
            fields["STATUS"] = current.status if current.ok else "unhealthy: " + "; ".join(current.problems)
            last_status = now
        notifier.notify(**fields)
        await asyncio.sleep(min(interval, STATUS_INTERVAL_S))


@contextlib.asynccontextmanager
async def notifying(notifier: Notifier, health: Callable[[], Health]) -> AsyncIterator[Notifier]:
    """READY=1 on entry (the gateway is up), the watchdog while inside, STOPPING=1 on the way out."""
    notifier.notify(READY=1, STATUS=health().status, MAINPID=os.getpid())
    task = asyncio.create_task(supervise(notifier, health), name="systemd watchdog")
    try:
        yield notifier
    finally:
        notifier.notify(STOPPING=1, STATUS="stopping: flushing what was accepted")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the unit ------------------------------------------------------------------------------------

DEFAULT_EXECUTABLE = "/opt/iotgw/bin/iotgw"
WATCHDOG_SEC = 30


def render_unit(executable: str = DEFAULT_EXECUTABLE) -> str:
    """The service unit for an ``iotgw`` installed at ``executable``."""
    return f"""\
# iotgw as a systemd service. Written by `iotgw service install` (which also puts an example config
# in /etc/iotgw/iotgw.toml); this copy is the same unit for an install in /opt/iotgw:
#   python3 -m venv /opt/iotgw && /opt/iotgw/bin/pip install iotgw
#   sudo /opt/iotgw/bin/iotgw service install && sudoedit /etc/iotgw/iotgw.toml
#   sudo systemctl enable --now iotgw && journalctl -u iotgw -f
# The gateway reports READY=1 once broker, pipeline and store are up, feeds the watchdog only while
# healthy, and on SIGTERM drains (store flushed, outboxes persisted) within TimeoutStopSec.
# `systemctl reload iotgw` (SIGHUP) reloads devices, rules and destinations; clients stay connected.
[Unit]
Description=iotgw IoT edge gateway
After=network-online.target bluetooth.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStartPre={executable} check-config /etc/iotgw/iotgw.toml
ExecStart={executable} run --config /etc/iotgw/iotgw.toml --data-dir /var/lib/iotgw
ExecReload=/bin/kill -HUP $MAINPID
WatchdogSec={WATCHDOG_SEC}
TimeoutStartSec=90
TimeoutStopSec=30
KillSignal=SIGTERM
Restart=on-failure
RestartSec=2

# A user of its own, with serial ports (dialout) and Bluetooth; state and config owned by systemd.
DynamicUser=yes
SupplementaryGroups=dialout bluetooth
StateDirectory=iotgw
StateDirectoryMode=0750
ConfigurationDirectory=iotgw
ConfigurationDirectoryMode=0750
UMask=0027

# Hardening: nothing it does not need.
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_BLUETOOTH
DevicePolicy=closed
DeviceAllow=char-ttyUSB rw
DeviceAllow=char-ttyACM rw
DeviceAllow=char-ttyAMA rw
DeviceAllow=char-ttyS rw

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True, slots=True)
class Installed:
    unit: Path
    config: Path
    config_written: bool  # False: an existing config was left as it was
    reloaded: bool


def default_executable() -> str:
    """The ``iotgw`` of the running installation (a venv's bin/, or wherever pip put it)."""
    beside = Path(sys.executable).parent / "iotgw"
    if beside.exists():
        return str(beside)
    found = shutil.which("iotgw")
    return str(Path(found).resolve()) if found else DEFAULT_EXECUTABLE


def install(
    *, unit_dir: Path, config_dir: Path, executable: str, example_config: str, reload: bool = True
) -> Installed:
    """Write the unit (always: it follows this installation) and an example config (only if none is
    there), then ask systemd to reread its units. Raises OSError when a file cannot be written."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / "iotgw.service"
    _write_atomic(unit, render_unit(executable), 0o644)
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "iotgw.toml"
    written = False
    if not config.exists():
        _write_atomic(config, example_config.replace('data_dir = "iotgw-data"', 'data_dir = "/var/lib/iotgw"'), 0o640)
        written = True
    reloaded = False
    systemctl = shutil.which("systemctl")
    if reload and systemctl and Path("/run/systemd/system").is_dir():  # systemd is the running init
        reloaded = subprocess.run([systemctl, "daemon-reload"], check=False).returncode == 0  # noqa: S603
    return Installed(unit, config, written, reloaded)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)
