"""Drivers against simulated firmware through the real code paths: pyserial on a pseudo-terminal
for the SDS011, and the BLE driver's BTHome decoding (bthome-ble) fed by a simulated radio."""

from __future__ import annotations

import asyncio
import os
import tty
from pathlib import Path

import pytest
from conftest import until

from drivers.base import DriverReading
from drivers.ble.driver import BleDeviceSpec, BleDriver
from drivers.ble.sources import SimulatedRadio
from drivers.serial.driver import SerialDriver
from firmware_sim.ble_sensor import BTHomeSensorSim
from firmware_sim.bthome import BTHOME_UUID
from firmware_sim.serial_sensor import Sds011Sim


class Collector:
    def __init__(self) -> None:
        self.readings: list[DriverReading] = []
        self.errors: list[tuple[str, str]] = []

    async def reading(self, reading: DriverReading) -> None:
        self.readings.append(reading)

    async def error(self, device_id: str, reason: str, detail: str, raw: bytes) -> None:
        self.errors.append((device_id, reason))


async def test_serial_driver_reads_sds011_over_a_pty_and_counts_bad_checksums(tmp_path: Path) -> None:
    link = tmp_path / "ttySDS011"
    sink = Collector()
    async with Sds011Sim(link, interval_s=0.05, bad_checksum_every=4, seed=1) as sim:
        driver = SerialDriver("pm-1", str(link), "sds011", 9600)
        task = asyncio.create_task(driver.run(sink))
        await until(lambda: driver.stats.frames >= 12 and driver.stats.errors["bad_checksum"] >= 2, 15.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sent_good = [(s.values["pm2_5"], s.values["pm10"]) for s in sim.history if s.intact]
    got = list(zip(
        [r.value for r in sink.readings if r.metric == "pm2_5"],
        [r.value for r in sink.readings if r.metric == "pm10"],
        strict=False,
    ))
    # What the driver decoded is exactly a contiguous run of what the firmware sent intact.
    start = sent_good.index(got[0])
    assert got == sent_good[start:start + len(got)]
    assert {r.unit for r in sink.readings} == {"µg/m³"}
    assert ("pm-1", "bad_checksum") in sink.errors
    assert driver.stats.errors["bad_checksum"] == sum(1 for _, reason in sink.errors if reason == "bad_checksum")


async def test_serial_driver_survives_unplug_and_resumes_on_replug(tmp_path: Path) -> None:
    link = tmp_path / "ttySDS011"
    sink = Collector()
    driver = SerialDriver("pm-1", str(link), "sds011", 9600)
    task = asyncio.create_task(driver.run(sink))
    try:
        async with Sds011Sim(link, interval_s=0.05):
            await until(lambda: driver.stats.frames >= 3, 15.0)
        # Unplugged: the port and its path are gone.
        await until(lambda: not driver.stats.connected, 15.0)
        assert driver.stats.disconnects == 1
        before = driver.stats.frames
        await asyncio.sleep(0.5)
        assert driver.stats.frames == before
        async with Sds011Sim(link, interval_s=0.05):  # replugged on the same path
            await until(lambda: driver.stats.frames >= before + 3, 30)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_ble_driver_decodes_configured_devices_ignores_others_and_suppresses_repeats() -> None:
    radio = SimulatedRadio()
    known, stranger = "A4:C1:38:00:00:01", "A4:C1:38:00:00:99"
    driver = BleDriver({known: BleDeviceSpec("t-1", known, "bthome")}, radio)
    sink = Collector()
    task = asyncio.create_task(driver.run(sink))
    async with BTHomeSensorSim(address=known, radio=radio, interval_s=0.05, repeats=3, seed=2) as sim, \
            BTHomeSensorSim(address=stranger, radio=radio, interval_s=0.05, seed=3):
        await until(lambda: driver.stats.frames >= 8, 15.0)
        radio.push(known, -60, {BTHOME_UUID: b"\x40\x02"})  # a truncated object: an error, not a crash
        await until(lambda: sum(driver.stats.errors.values()) >= 1, 15.0)
        history = {p.packet_id: p.values for p in sim.history}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert {r.device_id for r in sink.readings} == {"t-1"}
    assert driver.stats.skipped["unknown_advertiser"] >= 8
    assert driver.stats.skipped["duplicate"] >= 2 * 8 - 2  # each packet is broadcast three times
    packets = [r.seq for r in sink.readings if r.metric == "temperature"]
    assert len(packets) == len(set(packets)), "a repeated packet was emitted twice"
    for r in sink.readings:
        assert r.seq is not None
        assert abs(r.value - history[r.seq][r.metric]) < 0.011, r
    assert sink.errors
    assert sink.errors[-1][0] == "t-1"


@pytest.mark.parametrize(
    ("protocol", "wire", "expected"),
    [
        pytest.param("jsonlines", b'{"temperature": 21.5, "humidity": 40}\n', {"temperature": 21.5, "humidity": 40.0},
                     id="jsonlines"),
        pytest.param("kv", b"temp=21.5C rh=40\r\n", {"temp": 21.5, "rh": 40.0}, id="kv"),
        pytest.param("nmea", b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n",
                     {"latitude": 48.1173, "altitude": 545.4}, id="nmea-gga"),
    ],
)
async def test_line_and_frame_protocols_through_a_real_pty(
    tmp_path: Path, protocol: str, wire: bytes, expected: dict[str, float]
) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp_path / "ttyDEV"
    link.symlink_to(os.ttyname(slave))
    driver = SerialDriver("dev-1", str(link), protocol, 9600)
    sink = Collector()
    task = asyncio.create_task(driver.run(sink))
    try:
        await until(lambda: driver.stats.connected, 15.0)
        for _ in range(3):
            os.write(master, wire)
            await asyncio.sleep(0.05)
        await until(lambda: driver.stats.frames >= 2, 15.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        os.close(master)
        os.close(slave)
    got = {r.metric: r.value for r in sink.readings}
    for metric, value in expected.items():
        assert got[metric] == pytest.approx(value, abs=1e-4), metric
    assert not sink.errors
