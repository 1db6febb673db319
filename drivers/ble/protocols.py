"""BLE advertisement protocols, registered by the name used in config (``protocol = "ruuvi"``).

Each entry builds one decoder per device (a decoder may keep per-device state, such as BTHome's
encryption counter) and names the advertisement-data patterns that identify the protocol, which
passive scanning hands to BlueZ (``org.bluez.AdvertisementMonitor1`` "or patterns").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from drivers.ble.advert import AdvertisementDecoder
from drivers.ble.atc import AtcDecoder
from drivers.ble.bthome import BTHomeDecoder
from drivers.ble.ruuvi import RuuviDecoder

__all__ = ["PROTOCOLS", "BleProtocol", "or_patterns"]

# Advertising-data types of the Bluetooth Core Specification Supplement (part A, section 1).
_AD_SERVICE_DATA_16 = 0x16
_AD_MANUFACTURER_DATA = 0xFF

OrPattern = tuple[int, int, bytes]
"""(start position, AD type, content), as BlueZ's advertisement monitor takes it."""


@dataclass(frozen=True, slots=True)
class BleProtocol:
    decoder: Callable[[bytes | None], AdvertisementDecoder]
    """Builds a device's decoder from its bindkey (None unless the protocol encrypts)."""
    patterns: tuple[OrPattern, ...]
    encrypts: bool = False


PROTOCOLS: dict[str, BleProtocol] = {
    # BTHome v2 (bthome-ble), plain or AES-CCM encrypted: service data 0xFCD2
    "bthome": BleProtocol(
        lambda key: BTHomeDecoder(bindkey=key), ((0, _AD_SERVICE_DATA_16, b"\xd2\xfc"),), encrypts=True,
    ),
    # RuuviTag data format 5: manufacturer data of company 0x0499
    "ruuvi": BleProtocol(lambda _key: RuuviDecoder(), ((0, _AD_MANUFACTURER_DATA, b"\x99\x04"),)),
    # Xiaomi LYWSD03MMC with ATC1441/pvvx firmware: service data 0x181A
    "atc": BleProtocol(lambda _key: AtcDecoder(), ((0, _AD_SERVICE_DATA_16, b"\x1a\x18"),)),
}


def or_patterns(protocols: set[str]) -> list[OrPattern]:
    """The passive-scanning patterns that match every advertisement of these protocols."""
    return sorted({p for name in protocols for p in PROTOCOLS[name].patterns})
