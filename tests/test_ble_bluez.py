"""BLE end to end through bleak's real BlueZ backend: simulated firmware advertises into
python-dbusmock's BlueZ on a private system bus (tests/bluez.py), a running Gateway scans it with
BleakScanner, decodes, cleans and stores. Nothing here touches the machine's bus or a radio."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, cast

import pytest
from bluez import ble_config, bluez_fixture, bluez_no_monitor_fixture, stored  # noqa: F401  (fixtures)
from conftest import until

from drivers.ble.driver import BleDriver
from drivers.ble.sources import BleakSource
from firmware_sim.ble_sensor import AtcSim, BleSensorSim, BTHomeSensorSim, RuuviSim
from firmware_sim.bluez import MockBlueZ
from gateway.app import Gateway
from pipeline.store import StoreReader

BTHOME, RUUVI, ATC, STRANGER = "A4:C1:38:00:00:01", "CB:B8:33:4C:88:4F", "A4:C1:38:0D:7E:41", "A4:C1:38:00:00:99"
KEY = "231d39c1d7cc1ab1aee224cd096db932"


def ble_driver(gw: Gateway) -> BleDriver:
    return next(cast(BleDriver, d) for d in gw.devices.drivers if d.name == "ble")


def scanner(gw: Gateway) -> BleakSource:
    source = ble_driver(gw).source
    assert isinstance(source, BleakSource)  # built from the config: bleak's real scanner
    return source


def assert_sent(values: Iterable[float], metric: str, tolerance: float, *sims: BleSensorSim) -> None:
    """Each stored value is one the firmware sent intact and in range (at the format's resolution); a
    spike is in the temperature only."""
    sent = [p.values[metric] for sim in sims for p in sim.history if not (p.spiked and metric == "temperature")]
    for value in values:
        assert any(abs(value - s) <= tolerance for s in sent), (metric, value, sent[-5:])


def counted(counter: Mapping[str, int]) -> int:
    return sum(counter.values())


async def test_configured_device_is_decoded_and_stored_strangers_are_skipped(
    tmp_path: Path, bluez: MockBlueZ
) -> None:
    config = ble_config(tmp_path, [{"id": "t-1", "address": BTHOME, "protocol": "bthome"}])
    async with Gateway(config) as gw:
        source = scanner(gw)
        await until(lambda: source.scanning, 20.0, "the scanner")
        async with BTHomeSensorSim(address=BTHOME, radio=bluez.radio, interval_s=0.05, seed=1) as sim, \
                BTHomeSensorSim(address=STRANGER, radio=bluez.radio, interval_s=0.05, seed=2):
            await until(lambda: gw.store.rows_written >= 15, 20.0, "stored readings")
        stats = ble_driver(gw).stats
        assert source.mode == "passive"  # the mock has BlueZ's advertisement monitor
        assert stats.skipped["unknown_advertiser"] >= 3
        assert stats.rssi["t-1"] in range(-80, -49)
    assert not stats.errors
    with StoreReader(tmp_path) as store:
        assert [d.device_id for d in store.devices()] == ["t-1"]
    temperatures = stored(tmp_path, "t-1", "temperature")
    assert len(temperatures) >= 5
    assert_sent(temperatures, "temperature", 0.006, sim)
    assert_sent(stored(tmp_path, "t-1", "humidity"), "humidity", 0.006, sim)
    assert set(stored(tmp_path, "t-1", "battery")) == {97.0}


async def test_passive_scanning_refused_falls_back_to_active_once(
    tmp_path: Path, bluez_no_monitor: MockBlueZ, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.ble")
    config = ble_config(tmp_path, [{"id": "a-1", "address": ATC, "protocol": "atc"}], watchdog_s=0.5)
    async with Gateway(config) as gw:
        source = scanner(gw)
        driver = ble_driver(gw)
        await until(lambda: source.scanning, 20.0, "the scanner")
        async with AtcSim(address=ATC, radio=bluez_no_monitor.radio, interval_s=0.05, silence_every=5,
                          silence_s=1.2) as sim:
            # The silences make the watchdog restart the scanner: the fallback is not tried again.
            await until(lambda: driver.stats.scanner_restarts >= 2 and driver.stats.frames >= 12, 20.0, "restarts")
        assert source.mode == "active"
    refusals = [r for r in caplog.records if "refused passive" in r.getMessage()]
    assert len(refusals) == 1
    assert sim.faults["silence"] >= 2
    assert_sent(stored(tmp_path, "a-1", "temperature"), "temperature", 0.006, sim)


async def test_watchdog_restarts_a_silent_scanner_and_readings_resume(tmp_path: Path, bluez: MockBlueZ,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.ble")
    config = ble_config(tmp_path, [{"id": "r-1", "address": RUUVI, "protocol": "ruuvi"}], watchdog_s=1.0)
    async with Gateway(config) as gw:
        driver = ble_driver(gw)
        await until(lambda: scanner(gw).scanning, 20.0, "the scanner")
        async with RuuviSim(address=RUUVI, radio=bluez.radio, interval_s=0.05) as first:
            await until(lambda: driver.stats.frames >= 5, 20.0, "first readings")
        assert driver.stats.scanner_restarts == 0
        # The devices fall silent: the scanner is restarted, once per watchdog period.
        await until(lambda: driver.stats.scanner_restarts >= 2, 20.0, "two watchdog restarts")
        before = driver.stats.frames
        async with RuuviSim(address=RUUVI, radio=bluez.radio, interval_s=0.05, seed=5) as second:
            await until(lambda: driver.stats.frames >= before + 5, 20.0, "readings after the restart")
        restarts = driver.stats.scanner_restarts
        assert gw.stats()["drivers"]["ble"]["scanner_restarts"] == restarts
    logged = [r for r in caplog.records if "restarting the scanner" in r.getMessage()]
    assert len(logged) == restarts
    assert_sent(stored(tmp_path, "r-1", "pressure"), "pressure", 0.006, first, second)


async def test_three_protocols_with_faults_are_stored_correctly_and_every_fault_counted(
    tmp_path: Path, bluez: MockBlueZ
) -> None:
    config = ble_config(tmp_path, [
        {"id": "t-1", "address": BTHOME, "protocol": "bthome", "bindkey": KEY},
        {"id": "r-1", "address": RUUVI, "protocol": "ruuvi"},
        {"id": "a-1", "address": ATC, "protocol": "atc"},
    ], watchdog_s=30)
    faults: dict[str, Any] = {"interval_s": 0.04, "duplicate_every": 3, "spike_every": 7, "garble_every": 5,
                              "stuck_every": 11, "stuck_for": 2, "burst_every": 13, "burst_len": 3}
    radio = bluez.radio
    async with Gateway(config) as gw, AsyncExitStack() as stack:
        driver = ble_driver(gw)
        await until(lambda: scanner(gw).scanning, 20.0, "the scanner")
        sims: dict[str, BleSensorSim] = {
            "t-1": BTHomeSensorSim(address=BTHOME, radio=radio, bindkey=bytes.fromhex(KEY), seed=1, **faults),
            "r-1": RuuviSim(address=RUUVI, radio=radio, seed=2, **faults),
            "a-1": AtcSim(address=ATC, radio=radio, layout="atc1441", seed=3, **faults),
        }
        for sim in sims.values():
            await stack.enter_async_context(sim)
        await stack.enter_async_context(BTHomeSensorSim(address=STRANGER, radio=radio, interval_s=0.1, seed=4))
        await until(lambda: all(s.faults["garbled"] >= 2 and s.faults["burst"] >= 1 for s in sims.values()), 20.0,
                    "faults of every kind")
        await stack.aclose()  # the firmware stops; everything it sent is scanned, decoded and stored
        total = {kind: sum(s.faults[kind] for s in sims.values()) for kind in ("duplicate", "garbled", "spike")}
        await until(lambda: counted(driver.stats.errors) == total["garbled"]
                    and driver.stats.skipped["duplicate"] == total["duplicate"], 20.0, "every advertisement handled")
        def clean() -> dict[str, int]:
            rejected: dict[str, int] = gw.stats()["stages"]["clean"]["rejected"]
            return rejected
        spiked = sum(1 for s in sims.values() for p in s.history if p.spiked)
        await until(lambda: clean().get("out_of_range", 0) == spiked, 20.0, "spikes rejected")
        errors = dict(driver.stats.errors)
        skipped = dict(driver.stats.skipped)
    # Garbled payloads are counted by their reason, one per protocol's way of failing.
    assert errors == {"decrypt_failed": sims["t-1"].faults["garbled"], "truncated": sims["r-1"].faults["garbled"],
                      "bad_length": sims["a-1"].faults["garbled"]}
    assert skipped["unknown_advertiser"] >= 1
    assert 3 <= spiked <= total["spike"]  # (a garbled spike is not sent intact)
    assert sims["t-1"].faults["stuck"] >= 2
    with StoreReader(tmp_path) as store:
        assert {d.device_id for d in store.devices()} == {"t-1", "r-1", "a-1"}
    for device, metrics in {"t-1": ("temperature", "humidity", "battery"),
                            "r-1": ("temperature", "humidity", "pressure", "battery_voltage"),
                            "a-1": ("temperature", "humidity", "battery", "battery_voltage")}.items():
        sim = sims[device]
        for metric in metrics:
            values = stored(tmp_path, device, metric)
            in_range = [p for p in sim.history if not (p.spiked and metric == "temperature")]
            assert len(values) == len(in_range), (device, metric)  # every intact packet, once
            assert_sent(values, metric, 0.006, sim)
        assert max(stored(tmp_path, device, "temperature")) < 150  # the spikes were not stored


async def test_wrong_bindkey_in_config_is_a_counted_decode_error_and_nothing_is_stored(
    tmp_path: Path, bluez: MockBlueZ
) -> None:
    wrong = "00" * 16
    config = ble_config(tmp_path, [{"id": "t-1", "address": BTHOME, "protocol": "bthome", "bindkey": wrong}])
    async with Gateway(config) as gw:
        driver = ble_driver(gw)
        await until(lambda: scanner(gw).scanning, 20.0, "the scanner")
        async with BTHomeSensorSim(address=BTHOME, radio=bluez.radio, bindkey=bytes.fromhex(KEY), interval_s=0.05):
            await until(lambda: driver.stats.errors["decrypt_failed"] >= 5, 20.0, "decryption failures")
            await until(lambda: gw.stats()["published"]["rejects"] >= 5, 20.0, "rejects published")
        assert driver.stats.frames == 0
    assert set(driver.stats.errors) == {"decrypt_failed"}
    assert stored(tmp_path, "t-1", "temperature") == []
