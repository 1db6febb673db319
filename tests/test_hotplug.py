"""Hotplug: the serial cable (a socat pty pair) is pulled and plugged back under a running gateway."""

from __future__ import annotations

import asyncio
import logging
import statistics
from pathlib import Path

import pytest
from conftest import free_port, until

from drivers.serial.driver import SerialDriver
from firmware_sim.pty import SocatPair
from firmware_sim.serial_sensor import Sds011Sim
from gateway.app import Gateway
from gateway.config import parse_config
from pipeline.retry import backoff_delay


async def test_socat_pair_links_vanish_on_unplug_and_come_back_on_replug(tmp_path: Path) -> None:
    async with SocatPair(tmp_path / "ttyGW") as pair:
        assert pair.plugged
        assert pair.gateway_path.exists()
        assert pair.device_path.exists()
        assert pair.gateway_path.resolve() != pair.device_path.resolve()
        await pair.unplug()
        assert not pair.plugged
        assert not pair.gateway_path.exists()
        assert not pair.device_path.exists()
        await pair.replug()
        assert pair.plugged
        assert pair.gateway_path.exists()
    assert not pair.gateway_path.exists()
    assert pair.unplugs == 1


async def test_killing_socat_under_a_running_gateway(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.serial.driver")
    link = tmp_path / "dev" / "ttyUSB-pm-1"
    config = parse_config({
        "site": "s1", "broker": {"port": free_port(), "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")},
        "pipeline": {"max_latency_s": 0.05},
        "devices": [{"id": "pm-1", "transport": "serial", "protocol": "sds011", "port": str(link)}],
    })
    async with Sds011Sim(link, interval_s=0.05, seed=3) as sim, Gateway(config) as gw:
        driver = gw.devices.drivers[0]
        assert isinstance(driver, SerialDriver)
        await until(lambda: driver.stats.frames >= 5 and gw.store.rows_written >= 6, what="first readings")
        await sim.unplug()  # socat killed: the port vanishes under the open driver
        await until(lambda: not driver.stats.connected, what="the driver to notice the unplug")
        assert driver.stats.disconnects == 1
        frames = driver.stats.frames
        await asyncio.sleep(1.0)  # the driver retries meanwhile; nothing arrives and nothing crashes
        assert driver.stats.frames == frames
        await sim.replug()
        await until(lambda: driver.stats.connected and driver.stats.frames >= frames + 5, what="readings to resume")
        stored = gw.store.rows_written
        await until(lambda: gw.store.rows_written > stored, what="resumed readings to be stored")
        assert all(not t.done() for t in gw.tasks), "a gateway task ended"
        stats = gw.stats()["drivers"]["serial:pm-1"]
    assert stats["disconnects"] == 1
    assert stats["errors"] == {}
    messages = [r.getMessage() for r in caplog.records if "pm-1" in r.getMessage()]
    assert sum("unavailable" in m for m in messages) == 1, messages  # the outage, logged once
    assert sum("recovered" in m for m in messages) == 1, messages  # and the recovery, once


def test_backoff_is_capped_and_jittered() -> None:
    for attempt in (1, 3, 8, 30, 1000):
        samples = [backoff_delay(attempt, cap_s=5.0) for _ in range(400)]
        assert all(0 <= s <= min(5.0, 1.5 ** attempt) for s in samples), attempt
        assert len(set(samples)) > 300, "no jitter"
        assert statistics.pstdev(samples) > 0.1 * min(5.0, 1.5 ** attempt)
    assert max(backoff_delay(10_000) for _ in range(1000)) <= 30.0
