"""``iotgw demo``: the gateway on embedded defaults with a simulated fleet of three devices.

- ``pm-1``: an SDS011 particulate sensor on a pseudo-terminal, read through pyserial;
- ``t-1``: a BTHome v2 temperature/humidity sensor on a simulated radio, decoded by bthome-ble;
- ``co2-1``: an MQTT-native CO2 sensor (paho) publishing JSON over TCP to the embedded broker.

A few faults are switched on so the reject path shows in the counts: every 10th SDS011 frame has a
bad checksum and every 15th MQTT reading is an out-of-range spike.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from drivers.ble.sources import SimulatedRadio
from firmware_sim.ble_sensor import BTHomeSensorSim
from firmware_sim.mqtt_sensor import MqttSensorSim
from firmware_sim.serial_sensor import Sds011Sim
from gateway.config import GatewayConfig, parse_config
from gateway.service import Gateway

BLE_ADDRESS = "A4:C1:38:00:00:01"


def demo_config(data_dir: Path, mqtt_port: int, *, host: str = "127.0.0.1") -> GatewayConfig:
    raw: dict[str, Any] = {
        "site": "demo",
        "broker": {"host": host, "port": mqtt_port},
        "storage": {"data_dir": str(data_dir)},
        "ble": {"backend": "simulated"},
        "devices": [
            {"id": "pm-1", "transport": "serial", "protocol": "sds011", "baudrate": 9600,
             "port": str(data_dir / "dev" / "ttySDS011-pm-1"), "device_class": "particulate"},
            {"id": "t-1", "transport": "ble", "protocol": "bthome", "address": BLE_ADDRESS,
             "device_class": "environment"},
            {"id": "co2-1", "transport": "mqtt", "device_class": "air_quality"},
        ],
    }
    return parse_config(raw)


@contextlib.asynccontextmanager
async def demo_gateway(
    config: GatewayConfig, *, interval_s: float = 1.0, http_any_port_if_taken: bool = False
) -> AsyncIterator[Gateway]:
    """The simulated fleet around a running gateway; everything stops cleanly on exit."""
    serial_device = next(d for d in config.devices if d.transport == "serial")
    radio = SimulatedRadio()
    async with contextlib.AsyncExitStack() as stack:
        # The serial "device" must exist before the driver opens its port, as real hardware would.
        await stack.enter_async_context(
            Sds011Sim(Path(serial_device.port), interval_s=interval_s, bad_checksum_every=10)
        )
        gateway = await stack.enter_async_context(Gateway(
            config, ble_source=radio, http_port_option="--http-port", http_any_port_if_taken=http_any_port_if_taken,
        ))
        await stack.enter_async_context(BTHomeSensorSim(BLE_ADDRESS, radio.push, interval_s=interval_s))
        co2_topics = {
            "co2": (gateway.raw_topic("co2-1", "co2"), "ppm", 650.0),
            "temperature": (gateway.raw_topic("co2-1", "temperature"), "°C", 22.0),
        }
        await stack.enter_async_context(MqttSensorSim(
            "co2-1", "127.0.0.1" if config.broker.host in ("0.0.0.0", "::") else config.broker.host,  # noqa: S104
            gateway.broker.port,
            co2_topics, status_topic=f"status/{config.site}/co2-1", interval_s=interval_s, spike_every=15,
        ))
        yield gateway
