"""GATT through bleak's real BleakClient (BlueZ backend) against a simulated connectable sensor in
python-dbusmock's BlueZ (tests/bluez.py): poll and notify, reconnect after the link drops, and the
pure value decoder."""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path
from typing import Any, cast

import pytest
from bluez import ble_config, bluez_fixture, stored  # noqa: F401  (pytest fixture)
from conftest import until
from hypothesis import given
from hypothesis import strategies as st

from drivers.ble.advert import BleReading
from drivers.ble.gatt import GattDriver, GattValueDecoder
from drivers.reading import FrameError, Measurement
from firmware_sim.bluez import MockBlueZ
from firmware_sim.gatt_sensor import TEMPERATURE_CHARACTERISTIC, GattSensorSim
from gateway.app import Gateway

ADDRESS = "C0:FF:EE:00:00:01"


def gatt_device(**fields: Any) -> dict[str, Any]:
    return {"id": "g-1", "address": ADDRESS, "protocol": "gatt", "characteristic": "2a6e",
            "metric": "temperature", "unit": "°C", "value_format": "<h", "scale": 0.01} | fields


def gatt_driver(gw: Gateway) -> GattDriver:
    return next(cast(GattDriver, d) for d in gw.devices.drivers if d.name == "ble-gatt:g-1")


@pytest.mark.parametrize("mode", ["notify", "poll"])
async def test_gatt_reads_and_reconnects_after_the_link_drops(
    tmp_path: Path, bluez: MockBlueZ, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.ble.gatt")
    config = ble_config(tmp_path, [gatt_device(mode=mode, poll_interval_s=0.05)])
    async with GattSensorSim(address=ADDRESS, bluez=bluez, interval_s=0.05, disconnect_every=15, seed=1) as sim, \
            Gateway(config) as gw:
        driver = gatt_driver(gw)
        await until(lambda: driver.stats.disconnects >= 2 and driver.connects >= 3 and driver.stats.frames >= 20,
                    25, "two reconnects")
    assert sim.faults["disconnect"] >= 2
    assert driver.stats.disconnects <= sim.faults["disconnect"]
    assert not driver.stats.errors
    values = stored(tmp_path, "g-1", "temperature")
    assert len(values) >= 15
    for value in values:
        assert any(abs(value - sent) < 0.001 for sent in sim.history), value
    # Each outage is logged when it starts and when it ends, not per retry.
    downs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    ups = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(downs) >= 2
    assert len(ups) >= 2
    assert len(downs) - len(ups) in (0, 1)


def test_gatt_characteristic_uuid_is_normalised_by_the_config(tmp_path: Path) -> None:
    config = ble_config(tmp_path, [gatt_device()])
    device = config.devices[0]
    assert getattr(device, "characteristic", None) == TEMPERATURE_CHARACTERISTIC


@pytest.mark.parametrize(
    ("decoder", "data", "expected"),
    [
        pytest.param(GattValueDecoder("temperature", "°C", "<h", 0.01), b"\x66\x08",
                     BleReading(None, (Measurement("temperature", 21.5, "°C"),)), id="sint16-0.01"),
        pytest.param(GattValueDecoder("temperature", "°C", "<h", 0.01), b"\x18\xfc",
                     BleReading(None, (Measurement("temperature", -10.0, "°C"),)), id="negative"),
        pytest.param(GattValueDecoder("pressure", "hPa", "<I", 0.001), struct.pack("<I", 1013250),
                     BleReading(None, (Measurement("pressure", 1013.25, "hPa"),)), id="uint32"),
        pytest.param(GattValueDecoder("level", None, "B", 1, -40), b"\x64",
                     BleReading(None, (Measurement("level", 60.0, None),)), id="offset"),
    ],
)
def test_gatt_value_decoder(decoder: GattValueDecoder, data: bytes, expected: BleReading) -> None:
    result = decoder.decode(data)
    assert isinstance(result, BleReading)
    assert result.packet_id is None
    assert [(m.metric, m.unit) for m in result.measurements] == [(m.metric, m.unit) for m in expected.measurements]
    assert result.measurements[0].value == pytest.approx(expected.measurements[0].value)


def test_gatt_value_decoder_errors() -> None:
    decoder = GattValueDecoder("t", None, "<h")
    assert decoder.decode(b"\x01") == FrameError("bad_length", "1 bytes, <h has 2")
    nan = GattValueDecoder("t", None, "<f").decode(struct.pack("<f", math.nan))
    assert isinstance(nan, FrameError)
    assert nan.reason == "bad_value"


@given(data=st.binary(max_size=12), fmt=st.sampled_from(["<h", "<H", "<i", "<f", "<d", "B", ">q"]))
def test_gatt_value_decoder_never_raises(data: bytes, fmt: str) -> None:
    result = GattValueDecoder("m", None, fmt, 0.5).decode(data)
    assert isinstance(result, BleReading | FrameError)
