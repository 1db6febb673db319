"""Where BLE advertisements come from: bleak's scanner on a real adapter, or a simulated radio.

The BLE driver holds one of these as its backend (as bleak's facade holds a platform backend), so
the demo and the tests can hand it a simulated radio while production uses BlueZ through bleak.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from drivers.ble.bthome import Advertisement
from pipeline.queue import DropOldestQueue

log = logging.getLogger(__name__)


class AdvertisementSource(Protocol):
    @property
    def dropped(self) -> int: ...

    def advertisements(self) -> AsyncIterator[Advertisement]: ...


class _Buffered:
    """Advertisements in a drop-oldest buffer (an advertisement is a repeated broadcast: the newest
    one carries the current state)."""

    def __init__(self, maxsize: int) -> None:
        self._queue: DropOldestQueue[Advertisement] = DropOldestQueue(maxsize)
        self._offer = self._queue.offer

    @property
    def dropped(self) -> int:
        return self._queue.dropped


class SimulatedRadio(_Buffered):
    """Simulated firmware calls :meth:`push`; the driver iterates :meth:`advertisements`."""

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__(maxsize)

    def push(self, address: str, rssi: int, service_data: Mapping[str, bytes], name: str | None = None) -> None:
        self._offer(Advertisement(address=address.upper(), rssi=rssi, service_data=dict(service_data), name=name))

    async def advertisements(self) -> AsyncIterator[Advertisement]:
        while True:
            yield await self._queue.get()


class BleakSource(_Buffered):
    """BlueZ (or any bleak backend) through :class:`bleak.BleakScanner`: passive scanning where the
    platform supports it, active otherwise."""

    def __init__(self, maxsize: int = 256, *, passive: bool = False) -> None:
        super().__init__(maxsize)
        self._passive = passive

    async def advertisements(self) -> AsyncIterator[Advertisement]:
        from bleak import (
            BleakScanner,  # imported here: hosts without BlueZ can still run the rest
        )
        from bleak.backends.device import BLEDevice
        from bleak.backends.scanner import AdvertisementData

        def detected(device: BLEDevice, data: AdvertisementData) -> None:
            self._offer(Advertisement(
                address=device.address.upper(), rssi=data.rssi, service_data=dict(data.service_data),
                name=data.local_name,
            ))

        async with BleakScanner(detection_callback=detected, scanning_mode="passive" if self._passive else "active"):
            while True:
                yield await self._queue.get()
