"""Xiaomi LYWSD03MMC (and kin) running the ATC1441 or pvvx custom firmware: service data under the
Environmental Sensing UUID 0x181A, in one of two unencrypted layouts told apart by length.

ATC1441, 13 bytes, big-endian::

    MAC (6, as written) | temperature s16 x0.1 °C | humidity u8 % | battery u8 %
    | battery u16 mV | frame counter u8

pvvx "custom", 15 bytes, little-endian::

    MAC (6, reversed) | temperature s16 x0.01 °C | humidity u16 x0.01 % | battery u16 mV
    | battery u8 % | frame counter u8 | flags u8

The frame counter is the packet id (the firmware repeats an advertisement with the same counter).
No maintained Python library decodes these layouts (``xiaomi-ble`` covers the stock MiBeacon
format), so this is a pure parser written from the firmware READMEs.

Reasons: ``bad_length`` (neither 13 nor 15 bytes; pvvx's encrypted layouts have other lengths),
``mac_mismatch`` (the MAC in the payload is not the advertiser's: a corrupted or foreign frame).
"""

from __future__ import annotations

import struct

from drivers.ble.advert import Advertisement, BleReading, uuid16
from drivers.reading import FrameError, Measurement

__all__ = ["ATC_UUID", "AtcDecoder"]

ATC_UUID = uuid16(0x181A)
_ATC1441 = struct.Struct(">6shBBHB")
_PVVX = struct.Struct("<6shHHBBB")


def _mac(address: str) -> bytes | None:
    try:
        raw = bytes.fromhex(address.replace(":", ""))
    except ValueError:
        return None
    return raw if len(raw) == 6 else None


class AtcDecoder:
    """Decoder for ATC1441 and pvvx advertisements; ``decode`` never raises."""

    __slots__ = ()

    def decode(self, adv: Advertisement) -> BleReading | FrameError | None:
        data = adv.service(ATC_UUID)
        if data is None:
            return None
        if len(data) == _ATC1441.size:
            mac, t, rh, batt, mv, counter = _ATC1441.unpack(data)
            temperature, humidity = t / 10, float(rh)
        elif len(data) == _PVVX.size:
            mac, t, rh_raw, mv, batt, counter, _flags = _PVVX.unpack(data)
            mac = mac[::-1]
            temperature, humidity = t / 100, rh_raw / 100
        else:
            return FrameError("bad_length", f"{len(data)} bytes (ATC1441 has 13, pvvx 15)")
        expected = _mac(adv.address)
        if expected is not None and mac != expected:
            return FrameError("mac_mismatch", f"payload MAC {mac.hex(':')} from {adv.address}")
        return BleReading(counter, (
            Measurement("temperature", temperature, "°C"),
            Measurement("humidity", humidity, "%"),
            Measurement("battery", float(batt), "%"),
            Measurement("battery_voltage", float(mv), "mV"),
        ))
