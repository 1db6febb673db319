"""The installed package, as users install it: run by ./scripts/test-installed with the Python of a fresh
venv that holds the wheel (installed, not editable), from a directory outside the checkout. The checkout
(``$IOTGW_CHECKOUT``) is only read, as text: the modules and data files its source tree has, and the
README whose commands are run here as a newcomer would run them.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import pkgutil
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHECKOUT = Path(os.environ.get("IOTGW_CHECKOUT", "/nonexistent")).resolve()
WHEEL = Path(os.environ.get("IOTGW_WHEEL", "/nonexistent"))
PACKAGES = {"gateway": "gateway", "drivers": "drivers", "pipeline": "pipeline", "firmware_sim": "firmware-sim"}
BIN = Path(sys.executable).parent
IOTGW = BIN / "iotgw"
DEMO_SECONDS = "10"
DEVICES = {"pm-1": "serial", "t-1": "ble", "co2-1": "mqtt"}

if not (CHECKOUT / "README.md").exists():
    pytest.exit("run these with ./scripts/test-installed (it sets IOTGW_CHECKOUT and installs the wheel)", 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(args: list[str], cwd: Path, *, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def readme_block(heading: str, index: int = 0) -> list[str]:
    """The shell commands of the ``index``-th ```sh block under ``heading``, comments and line
    continuations dropped, ``a && b`` split into two."""
    text = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)[index]
    commands = []
    for raw in block.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands += [c.strip() for c in line.split("&&")]
    return commands


def iotgw_command(command: str, prefix: str) -> list[str]:
    """``PREFIX/iotgw ARGS`` from the README, as a command for the installed ``iotgw``."""
    words = shlex.split(command)
    assert words[0] == f"{prefix}/iotgw", command
    return [str(IOTGW), *words[1:]]


# -- the installed copy ---------------------------------------------------------------------------------------


def test_the_installed_copy_is_tested_not_the_checkout() -> None:
    import gateway  # noqa: PLC0415  imported here, where the test says which copy it finds

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    module = Path(gateway.__file__ or "").resolve()
    assert module.is_relative_to(site), module
    assert site.is_relative_to(Path(sys.prefix).resolve())
    assert sys.prefix != sys.base_prefix  # a venv
    assert not module.is_relative_to(CHECKOUT)
    assert not Path.cwd().resolve().is_relative_to(CHECKOUT)
    assert not list(site.glob("__editable__*")), "an editable install: it would read the checkout"
    assert IOTGW.exists()


def source_modules() -> set[str]:
    found = set()
    for package, directory in PACKAGES.items():
        root = CHECKOUT / directory
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found.add(".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts)))
    return found


def test_every_module_of_the_source_tree_is_installed_and_imports() -> None:
    installed: set[str] = set()
    broken: dict[str, str] = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        installed.add(package)
        for info in pkgutil.walk_packages(module.__path__, package + ".",
                                          onerror=lambda name: broken.setdefault(name, "cannot import")):
            installed.add(info.name)
    source = source_modules()
    assert source - installed == set(), "modules in the source tree but not in the wheel"
    assert installed - source == set(), "modules in the wheel but not in the source tree"
    for name in sorted(installed):
        if name.endswith(".__main__"):
            continue  # `python -m gateway` runs the CLI: importing it would too (test_help_of_every_command runs it)
        try:
            importlib.import_module(name)
        except Exception as exc:  # every failure, not only the first
            broken[name] = f"{type(exc).__name__}: {exc}"
    assert broken == {}


def test_package_data_is_installed() -> None:
    """Every tracked file of the package directories that is not Python (the sample config, the
    dashboard, py.typed) is in the installed copy, byte for byte."""
    listed = run(["git", "ls-files", *PACKAGES.values()], CHECKOUT) if shutil.which("git") else None
    if listed is not None and listed.returncode == 0:
        files = [CHECKOUT / line for line in listed.stdout.splitlines()]
    else:  # not a git checkout: everything on disk
        files = [p for d in PACKAGES.values() for p in (CHECKOUT / d).rglob("*") if p.is_file()]
    data = [p for p in files if p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(p.name == "sample-config.toml" for p in data)
    assert any(p.name == "app.js" for p in data)
    directories = {directory: package for package, directory in PACKAGES.items()}
    for path in data:
        relative = path.relative_to(CHECKOUT)
        package = directories[relative.parts[0]]
        installed = importlib.resources.files(package).joinpath(*relative.parts[1:])
        assert installed.is_file(), f"{relative} is not in the installed package {package}"
        assert installed.read_bytes() == path.read_bytes(), relative


def test_help_of_every_command(tmp_path: Path) -> None:
    result = run([str(IOTGW), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    commands = ["demo", "run", "sim", "check-config", "passwd", "devices", "query", "catalog", "service"]
    for command in commands:
        assert command in result.stdout
        sub = run([str(IOTGW), command, "--help"], tmp_path)
        assert sub.returncode == 0, (command, sub.stderr)
        assert "usage: iotgw" in sub.stdout
    assert run([str(IOTGW), "service", "install", "--help"], tmp_path).returncode == 0
    assert run([sys.executable, "-m", "gateway", "--help"], tmp_path).returncode == 0


def test_check_config_on_the_installed_sample(tmp_path: Path) -> None:
    sample = importlib.resources.files("gateway").joinpath("sample-config.toml")
    assert isinstance(sample, Path)
    result = run([str(IOTGW), "check-config", str(sample)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("valid (4 device(s))")


# -- the README's first run, and the demo without socat ---------------------------------------------------------


@dataclass
class Demo:
    cwd: Path
    args: list[str]
    proc: subprocess.Popen[str]
    out: str = ""
    err: str = ""

    def finish(self, timeout: float) -> Demo:
        self.out, self.err = self.proc.communicate(timeout=timeout)
        return self


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Demo]]:
    """Two demos at once (the machine has two cores): the README's command in a fresh directory, as a
    newcomer runs it, and one on a machine without socat (an empty PATH: nothing but Python)."""
    first_run = readme_block("## Run it (embedded defaults, simulated devices)")
    assert first_run[:2] == ["python3 -m venv .venv", ".venv/bin/pip install ."], (
        "the README's install is this stage's: a venv and a non-editable install of the package")
    demo_command = iotgw_command(first_run[2], ".venv/bin")
    assert demo_command[1:3] == ["demo", "--seconds"], first_run[2]
    assert len(demo_command) == 4, first_run[2]
    # Shorter, and on free ports (1883 and 8080 may be taken on a shared machine).
    demo_command[3] = DEMO_SECONDS
    demo_command += ["--mqtt-port", str(free_port()), "--http-port", "0"]
    readme_dir = tmp_path_factory.mktemp("fresh-clone")
    no_socat = tmp_path_factory.mktemp("no-socat")
    (no_socat / "empty-bin").mkdir()
    started = {
        "readme": Demo(readme_dir, demo_command, subprocess.Popen(
            demo_command, cwd=readme_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)),
        "no_socat": Demo(no_socat, [], subprocess.Popen(
            [str(IOTGW), "demo", "--seconds", DEMO_SECONDS, "--data-dir", "data", "--mqtt-port", str(free_port()),
             "--http-port", "0"], cwd=no_socat, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PATH": str(no_socat / "empty-bin")})),
    }
    try:
        yield {name: demo.finish(timeout=120) for name, demo in started.items()}
    finally:
        for demo in started.values():
            if demo.proc.poll() is None:
                demo.proc.kill()
                demo.proc.communicate()


def stored_devices(data_dir: Path, cwd: Path) -> dict[str, str]:
    result = run([str(IOTGW), "devices", "--data-dir", str(data_dir), "--format", "json"], cwd)
    assert result.returncode == 0, result.stderr
    return {d["device_id"]: d["transport"] for d in json.loads(result.stdout)}


def test_readme_first_run(demos: dict[str, Demo]) -> None:
    demo = demos["readme"]
    assert demo.proc.returncode == 0, demo.err
    assert "Traceback" not in demo.err
    assert "  dashboard: http://127.0.0.1:" in demo.out
    assert int(demo.out.split("stored=")[1].split()[0]) > 0
    assert stored_devices(demo.cwd / "iotgw-data", demo.cwd) == DEVICES  # serial, BLE and MQTT readings

    # "Then ask the store:" the README's next two commands, verbatim, in the same directory
    devices, query = (iotgw_command(c, ".venv/bin") for c in readme_block("## Run it (embedded defaults, "
                                                                            "simulated devices)", 1))
    listed = run(devices, demo.cwd)
    assert listed.returncode == 0, listed.stderr
    for device, transport in DEVICES.items():
        assert re.search(rf"^{device}\s+{transport}\s", listed.stdout, re.MULTILINE), listed.stdout
    answered = run(query, demo.cwd)
    assert answered.returncode == 0, answered.stderr
    rows = [line.split() for line in answered.stdout.splitlines()]
    assert len(rows) >= 2, answered.stdout  # 5 s buckets over a 10 s demo
    for ts, value in rows:
        assert ts.endswith("Z")
        assert 0 < float(value) < 60
        assert len(value.replace("-", "").replace(".", "")) <= 12, value  # no binary noise (21.449999999999996)


def test_demo_without_socat_uses_python_pseudo_terminals(demos: dict[str, Demo]) -> None:
    demo = demos["no_socat"]
    assert demo.proc.returncode == 0, demo.err
    assert "Traceback" not in demo.err
    assert "socat is not installed (Debian package: socat)" in demo.err  # said once, as information
    assert "Python pseudo-terminals" in demo.err
    assert stored_devices(demo.cwd / "data", demo.cwd) == DEVICES
    points = run([str(IOTGW), "query", "--data-dir", "data", "--device", "pm-1", "--metric", "pm2_5", "--format",
                  "json"], demo.cwd)
    assert points.returncode == 0, points.stderr
    assert len(json.loads(points.stdout)) >= 3


def test_catalog_after_the_demo(demos: dict[str, Demo]) -> None:
    demo = demos["readme"]
    table = run([str(IOTGW), "catalog", "--data-dir", "iotgw-data"], demo.cwd)
    assert table.returncode == 0, table.stderr
    assert "io.iotgw.telemetry.reading.v1" in table.stdout
    assert "driver:pm-1" in table.stdout  # a producer learned while the demo ran
    document = run([str(IOTGW), "catalog", "--data-dir", "iotgw-data", "--format", "asyncapi"], demo.cwd)
    assert document.returncode == 0, document.stderr
    assert json.loads(document.stdout)["asyncapi"].startswith("3.")


# -- the Raspberry Pi section -------------------------------------------------------------------------------------


def test_readme_wheel_is_the_one_built_here() -> None:
    [build] = readme_block("## Run as a service", 0)
    assert build == ".venv/bin/pip wheel --no-deps -w dist ."  # what scripts/test-installed runs, into its dir
    install = readme_block("## Run as a service", 1)[:2]
    assert install == ["python3 -m venv /opt/iotgw", f"/opt/iotgw/bin/pip install ./{WHEEL.name}"], (
        "the README's Pi install names the wheel this checkout builds")


@pytest.mark.skipif(os.geteuid() != 0, reason="service install hands /etc/iotgw to the service's group: root")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers (Debian: systemd)")
def test_readme_raspberry_pi_section(tmp_path: Path) -> None:
    """The section's commands after the install, run against a temporary system image (--root; no systemd
    runs as PID 1 here): the unit runs this venv's iotgw, and the example config it writes is valid."""
    image = tmp_path / "image"
    ran = []
    for command in readme_block("## Run as a service", 1)[2:]:
        if command.startswith(("sudoedit ", "systemctl ", "journalctl ")):
            continue  # an editor, and systemd itself
        args = [a.replace("/etc/", f"{image}/etc/") for a in iotgw_command(command, "/opt/iotgw/bin")]
        if args[1:3] == ["service", "install"]:
            args += ["--root", str(image), "--no-reload"]
        result = run(args, tmp_path)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        ran.append(args[1])
    assert ran == ["service", "check-config"]
    unit = (image / "etc/systemd/system/iotgw.service").read_text()
    assert f"ExecStart={IOTGW} run --config /etc/iotgw/iotgw.toml --data-dir /var/lib/iotgw" in unit
    assert "User=iotgw" in unit.splitlines()
    if shutil.which("systemd-analyze"):
        verified = run(["systemd-analyze", "verify", str(image / "etc/systemd/system/iotgw.service")], tmp_path)
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout + verified.stderr == ""


def test_missing_system_tool_is_one_line(tmp_path: Path) -> None:
    """From the installed copy too: no systemd-sysusers on PATH is one line naming the package."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = run([str(IOTGW), "service", "install", "--root", str(tmp_path / "image"), "--no-reload"], tmp_path,
                 env={**os.environ, "PATH": str(empty)})
    assert result.returncode == 1
    assert result.stderr.strip() == "iotgw: error: systemd-sysusers is not installed (Debian package: systemd)"
