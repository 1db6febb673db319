"""The BLE driver: one per adapter. Takes advertisements from its source, keeps the configured
devices, decodes them and suppresses repeated packets (same packet id)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from drivers.base import DriverReading, DriverStats, Sink
from drivers.ble.bthome import BTHomeDecoder
from drivers.ble.sources import AdvertisementSource
from drivers.reading import FrameError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BleDeviceSpec:
    device_id: str
    address: str
    protocol: str
    bindkey: bytes | None = None


class BleDriver:
    name = "ble"

    def __init__(self, devices: Mapping[str, BleDeviceSpec], source: AdvertisementSource) -> None:
        """``devices`` is keyed by upper-case MAC address; other advertisers are ignored."""
        self._devices = dict(devices)
        self._source = source
        self._decoders = {addr: BTHomeDecoder(bindkey=spec.bindkey) for addr, spec in self._devices.items()}
        self._last_packet: dict[str, int] = {}
        self.stats = DriverStats()

    async def run(self, sink: Sink) -> None:
        self.stats.connected = True
        try:
            async for adv in self._source.advertisements():
                spec = self._devices.get(adv.address)
                if spec is None:
                    self.stats.skipped["unknown_advertiser"] += 1
                    continue
                result = self._decoders[adv.address].decode(adv)
                if result is None:
                    continue
                if isinstance(result, FrameError):
                    self.stats.errors[result.reason] += 1
                    raw = b"".join(adv.service_data.values())
                    await sink.error(spec.device_id, result.reason, result.detail, raw)
                    continue
                if result.packet_id is not None:
                    if self._last_packet.get(adv.address) == result.packet_id:
                        self.stats.skipped["duplicate"] += 1
                        continue
                    self._last_packet[adv.address] = result.packet_id
                self.stats.frames += 1
                for m in result.measurements:
                    self.stats.readings += 1
                    await sink.reading(DriverReading(spec.device_id, m.metric, m.value, m.unit, seq=result.packet_id))
        finally:
            self.stats.connected = False
