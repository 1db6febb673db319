"""Where BLE advertisements come from: bleak's scanner on a real adapter, or a simulated radio.

The BLE driver holds one of these as its backend (as bleak's facade holds a platform backend), so
the demo and the tests can hand it a simulated radio while production uses BlueZ through bleak.
Each call of :meth:`AdvertisementSource.advertisements` is one scan; closing the generator stops
it (the driver's watchdog restarts a scanner that way).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from drivers.ble.advert import Advertisement
from pipeline.queue import DropOldestQueue

if TYPE_CHECKING:
    from bleak import BleakScanner
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

log = logging.getLogger(__name__)

ScanMode = Literal["passive", "active"]


class AdvertisementSource(Protocol):
    @property
    def dropped(self) -> int: ...

    def advertisements(self) -> AsyncGenerator[Advertisement, None]: ...


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

    def push(
        self, address: str, rssi: int, service_data: Mapping[str, bytes], name: str | None = None,
        manufacturer_data: Mapping[int, bytes] | None = None,
    ) -> None:
        self._offer(Advertisement(
            address=address.upper(), rssi=rssi, service_data=dict(service_data), name=name,
            manufacturer_data=dict(manufacturer_data or {}),
        ))

    async def advertisements(self) -> AsyncGenerator[Advertisement, None]:
        while True:
            yield await self._queue.get()


class BleakSource(_Buffered):
    """BlueZ (or any bleak backend) through :class:`bleak.BleakScanner`.

    Passive scanning needs BlueZ's advertisement monitor (BlueZ >= 5.56 started with
    ``--experimental``) and is asked for with ``or_patterns`` that match the configured protocols.
    When the adapter refuses it and active scanning works, the source logs that once and scans
    actively from then on. ``mode`` is the mode of the running (or last) scan.
    """

    def __init__(
        self, maxsize: int = 256, *, passive: bool = True, or_patterns: Sequence[tuple[int, int, bytes]] = (),
        adapter: str | None = None,
    ) -> None:
        super().__init__(maxsize)
        self._patterns = list(or_patterns)
        self.mode: ScanMode = "passive" if passive and self._patterns else "active"
        self._adapter = adapter
        self.scanning = False

    def _detected(self, device: BLEDevice, data: AdvertisementData) -> None:
        self._offer(Advertisement(
            address=device.address.upper(), rssi=data.rssi, service_data=dict(data.service_data),
            name=data.local_name, manufacturer_data=dict(data.manufacturer_data),
        ))

    async def _start(self, mode: ScanMode) -> BleakScanner:
        from bleak import BleakScanner  # imported here: hosts without BlueZ can still run the rest
        from bleak.args.bluez import BlueZScannerArgs, OrPattern
        from bleak.assigned_numbers import AdvertisementDataType

        bluez: BlueZScannerArgs = {}
        if self._adapter is not None:
            bluez["adapter"] = self._adapter
        if mode == "passive":
            bluez["or_patterns"] = [OrPattern(s, AdvertisementDataType(t), c) for s, t, c in self._patterns]
        scanner = BleakScanner(detection_callback=self._detected, scanning_mode=mode, bluez=bluez)
        await scanner.start()
        return scanner

    async def _start_any(self) -> BleakScanner:
        from bleak.exc import BleakBluetoothNotAvailableError, BleakError

        if self.mode == "passive":
            try:
                return await self._start("passive")
            except BleakBluetoothNotAvailableError:
                raise
            except BleakError as refused:
                scanner = await self._start("active")  # fails too: Bluetooth is down, not passive mode
                self.mode = "active"
                log.warning("BLE: the adapter refused passive scanning (%s); scanning actively", refused)
                return scanner
        return await self._start("active")

    async def advertisements(self) -> AsyncGenerator[Advertisement, None]:
        scanner = await self._start_any()
        self.scanning = True
        try:
            while True:
                yield await self._queue.get()
        finally:
            self.scanning = False
            await scanner.stop()
