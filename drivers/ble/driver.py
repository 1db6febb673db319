"""The BLE driver: one per adapter. Takes advertisements from its source, keeps the configured
devices, decodes each with its protocol's decoder (drivers/ble/protocols.py) and suppresses
repeated packets (same packet id).

A watchdog restarts the scan when no advertisement at all has arrived for ``watchdog_s`` (BlueZ is
known to stop reporting while claiming to discover); a scan that fails to start is retried with
capped, jittered backoff, its outage logged once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers.base import DriverReading, DriverStats, Sink
from drivers.ble.advert import Advertisement, AdvertisementDecoder
from drivers.ble.protocols import PROTOCOLS
from drivers.ble.sources import AdvertisementSource
from drivers.reading import FrameError
from pipeline.retry import StateLog, backoff_delay

log = logging.getLogger(__name__)


def scanner_failure(exc: Exception) -> str:
    """Why the scanner failed, naming the Debian package when the system lacks D-Bus or BlueZ."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):  # the system bus socket
        return f"{text}: no D-Bus system bus; is BlueZ installed and running? (Debian packages: dbus, bluez)"
    if "org.freedesktop.DBus.Error.ServiceUnknown" in str(exc) and "org.bluez" in str(exc):
        return f"{text}: BlueZ is not running (Debian package: bluez; then: systemctl start bluetooth)"
    return text


@dataclass(frozen=True, slots=True)
class BleDeviceSpec:
    device_id: str
    address: str
    protocol: str
    bindkey: bytes | None = None


@dataclass(slots=True)
class BleStats(DriverStats):
    scanner_restarts: int = 0
    """Scans restarted by the watchdog."""
    rssi: dict[str, int] = field(default_factory=dict)
    """Device id -> RSSI (dBm) of its last advertisement."""

    def as_dict(self) -> dict[str, Any]:
        out = DriverStats.as_dict(self)  # (zero-argument super() does not work in slotted dataclasses)
        out["scanner_restarts"] = self.scanner_restarts
        out["rssi"] = dict(sorted(self.rssi.items()))
        return out


class BleDriver:
    name = "ble"

    def __init__(
        self, devices: Mapping[str, BleDeviceSpec], source: AdvertisementSource, *, watchdog_s: float = 0.0
    ) -> None:
        """``devices`` is keyed by upper-case MAC address; other advertisers are ignored.
        ``watchdog_s`` 0 switches the watchdog off. Raises KeyError for an unknown protocol."""
        self._devices = dict(devices)
        self._source = source
        self._watchdog_s = watchdog_s
        self._decoders: dict[str, AdvertisementDecoder] = {
            addr: PROTOCOLS[spec.protocol].decoder(spec.bindkey) for addr, spec in self._devices.items()
        }
        self._last_packet: dict[str, int] = {}
        self.stats = BleStats()
        self._state = StateLog(log, "BLE scanner")

    @property
    def source(self) -> AdvertisementSource:
        return self._source

    async def run(self, sink: Sink) -> None:
        attempt = 0
        try:
            while True:
                try:
                    got_any = await self._scan(sink)
                except Exception as exc:  # BlueZ gone, adapter missing, D-Bus down: retry
                    self.stats.connected = False
                    self._state.down(scanner_failure(exc))
                    attempt += 1
                    await asyncio.sleep(backoff_delay(attempt))
                    continue
                attempt = 0 if got_any else attempt
                self.stats.scanner_restarts += 1
                log.warning("BLE: no advertisement for %.0f s; restarting the scanner (restart %d)",
                            self._watchdog_s, self.stats.scanner_restarts)
        finally:
            self.stats.connected = False

    async def _scan(self, sink: Sink) -> bool:
        """One scan, until the watchdog fires (returns whether anything arrived) or an error."""
        advertisements = self._source.advertisements()
        got_any = False
        try:
            while True:
                watchdog = asyncio.timeout(self._watchdog_s or None)
                try:
                    async with watchdog:
                        adv = await anext(advertisements)
                except TimeoutError:
                    if watchdog.expired():
                        return got_any
                    raise
                if not got_any:
                    got_any = self.stats.connected = True
                    self._state.up()
                await self._handle(adv, sink)
        finally:
            await advertisements.aclose()

    async def _handle(self, adv: Advertisement, sink: Sink) -> None:
        spec = self._devices.get(adv.address)
        if spec is None:
            self.stats.skipped["unknown_advertiser"] += 1
            return
        self.stats.rssi[spec.device_id] = adv.rssi
        result = self._decoders[adv.address].decode(adv)
        if result is None:
            self.stats.skipped["not_" + spec.protocol] += 1
            return
        if isinstance(result, FrameError):
            self.stats.errors[result.reason] += 1
            await sink.error(spec.device_id, result.reason, result.detail, adv.raw())
            return
        if result.packet_id is not None:
            if self._last_packet.get(adv.address) == result.packet_id:
                self.stats.skipped["duplicate"] += 1
                return
            self._last_packet[adv.address] = result.packet_id
        self.stats.frames += 1
        for m in result.measurements:
            self.stats.readings += 1
            await sink.reading(DriverReading(spec.device_id, m.metric, m.value, m.unit, seq=result.packet_id))
