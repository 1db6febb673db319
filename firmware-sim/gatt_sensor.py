"""A simulated connectable BLE thermometer: one GATT characteristic (default: Temperature 0x2A6E,
sint16 in 0.01 °C) in the simulated BlueZ (firmware_sim.bluez), readable and notifying. It
advertises while nobody is connected, as such sensors do, so a central can find it again.

Same shape as the advertising simulators: ``async with GattSensorSim(address=..., bluez=...)``,
keyword knobs, a ``faults`` Counter. Fault knob: ``disconnect_every`` -- every n-th measurement
the link drops (``faults["disconnect"]``), as when the sensor goes out of range.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections import Counter
from types import TracebackType
from typing import Self

from firmware_sim.bluez import GattPeripheral, MockBlueZ

__all__ = ["ENVIRONMENTAL_SENSING", "TEMPERATURE_CHARACTERISTIC", "GattSensorSim"]

ENVIRONMENTAL_SENSING = "0000181a-0000-1000-8000-00805f9b34fb"
TEMPERATURE_CHARACTERISTIC = "00002a6e-0000-1000-8000-00805f9b34fb"


class GattSensorSim:
    def __init__(
        self, *, address: str, bluez: MockBlueZ, characteristic: str = TEMPERATURE_CHARACTERISTIC,
        interval_s: float = 1.0, value_format: str = "<h", scale: float = 0.01, seed: int | None = None,
        disconnect_every: int = 0, advertise_interval_s: float = 0.1,
    ) -> None:
        self.address = address.upper()
        self._peripheral = GattPeripheral(bluez, self.address, ENVIRONMENTAL_SENSING, characteristic)
        self.interval_s = interval_s
        self.advertise_interval_s = advertise_interval_s
        self.value_format = value_format
        self.scale = scale
        self.disconnect_every = disconnect_every
        self._rng = random.Random(seed)
        self.faults: Counter[str] = Counter()
        self.temperature = 21.0
        self.history: list[float] = []
        self.measurements = 0
        self._tasks: list[asyncio.Task[None]] = []

    def _encode(self, value: float) -> bytes:
        return struct.pack(self.value_format, round(value / self.scale))

    async def __aenter__(self) -> Self:
        self.history.append(self.temperature)
        self._peripheral.install(self._encode(self.temperature))
        self._tasks = [asyncio.create_task(self._firmware(), name=f"sim-gatt-{self.address}"),
                       asyncio.create_task(self._advertiser(), name=f"sim-gatt-adv-{self.address}")]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def connected(self) -> bool:
        return self._peripheral.connected

    async def _advertiser(self) -> None:
        while True:
            if not self._peripheral.connected:
                self._peripheral.advertise()
            await asyncio.sleep(self.advertise_interval_s)

    async def _firmware(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.measurements += 1
            self.temperature = round(min(40.0, max(5.0, self.temperature + self._rng.uniform(-0.3, 0.3))), 2)
            self.history.append(self.temperature)
            self._peripheral.set_value(self._encode(self.temperature))
            if self.disconnect_every and self.measurements % self.disconnect_every == 0 and self.connected:
                self.faults["disconnect"] += 1
                self._peripheral.drop_connection()
