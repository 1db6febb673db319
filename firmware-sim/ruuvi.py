"""Simulated RuuviTag firmware: manufacturer data (company 0x0499) in data format 5.

Written from Ruuvi's ``dataformat_05`` spec, independently of the gateway's decoder: 24 bytes,
big-endian, ``05 | temperature s16 (0.005 °C) | humidity u16 (0.0025 %) | pressure u16 (Pa -
50000) | acceleration x, y, z s16 (mg) | power u16 (battery mV - 1600 << 5 | (tx dBm + 40) / 2) |
movement u8 | sequence u16 | MAC``. ``None`` sends the field's "not available" value.
"""

from __future__ import annotations

import struct

from firmware_sim.encoding import mac_bytes, scaled

__all__ = ["RUUVI_COMPANY_ID", "encode_df5"]

RUUVI_COMPANY_ID = 0x0499
_DF5 = struct.Struct(">BhHHhhhHBH6s")


def _raw(value: float | None, step: float, name: str, *, lo: int, hi: int, missing: int) -> int:
    return missing if value is None else scaled(value, name, step, lo, hi, encoding="data format 5")


def encode_df5(
    *,
    mac: str,
    sequence: int | None,
    temperature: float | None = None,
    humidity: float | None = None,
    pressure_hpa: float | None = None,
    acceleration_mg: tuple[int, int, int] | None = None,
    battery_mv: int | None = None,
    tx_power_dbm: int | None = None,
    movement: int | None = None,
) -> bytes:
    """The manufacturer data of one advertisement (without the company id). Raises ValueError for
    a value the format cannot carry."""
    t = _raw(temperature, 0.005, "temperature", lo=-32767, hi=32767, missing=-32768)
    h = _raw(humidity, 0.0025, "humidity", lo=0, hi=65534, missing=0xFFFF)
    pa = None if pressure_hpa is None else pressure_hpa * 100 - 50000
    p = _raw(pa, 1, "pressure", lo=0, hi=65534, missing=0xFFFF)
    ax, ay, az = acceleration_mg if acceleration_mg is not None else (-32768, -32768, -32768)
    volts = 0x7FF if battery_mv is None else _raw(battery_mv - 1600, 1, "battery_mv", lo=0, hi=0x7FE, missing=0x7FF)
    tx = 0x1F if tx_power_dbm is None else _raw((tx_power_dbm + 40) / 2, 1, "tx_power", lo=0, hi=0x1E, missing=0x1F)
    seq = 0xFFFF if sequence is None else _raw(sequence, 1, "sequence", lo=0, hi=0xFFFE, missing=0xFFFF)
    move = 0xFF if movement is None else _raw(movement, 1, "movement", lo=0, hi=0xFE, missing=0xFF)
    return _DF5.pack(0x05, t, h, p, ax, ay, az, volts << 5 | tx, move, seq, mac_bytes(mac))
