"""A system tool the CLI needs that is not installed is one line naming its Debian package (exit code
non-zero), never a traceback. The tools are hidden by running the CLI with a PATH that lacks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bleak.exc import BleakDBusError
from conftest import ROOT, free_port

from drivers.ble.driver import scanner_failure


def iotgw_without_tools(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ...`` with an empty PATH: no socat, no systemd tools, nothing."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=tmp_path, env={**os.environ, "PATH": str(empty), "PYTHONPATH": str(ROOT)})


def assert_one_line(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if needle in line]
    assert len(lines) == 1, result


def test_sim_that_unplugs_without_socat(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nkind = "kv"\nid = "kv-1"\n'
                     '[[device]]\nkind = "sds011"\nid = "pm-1"\n[device.faults]\nunplug_every = 10\n')
    result = iotgw_without_tools(tmp_path, "sim", "--fleet", str(fleet), "--dir", str(tmp_path / "sim"),
                                 "--seconds", "1")
    assert_one_line(result, "(Debian package: socat)")
    assert "device[1] (pm-1): unplugging a simulated serial cable needs socat" in result.stderr


@pytest.mark.timeout(60)
def test_sim_without_socat_runs_on_python_ptys(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nkind = "kv"\nid = "kv-1"\ninterval_s = 0.2\n')
    result = iotgw_without_tools(tmp_path, "sim", "--fleet", str(fleet), "--dir", str(tmp_path / "sim"),
                                 "--seconds", "1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "kv-1" in result.stdout


def test_service_install_without_systemd_sysusers(tmp_path: Path) -> None:
    image = tmp_path / "image"
    result = iotgw_without_tools(tmp_path, "service", "install", "--root", str(image), "--no-reload")
    assert_one_line(result, "systemd-sysusers is not installed (Debian package: systemd)")
    assert not image.exists()  # nothing written


@pytest.mark.parametrize(("exc", "says"), [
    pytest.param(FileNotFoundError(2, "No such file or directory"), "(Debian packages: dbus, bluez)", id="no-bus"),
    pytest.param(BleakDBusError("org.freedesktop.DBus.Error.ServiceUnknown",
                                ["The name org.bluez was not provided by any .service files"]),
                 "BlueZ is not running (Debian package: bluez", id="no-bluez"),
    pytest.param(RuntimeError("adapter hci1 not found"), None, id="other"),
])
def test_ble_scanner_failure_names_the_package(exc: Exception, says: str | None) -> None:
    text = scanner_failure(exc)
    assert text.startswith(f"{type(exc).__name__}: ")
    assert (says in text) if says else "Debian" not in text


def test_run_with_a_ble_device_without_dbus(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s"\n[broker]\nport = {free_port()}\n[storage]\ndata_dir = "{tmp_path / "d"}"\n'
                      '[[devices]]\nid = "t-1"\ntransport = "ble"\naddress = "A4:C1:38:00:00:01"\n'
                      'protocol = "bthome"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(config), "--seconds", "2"],
                            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "BLE scanner: unavailable" in line]
    assert len(lines) == 1, result.stderr  # once, not once per retry
    assert "(Debian packages: dbus, bluez)" in lines[0]
