"""`iotgw service install` gives the service a user that can read its configuration and password file,
and nobody else can. No systemd runs as PID 1 here, so the proof is what systemd would do: run as the
unit's User=, Group= and SupplementaryGroups= (setpriv), read the installed files, run the unit's
ExecStartPre (check-config, which reads the password file), and fail to read them as anyone else.

The installation goes into a temporary system image (`--root`): the user is created in its /etc/passwd,
never in this machine's.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

from gateway.ops.systemd import SERVICE_USER, render_unit

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installing a service and switching users need root"),
    pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("systemd-sysusers") is None,
                       reason="needs setpriv (util-linux) and systemd-sysusers (systemd)"),
]
PASSWORD = "correct horse"  # noqa: S105 - a made-up password for a test user


def cli(*args: str, stdin: str | None = None, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ...``, as root or (``user``: a setpriv prefix) as another user."""
    return subprocess.run([*(user or []), sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False, cwd="/", env={**os.environ, "PYTHONPATH": str(ROOT)})


def as_user(uid: int, gid: int, groups: list[int]) -> list[str]:
    listed = ",".join(map(str, groups)) if groups else None
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={listed}" if listed else "--clear-groups"]


def passwd_entry(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {name} in {root}/etc/passwd")


def unit_groups() -> list[int]:
    """The unit's SupplementaryGroups= that exist on this machine."""
    line = next(x for x in render_unit().splitlines() if x.startswith("SupplementaryGroups="))
    gids = []
    for name in line.split("=", 1)[1].split():
        with contextlib.suppress(KeyError):  # e.g. no bluetooth group without BlueZ
            gids.append(grp.getgrnam(name).gr_gid)
    return gids


@pytest.fixture
def image() -> Iterator[Path]:
    """A system image the unprivileged users can reach (pytest's own tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="iotgw-image-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


def readable(path: Path, user: list[str]) -> bool:
    result = subprocess.run([*user, "cat", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 or "Permission denied" in result.stderr, result.stderr
    return result.returncode == 0


def test_service_user_reads_its_config_and_password_file_and_nobody_else_does(image: Path) -> None:
    etc = image / "etc" / "iotgw"
    etc.mkdir(parents=True)
    (etc / "tls").mkdir(mode=0o700)
    key = etc / "tls" / "server.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    passwd = etc / "passwd"
    # what a user did before this release: a password file written by root, mode 0600
    assert cli("passwd", "--password-stdin", "--iterations", "1000", str(passwd), "meter-7",
               stdin=PASSWORD + "\n").returncode == 0
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600

    installed = cli("service", "install", "--root", str(image), "--no-reload", "--executable", "/opt/iotgw/bin/iotgw")
    assert installed.returncode == 0, installed.stderr
    assert f"made {passwd} readable by group iotgw only" in installed.stdout
    assert (image / "etc" / "sysusers.d" / "iotgw.conf").read_text().startswith("u iotgw ")
    uid, gid = passwd_entry(image, SERVICE_USER)
    assert 0 < uid < 1000  # a system user
    unit = (image / "etc" / "systemd" / "system" / "iotgw.service").read_text()
    assert f"User={SERVICE_USER}" in unit.splitlines()
    assert "DynamicUser=yes" not in unit

    config = etc / "iotgw.toml"
    for path, mode in ((etc, 0o2750), (etc / "tls", 0o2750), (config, 0o640), (passwd, 0o640), (key, 0o640)):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, mode), path

    # The service's first command (ExecStartPre) reads the config and the password file it names.
    text = config.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"', 1)  # needs the password file
    config.write_text(text.replace('# password_file = "/etc/iotgw/passwd"', f'password_file = "{passwd}"', 1))
    assert f'password_file = "{passwd}"' in config.read_text()
    service = as_user(uid, gid, unit_groups())
    checked = cli("check-config", str(config), user=service)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for path in (config, passwd, key):
        assert readable(path, service), path

    # Nobody else: another system user with the same supplementary groups (dialout, bluetooth), or none.
    for other in (as_user(uid + 1, gid + 1, unit_groups()), as_user(65534, 65534, [])):
        for path in (config, passwd, key):
            assert not readable(path, other), (other, path)
        assert cli("check-config", str(config), user=other).returncode != 0


def test_passwd_keeps_the_service_group_and_a_new_file_takes_it(image: Path) -> None:
    installed = cli("service", "install", "--root", str(image), "--no-reload")
    assert installed.returncode == 0, installed.stderr
    _, gid = passwd_entry(image, SERVICE_USER)
    passwd = image / "etc" / "iotgw" / "passwd"
    for user in ("meter-7", "dashboard"):  # created in the setgid directory, then rewritten
        result = cli("passwd", "--password-stdin", "--iterations", "1000", str(passwd), user, stdin=PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        st = passwd.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o640), user
    assert cli("passwd", "-D", str(passwd), "meter-7").returncode == 0
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640
    assert passwd.stat().st_gid == gid
    again = cli("service", "install", "--root", str(image), "--no-reload")
    assert again.returncode == 0, again.stderr
    assert "kept the existing config" in again.stdout
    assert "readable by group" not in again.stdout  # nothing needed fixing
    assert passwd_entry(image, SERVICE_USER)[1] == gid  # the same user, not a second one


def test_a_password_file_elsewhere_stays_private(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    tmp_path.chmod(0o755)
    assert cli("passwd", "--password-stdin", "--iterations", "1000", str(passwd), "u", stdin="pw\n").returncode == 0
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_exposure_is_not_worse_than_before(tmp_path: Path) -> None:
    """`systemd-analyze security` rated the DynamicUser unit 2.1; the static user must not score worse."""
    unit = tmp_path / "iotgw.service"
    unit.write_text(render_unit(str(Path(sys.executable).parent / "iotgw")))
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, check=False)
    overall = next(line for line in result.stdout.splitlines() if "Overall exposure level" in line)
    exposure = float(overall.split(":", 1)[1].split()[0])
    assert exposure <= 2.1, result.stdout
    assert "✓ User=/DynamicUser=" in result.stdout  # not root
