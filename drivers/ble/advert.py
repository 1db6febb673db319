"""What every BLE advertisement decoder shares: the advertisement going in, the reading coming out.

A decoder is pure (no I/O): ``decode(advertisement)`` returns ``None`` when the advertisement does
not carry its protocol at all, a reading, or a :class:`~drivers.reading.FrameError` whose reason is
a counter key. It never raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from drivers.reading import FrameError, Measurement

__all__ = ["Advertisement", "AdvertisementDecoder", "AdvertisementReading", "BleReading", "uuid16"]


def uuid16(short: int) -> str:
    """The 128-bit string form of a 16-bit Bluetooth SIG UUID, as bleak keys service data."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One BLE advertisement as a backend hands it to a driver."""

    address: str
    rssi: int
    service_data: Mapping[str, bytes]
    """Keyed by 128-bit UUID string, e.g. ``uuid16(0xFCD2)``."""
    name: str | None = None
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    """Keyed by Bluetooth SIG company id, without the id's two bytes (as bleak reports it)."""

    def service(self, uuid: str) -> bytes | None:
        """The service data under ``uuid`` (any case), or None."""
        data = self.service_data.get(uuid)
        if data is None:
            wanted = uuid.lower()
            data = next((v for k, v in self.service_data.items() if isinstance(k, str) and k.lower() == wanted), None)
        return None if data is None else bytes(data)

    def raw(self) -> bytes:
        """Every payload byte of the advertisement, for a reject record."""
        return b"".join([*map(bytes, self.service_data.values()), *map(bytes, self.manufacturer_data.values())])


class AdvertisementReading(Protocol):
    """What a decoder returns for a usable advertisement."""

    @property
    def packet_id(self) -> int | None: ...

    @property
    def measurements(self) -> tuple[Measurement, ...]: ...


class AdvertisementDecoder(Protocol):
    def decode(self, adv: Advertisement) -> AdvertisementReading | FrameError | None: ...


@dataclass(frozen=True, slots=True)
class BleReading:
    """The measurements decoded from one advertisement; ``packet_id`` repeats while the device
    re-broadcasts the same measurement (None when the format has no such counter)."""

    packet_id: int | None
    measurements: tuple[Measurement, ...]
