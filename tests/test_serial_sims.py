"""Every simulated serial device, with its fault knobs on, through the real serial driver on a socat
pty pair: each injected wire fault is counted once under its reason, and every intact frame decodes
to the values the firmware sent."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import until

from drivers.base import DriverReading
from drivers.serial.driver import SerialDriver
from firmware_sim.serial_sensor import SERIAL_SIMS, SerialSim


class Collector:
    def __init__(self) -> None:
        self.readings: list[DriverReading] = []
        self.errors: Counter[str] = Counter()

    async def reading(self, reading: DriverReading) -> None:
        self.readings.append(reading)

    async def error(self, device_id: str, reason: str, detail: str, raw: bytes) -> None:
        self.errors[reason] += 1


def wire_faults(sim: SerialSim) -> dict[str, int]:
    return {f: 5 - i for i, f in enumerate(("bad_checksum", "truncated", "garbage")) if f in sim.REASONS}


@pytest.mark.parametrize("protocol", sorted(SERIAL_SIMS))
async def test_simulator_faults_match_the_drivers_counters(tmp_path: Path, protocol: str) -> None:
    cls = SERIAL_SIMS[protocol]
    knobs: dict[str, Any] = {f"{'truncate' if f == 'truncated' else f}_every": n
                             for f, n in wire_faults(cls.__new__(cls)).items()}
    knobs |= {"stuck_every": 7, "burst_every": 11, "burst_size": 3}
    if cls.HAS_CLOCK:
        knobs["clock_drift_s"] = 0.7  # offsets 4.9 s, then 5.6 s: clear of the 5 s limit
    link = tmp_path / f"tty-{protocol}"
    sink = Collector()
    sim = cls(link, interval_s=0.03, seed=7, **knobs)
    sim.sleeping = True  # the firmware starts once the port is open: the test counts every fault
    async with sim:
        driver = SerialDriver("d-1", str(link), protocol, sim.baudrate)
        task = asyncio.create_task(driver.run(sink))
        await until(lambda: driver.stats.connected)
        sim.sleeping = False
        await until(lambda: sim.frames_sent >= 40)
        sim.sleeping = True  # the firmware stops after its current burst; the driver reads what is on the line
        sent = -1
        while sent != sim.frames_sent:
            sent = sim.frames_sent
            await asyncio.sleep(0.3)
        want = [r for sent in sim.history for r in sim.readings(sent)]
        await until(lambda: driver.stats.readings >= len(want))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    expected: Counter[str] = Counter()
    for fault, reason in cls.REASONS.items():
        expected[reason] += sim.faults[fault]
        assert sim.faults[fault] > 0, fault
    assert sink.errors == expected
    assert dict(driver.stats.errors) == dict(expected)
    assert sim.faults["stuck"] > 0
    assert sim.faults["burst"] > 0
    # Every intact frame decoded to exactly what the firmware sent, in order.
    got = [(r.metric, r.value) for r in sink.readings]
    assert [m for m, _ in got] == [m for m, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    if cls.HAS_CLOCK:
        assert driver.stats.anomalies["clock_skew"] == sim.faults["clock_drift"] > 0
        assert all(r.device_ts is not None for r in sink.readings)
