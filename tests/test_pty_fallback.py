"""Serial simulators without socat: the cable made in Python (two pseudo-terminals joined by the event
loop), through pyserial and the real serial driver; unplugging it is refused with a line naming socat."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import serial
from conftest import until
from test_serial_sims import Collector

from drivers.serial.driver import SerialDriver
from firmware_sim.pty import PtyPair, SocatError, SocatPair, serial_cable
from firmware_sim.serial_sensor import Sds011Sim


@pytest.fixture
def no_socat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH on which socat cannot be found (nothing else is looked up on it here)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


async def test_python_pty_pair_carries_bytes_both_ways(tmp_path: Path) -> None:
    async with PtyPair(tmp_path / "ttyGW") as pair:
        assert pair.plugged
        assert pair.gateway_path.resolve() != pair.device_path.resolve()
        assert pair.gateway_path.resolve().is_char_device()
        device = os.open(pair.device_path, os.O_RDWR | os.O_NOCTTY)
        port = serial.Serial(str(pair.gateway_path), 9600, timeout=5)
        try:
            frame = b"\xaa\xc0 from the device \x00\xff\xab"
            os.write(device, frame)
            assert await asyncio.to_thread(port.read, len(frame)) == frame
            port.write(b"\r\nto the device\n")  # raw: no CR/LF translation, no echo back
            got = b""
            while len(got) < 16:
                got += await asyncio.to_thread(os.read, device, 64)
            assert got == b"\r\nto the device\n"
            port.close()
            port.open()  # the gateway closes and reopens its end: the cable is still there
            os.write(device, b"again")
            assert await asyncio.to_thread(port.read, 5) == b"again"
        finally:
            port.close()
            os.close(device)
    assert not pair.gateway_path.exists()
    assert not pair.device_path.exists()


async def test_python_pty_pair_cannot_be_unplugged(tmp_path: Path) -> None:
    async with PtyPair(tmp_path / "ttyGW") as pair:
        with pytest.raises(SocatError, match=r"needs socat.*\(Debian package: socat\)"):
            await pair.unplug()
        assert pair.plugged


@pytest.mark.usefixtures("no_socat")
def test_serial_cable_falls_back_without_socat(tmp_path: Path) -> None:
    assert isinstance(serial_cable(tmp_path / "tty"), PtyPair)
    with pytest.raises(SocatError, match=r"socat is not installed \(Debian package: socat\)"):
        serial_cable(tmp_path / "tty", unplugs=True)
    with pytest.raises(SocatError, match="needs socat"):  # a fault that unplugs is refused up front
        Sds011Sim(tmp_path / "tty", unplug_every=5)


def test_serial_cable_is_socat_when_installed(tmp_path: Path) -> None:
    if not any((Path(d) / "socat").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("socat is not installed")
    assert isinstance(serial_cable(tmp_path / "tty", unplugs=True), SocatPair)


@pytest.mark.usefixtures("no_socat")
async def test_simulated_sds011_through_the_serial_driver_without_socat(tmp_path: Path) -> None:
    link = tmp_path / "dev" / "ttyUSB-pm-1"
    sink = Collector()
    async with Sds011Sim(link, interval_s=0.05, seed=3, bad_checksum_every=4) as sim:
        assert isinstance(sim.pair, PtyPair)
        driver = SerialDriver("pm-1", str(link), "sds011", sim.baudrate)
        task = asyncio.create_task(driver.run(sink))
        try:
            await until(lambda: driver.stats.readings >= 10 and sink.errors["bad_checksum"] >= 1,
                        what="readings and a bad checksum through the Python pty pair")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert {r.metric for r in sink.readings} == {"pm2_5", "pm10"}
