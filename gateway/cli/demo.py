"""``iotgw demo``: the gateway on embedded defaults with a simulated fleet of three devices.

- ``pm-1``: an SDS011 particulate sensor on a socat pseudo-terminal pair, read through pyserial;
- ``t-1``: a BTHome v2 temperature/humidity sensor on a simulated radio, decoded by bthome-ble;
- ``co2-1``: an MQTT-native CO2 sensor (paho) publishing JSON over TCP to the embedded broker.

The serial and MQTT devices come from a built-in fleet description (:data:`DEMO_FLEET`, the format
of ``iotgw sim --fleet``). A few faults are switched on so the reject path shows in the counts:
every 10th SDS011 frame has a bad checksum and every 15th MQTT reading is an out-of-range spike.
"""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from drivers.ble.sources import SimulatedRadio
from firmware_sim.ble_sensor import BTHomeSensorSim
from firmware_sim.fleet import Fleet, FleetEnv, FleetSpec, parse_fleet
from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.portal.define import DEMO_PORTAL_FILE

BLE_ADDRESS = "A4:C1:38:00:00:01"
DEMO_FLEET = """
site = "demo"

[[device]]
kind = "sds011"
id = "pm-1"
device_class = "particulate"
[device.faults]
bad_checksum_every = 10

[[device]]
kind = "mqtt"
id = "co2-1"
device_class = "air_quality"
metrics = { co2 = ["ppm", 650.0], temperature = ["°C", 22.0] }
[device.faults]
spike_every = 15
"""


def demo_fleet(interval_s: float = 1.0) -> FleetSpec:
    spec = parse_fleet(tomllib.loads(DEMO_FLEET))
    return replace(spec, devices=tuple(replace(d, options={**d.options, "interval_s": interval_s})
                                       for d in spec.devices))


def _env(config: GatewayConfig) -> FleetEnv:
    host = "127.0.0.1" if config.broker.host in ("0.0.0.0", "::") else config.broker.host  # noqa: S104
    return FleetEnv(config.storage.data_dir / "dev", config.site, host, config.broker.port)


def demo_config(data_dir: Path, mqtt_port: int, *, host: str = "127.0.0.1") -> GatewayConfig:
    raw: dict[str, Any] = {
        "site": "demo",
        "broker": {"host": host, "port": mqtt_port, "allow_anonymous": "loopback"},
        "storage": {"data_dir": str(data_dir)},
        "ble": {"backend": "simulated"},
        "catalog": {"portal_file": str(Path(data_dir) / DEMO_PORTAL_FILE)},  # what the dashboard's portal defines
    }
    fleet = Fleet(demo_fleet(), _env(parse_config(raw)))
    raw["devices"] = [*fleet.gateway_devices(),
                      {"id": "t-1", "transport": "ble", "protocol": "bthome", "address": BLE_ADDRESS,
                       "device_class": "environment"}]
    return parse_config(raw)


@contextlib.asynccontextmanager
async def demo_gateway(
    config: GatewayConfig, *, interval_s: float = 1.0, http_any_port_if_taken: bool = False
) -> AsyncIterator[Gateway]:
    """The simulated fleet around a running gateway; everything stops cleanly on exit."""
    radio = SimulatedRadio()
    fleet = Fleet(demo_fleet(interval_s), _env(config))
    async with contextlib.AsyncExitStack() as stack:
        # Serial devices must exist before the drivers open their ports, as real hardware would.
        stack.push_async_callback(fleet.aclose)
        await fleet.start_local()
        gateway = await stack.enter_async_context(Gateway(
            config, ble_source=radio, http_port_option="--http-port", http_any_port_if_taken=http_any_port_if_taken,
        ))
        await stack.enter_async_context(
            BTHomeSensorSim(address=BLE_ADDRESS, radio=radio, interval_s=interval_s, repeats=2)
        )
        await fleet.start_network(mqtt_port=gateway.broker.port)
        yield gateway
