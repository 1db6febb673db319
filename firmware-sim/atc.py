"""Simulated Xiaomi LYWSD03MMC with custom firmware: service data under UUID 0x181A in the ATC1441
layout (13 bytes, big-endian: MAC, temperature s16 0.1 °C, humidity u8 %, battery u8 %, battery
u16 mV, frame counter u8) or the pvvx layout (15 bytes, little-endian: MAC reversed, temperature
s16 0.01 °C, humidity u16 0.01 %, battery u16 mV, battery u8 %, counter u8, flags u8).
Written from the firmware READMEs, independently of the gateway's decoder."""

from __future__ import annotations

import struct
from typing import Literal

from firmware_sim.encoding import mac_bytes

__all__ = ["ATC_UUID", "encode_atc"]

ATC_UUID = "0000181a-0000-1000-8000-00805f9b34fb"


def encode_atc(
    *, mac: str, counter: int, temperature: float, humidity: float, battery: int, battery_mv: int,
    layout: Literal["atc1441", "pvvx"] = "pvvx", flags: int = 0,
) -> bytes:
    """The service data of one advertisement. Raises ValueError (struct.error) for a value the
    layout cannot carry."""
    raw_mac = mac_bytes(mac)
    try:
        if layout == "atc1441":
            return struct.pack(">6shBBHB", raw_mac, round(temperature * 10), round(humidity), battery,
                               battery_mv, counter)
        return struct.pack("<6shHHBBB", raw_mac[::-1], round(temperature * 100), round(humidity * 100),
                           battery_mv, battery, counter, flags)
    except struct.error as exc:
        raise ValueError(str(exc)) from None
