"""A simulated BlueZ for BLE tests: python-dbusmock's ``bluez5`` template on a private system bus
with adapter hci0 (firmware_sim.bluez.MockBlueZ), so bleak's real BlueZ backend runs against it.

A test module imports the fixtures it uses::

    from bluez import bluez_fixture, bluez_no_monitor_fixture  # noqa: F401  (pytest fixtures)

``bluez.radio.push(address, rssi, service_data, manufacturer_data=...)`` "advertises": the first
push of an address adds its ``org.bluez.Device1`` object (``InterfacesAdded``), later ones update
its properties. ``DBUS_SYSTEM_BUS_ADDRESS`` points at the private bus for the test (bleak reads it)
and is restored afterwards. Skipped where ``dbus-daemon`` is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from firmware_sim.bluez import MockBlueZ
from gateway.config import GatewayConfig, parse_config
from pipeline.store import StoreReader


def _mock(passive: bool) -> Iterator[MockBlueZ]:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed (Debian package dbus)")
    with MockBlueZ(passive=passive) as bluez:
        yield bluez


@pytest.fixture(name="bluez")
def bluez_fixture() -> Iterator[MockBlueZ]:
    """BlueZ with the advertisement-monitor API: passive scanning works."""
    yield from _mock(passive=True)


@pytest.fixture(name="bluez_no_monitor")
def bluez_no_monitor_fixture() -> Iterator[MockBlueZ]:
    """BlueZ without the advertisement-monitor API (no ``--experimental``): passive is refused."""
    yield from _mock(passive=False)


# -- helpers for tests that run a Gateway against the simulated BlueZ ----------------------------


def ble_config(tmp_path: Path, devices: list[dict[str, Any]], **ble: Any) -> GatewayConfig:
    return parse_config({
        "site": "s1", "gateway_id": "gw-ble",
        "broker": {"host": "127.0.0.1", "port": free_port(), "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path)},
        "pipeline": {"max_latency_s": 0.05},
        "ble": ble,
        "devices": [{"transport": "ble", "device_class": "environment"} | d for d in devices],
    })


def stored(tmp_path: Path, device: str, metric: str) -> list[float]:
    with StoreReader(tmp_path) as store:
        series = store.series(device, metric)
    return [] if series is None else [value for _, value in series[1]]
