"""The configured devices that have a driver (serial, Modbus, BLE): their drivers built from config,
each run as a task, restarted by a reload when its settings change; and the raw topic each device's
readings are published on. Devices on MQTT need none of this: they publish to the broker themselves.

One driver per serial or GATT device; one BLE scanner for every advertising device. The BLE stack
(bleak, bthome-ble) loads only when a BLE device is configured.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pydantic import TypeAdapter

from drivers.base import Driver, Sink
from drivers.serial.driver import SerialDriver
from drivers.serial.modbus import RegisterSpec
from drivers.serial.modbus_driver import ModbusDriver
from gateway.config import BleDevice, GatewayConfig, SerialDevice
from gateway.status import BleScannerStatus, DriverStatus
from pipeline.retry import cancel_and_wait
from pipeline.topics import TopicFields, TopicTemplate

if TYPE_CHECKING:
    from drivers.ble.sources import AdvertisementSource

# A BLE scanner's counts have two keys more than a driver's; each model refuses the other's keys.
_DRIVER_STATUS: TypeAdapter[BleScannerStatus | DriverStatus] = TypeAdapter(BleScannerStatus | DriverStatus)


def _serial_driver(device: SerialDevice) -> Driver:
    if device.protocol == "modbus":
        return ModbusDriver(
            device.id, device.port, device.baudrate, unit_id=device.unit_id, poll_interval_s=device.poll_interval_s,
            timeout_s=device.timeout_s, registers=[RegisterSpec(**r.model_dump()) for r in device.registers],
        )
    return SerialDriver(device.id, device.port, device.protocol, device.baudrate,
                        max_clock_skew_s=device.max_clock_skew_s)


def _gatt_driver(device: BleDevice, adapter: str | None) -> Driver:
    from drivers.ble.gatt import GattDriver, GattSpec, GattValueDecoder

    if device.characteristic is None or device.metric is None:  # the config refuses this already
        raise ValueError(f"device {device.id}: protocol gatt needs characteristic and metric")
    decoder = GattValueDecoder(device.metric, device.unit, device.value_format, device.scale, device.offset)
    return GattDriver(GattSpec(device.id, device.address, device.characteristic, decoder, device.mode,
                               device.poll_interval_s, adapter))


def build_drivers(config: GatewayConfig, ble_source: AdvertisementSource | None = None) -> list[Driver]:
    """The drivers of ``config``'s devices; ``ble_source`` replaces the BlueZ scanner (the demo's radio)."""
    devices = config.devices
    drivers: list[Driver] = [_serial_driver(d) for d in devices if isinstance(d, SerialDevice)]
    ble_devices = [d for d in devices if isinstance(d, BleDevice)]
    if ble_devices:
        from drivers.ble.driver import BleDeviceSpec, BleDriver
        from drivers.ble.protocols import or_patterns
        from drivers.ble.sources import BleakSource

        ble = config.ble
        advertisers = [d for d in ble_devices if d.protocol != "gatt"]
        if advertisers:
            specs = {
                d.address: BleDeviceSpec(d.id, d.address, d.protocol, bytes.fromhex(d.bindkey) if d.bindkey else None)
                for d in advertisers
            }
            source = ble_source or BleakSource(
                passive=ble.scanning == "passive", or_patterns=or_patterns({d.protocol for d in advertisers}),
                adapter=ble.adapter,
            )
            drivers.append(BleDriver(specs, source, watchdog_s=ble.watchdog_s))
        drivers += [_gatt_driver(d, ble.adapter) for d in ble_devices if d.protocol == "gatt"]
    return drivers


def driver_settings(config: GatewayConfig) -> dict[str, tuple[object, ...]]:
    """Driver name -> the device settings it runs on (a reload restarts a driver when they change)."""
    groups: dict[str, tuple[object, ...]] = {}
    for d in config.devices:
        if isinstance(d, SerialDevice):
            groups[f"{'modbus' if d.protocol == 'modbus' else 'serial'}:{d.id}"] = (d,)
        elif isinstance(d, BleDevice) and d.protocol == "gatt":
            groups[f"ble-gatt:{d.id}"] = (d, config.ble)
        elif isinstance(d, BleDevice):  # one scanner for every advertising device
            groups["ble"] = (*groups.get("ble", (config.ble,)), d)
    return groups


class Devices:
    """``start(sink)`` runs every driver until ``stop()``; ``reload`` restarts the ones whose settings changed."""

    def __init__(self, config: GatewayConfig, template: TopicTemplate, *,
                 ble_source: AdvertisementSource | None = None) -> None:
        self._config = config
        self._template = template
        self._ble_source = ble_source
        self._device_class = {d.id: config.device_class(d) for d in config.devices}
        self.drivers: list[Driver] = build_drivers(config, ble_source)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sink: Sink | None = None

    def raw_topic(self, device_id: str, metric: str) -> str:
        """Where a driver publishes a device's readings: the raw stage, under the device's class."""
        config = self._config
        return self._template.format(TopicFields(
            stage="raw", version=config.topics.version, site=config.site,
            device_class=self._device_class.get(device_id, "generic"), device_id=device_id, metric=metric,
        ))

    def start(self, sink: Sink) -> None:
        self._sink = sink
        for driver in self.drivers:
            self._start(driver)

    def _start(self, driver: Driver) -> None:
        assert self._sink is not None
        self._tasks[driver.name] = asyncio.create_task(driver.run(self._sink), name=f"driver {driver.name}")

    async def _stop(self, name: str) -> None:
        await cancel_and_wait(self._tasks.pop(name, None))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(*tasks)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks.values())

    async def reload(self, config: GatewayConfig) -> None:
        """Restart the drivers whose device settings changed, start new ones, stop removed ones. The
        new devices' classes come first, so readings of new drivers get their topics."""
        before, after = driver_settings(self._config), driver_settings(config)
        self._config = config
        self._device_class = {d.id: config.device_class(d) for d in config.devices}
        restart = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
        for name in sorted(restart):
            await self._stop(name)
        built = {d.name: d for d in build_drivers(config, self._ble_source)}
        self.drivers = [d for d in self.drivers if d.name not in restart] + [
            built[name] for name in sorted(restart) if name in built
        ]
        if self._sink is not None:
            for name in sorted(restart):
                if name in built:
                    self._start(built[name])

    def serial_driver(self, device_id: str) -> SerialDriver | None:
        """The serial driver of a device (commands are written to its port), if it has one."""
        return next((d for d in self.drivers if isinstance(d, SerialDriver) and d.device_id == device_id), None)

    def rssi(self, device_id: str) -> float | None:
        """RSSI (dBm) as the BLE driver last heard the device (the HTTP API's ``SignalView``)."""
        for driver in self.drivers:
            found = getattr(driver.stats, "rssi", None)
            if isinstance(found, dict) and device_id in found:
                return float(found[device_id])
        return None

    def status(self) -> dict[str, BleScannerStatus | DriverStatus]:
        return {d.name: _DRIVER_STATUS.validate_python(d.stats.as_dict()) for d in self.drivers}
