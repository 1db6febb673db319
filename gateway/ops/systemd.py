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
import grp
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.status import Health
from pipeline.retry import stop_task

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
        await stop_task(task)


# --- the unit ------------------------------------------------------------------------------------

DEFAULT_EXECUTABLE = "/opt/iotgw/bin/iotgw"
WATCHDOG_SEC = 30
SERVICE_USER = "iotgw"  # the unit's User= and Group=; owns nothing but the state directory
SYSUSERS = f'u {SERVICE_USER} - "iotgw IoT edge gateway" /var/lib/iotgw\n'  # sysusers.d(5)


def render_unit(executable: str = DEFAULT_EXECUTABLE) -> str:
    """The service unit for an ``iotgw`` installed at ``executable``."""
    return f"""\
# iotgw as a systemd service. Written by `iotgw service install` (which also puts an example config
# in /etc/iotgw/iotgw.toml and creates the user iotgw); this copy is the same unit for an install in /opt/iotgw:
#   python3 -m venv /opt/iotgw && /opt/iotgw/bin/pip install iotgw-*.whl   # built by: pip wheel --no-deps -w dist .
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

# A system user of its own (from /etc/sysusers.d/iotgw.conf), with serial ports (dialout) and Bluetooth.
# It reads /etc/iotgw through its group (root:iotgw 2750, files 0640: `iotgw service install` sets
# them); systemd owns its state in /var/lib/iotgw. Not DynamicUser=: a dynamic user has no group that
# files in /etc/iotgw could belong to, and systemd never chowns a ConfigurationDirectory=.
User={SERVICE_USER}
Group={SERVICE_USER}
SupplementaryGroups=dialout bluetooth
StateDirectory=iotgw
StateDirectoryMode=0750
UMask=0027
RemoveIPC=yes

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
    group: int  # the service's gid: /etc/iotgw and every file in it belong to it
    secured: tuple[Path, ...] = ()  # existing files whose group or mode had to change


class MissingToolError(OSError):
    """A system tool the installation needs is not installed (``str()`` names its Debian package)."""


def default_executable() -> str:
    """The ``iotgw`` of the running installation (a venv's bin/, or wherever pip put it)."""
    beside = Path(sys.executable).parent / "iotgw"
    if beside.exists():
        return str(beside)
    found = shutil.which("iotgw")
    return str(Path(found).resolve()) if found else DEFAULT_EXECUTABLE


def install(
    *, unit_dir: Path, config_dir: Path, executable: str, example_config: str, reload: bool = True,
    root: Path = Path("/"),
) -> Installed:
    """Install the service into the system at ``root`` (``/``, or an image):

    - the unit (always: it follows this installation), mode 0644;
    - the system user and group ``iotgw`` (``/etc/sysusers.d/iotgw.conf``, applied by systemd-sysusers);
    - ``config_dir`` as root:iotgw 2750 (setgid: files created in it later take the group), an example
      config (only if none is there) as root:iotgw 0640, and every file already in it made readable by
      the group and by nobody else (group iotgw, ``g+r``, no access for others; owners are kept);

    then, on the running system, ask systemd to reread its units. Raises OSError when a file cannot be
    written (not root) and :class:`MissingToolError` without systemd-sysusers."""
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:  # before anything is written
        raise MissingToolError("systemd-sysusers is not installed (Debian package: systemd)")
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / "iotgw.service"
    _write_atomic(unit, render_unit(executable), 0o644)
    gid = _create_user(sysusers, root)
    config_dir.mkdir(parents=True, exist_ok=True)
    secured = _secure_tree(config_dir, gid)
    config = config_dir / "iotgw.toml"
    written = False
    if not config.exists():
        _write_atomic(config, example_config.replace('data_dir = "iotgw-data"', 'data_dir = "/var/lib/iotgw"'), 0o640,
                      gid=gid)
        written = True
    reloaded = False
    systemctl = shutil.which("systemctl")
    running_system = root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()  # systemd is init
    if reload and systemctl and running_system:
        reloaded = subprocess.run([systemctl, "daemon-reload"], check=False).returncode == 0  # noqa: S603
    return Installed(unit, config, written, reloaded, gid, secured)


def _create_user(sysusers: str, root: Path) -> int:
    """Create the service's user and group (if absent) in the system at ``root``; return the gid."""
    conf = root / "etc" / "sysusers.d" / f"{SERVICE_USER}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(conf, SYSUSERS, 0o644)
    # the configuration on stdin: a path given as an argument is not looked up under --root
    result = subprocess.run([sysusers, f"--root={root}", "-"], input=SYSUSERS, capture_output=True,  # noqa: S603
                            text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"systemd-sysusers could not create the user {SERVICE_USER!r}: {result.stderr.strip()}")
    return group_id(root, SERVICE_USER)


def group_id(root: Path, name: str) -> int:
    """The gid of group ``name`` in the system at ``root`` (its /etc/group; NSS for the running system)."""
    if root.resolve() == Path("/"):
        return grp.getgrnam(name).gr_gid
    for line in (root / "etc" / "group").read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name:
            return int(fields[2])
    raise KeyError(f"no group {name!r} in {root / 'etc' / 'group'}")


def _secure_tree(top: Path, gid: int) -> tuple[Path, ...]:
    """``top`` and everything under it: group ``gid``, readable (directories: enterable, setgid) by the
    group, not writable by it, nothing for others. Returns the existing files that changed."""
    changed: list[Path] = []
    for path in (top, *sorted(top.rglob("*"))):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue  # a symlink's target is not ours to change
        directory = stat.S_ISDIR(st.st_mode)
        mode = (stat.S_IMODE(st.st_mode) & ~0o027) | (0o2050 if directory else 0o040)
        if st.st_gid != gid:
            os.chown(path, st.st_uid, gid)
        if stat.S_IMODE(os.lstat(path).st_mode) != mode:  # chown may have dropped the setgid bit
            os.chmod(path, mode)
        if not directory and (st.st_gid != gid or stat.S_IMODE(st.st_mode) != mode):
            changed.append(path)
    return tuple(changed)


def _write_atomic(path: Path, text: str, mode: int, *, gid: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    if gid is not None:
        os.chown(tmp, 0, gid)
    tmp.chmod(mode)
    os.replace(tmp, path)
