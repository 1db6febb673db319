"""RuuviTag data format 5 ("RAWv2"), manufacturer data of company 0x0499, decoded by the
``ruuvitag-ble`` library's format-5 decoder.

Layout (24 bytes after the company id, big-endian; Ruuvi's ``dataformat_05`` spec)::

    05 | temperature s16 x0.005 °C | humidity u16 x0.0025 % | pressure u16 +50000 Pa
       | acc x, y, z s16 mg | power u16 (11 bits battery mV - 1600, 5 bits tx power)
       | movement u8 | sequence u16 | MAC (6)

Each field has an "invalid / not available" value (the field's minimum for signed fields, its
maximum for unsigned ones); such fields are left out of the reading. The measurement sequence
number is the packet id (65535 = not available: no duplicate suppression for that packet).

Reasons: ``truncated`` (fewer than 24 bytes), ``bad_length`` (more), ``unsupported`` (another
data format), ``decode_failed`` (the library raised).
"""

from __future__ import annotations

from ruuvitag_ble.df5_decoder import DataFormat5Decoder

from drivers.ble.advert import Advertisement, BleReading
from drivers.reading import FrameError, Measurement

__all__ = ["RUUVI_COMPANY_ID", "RuuviDecoder"]

RUUVI_COMPANY_ID = 0x0499
_DF5 = 0x05
_DF5_LEN = 24
_SEQUENCE_NA = 0xFFFF
_MOVEMENT_NA = 0xFF


class RuuviDecoder:
    """Decoder for RuuviTag advertisements (data format 5); ``decode`` never raises."""

    __slots__ = ()

    def decode(self, adv: Advertisement) -> BleReading | FrameError | None:
        data = adv.manufacturer_data.get(RUUVI_COMPANY_ID)
        if data is None:
            return None
        data = bytes(data)
        if not data:
            return FrameError("truncated", "empty Ruuvi manufacturer data")
        if data[0] != _DF5:
            return FrameError("unsupported", f"Ruuvi data format {data[0]:#04x}")
        if len(data) != _DF5_LEN:
            reason = "truncated" if len(data) < _DF5_LEN else "bad_length"
            return FrameError(reason, f"{len(data)} bytes, data format 5 has {_DF5_LEN}")
        try:
            return _reading(DataFormat5Decoder(data))
        except Exception as exc:  # third-party parser: bad data must not escape
            return FrameError("decode_failed", f"{type(exc).__name__}: {exc}")


def _reading(df5: DataFormat5Decoder) -> BleReading:
    out: list[Measurement] = []

    def add(metric: str, value: float | None, unit: str | None) -> None:
        if value is not None:
            out.append(Measurement(metric, float(value), unit))

    add("temperature", df5.temperature_celsius, "°C")
    add("humidity", df5.humidity_percentage, "%")
    add("pressure", df5.pressure_hpa, "hPa")
    ax, ay, az = df5.acceleration_vector_mg
    add("acceleration_x", ax, "mg")
    add("acceleration_y", ay, "mg")
    add("acceleration_z", az, "mg")
    add("battery_voltage", df5.battery_voltage_mv, "mV")
    add("tx_power", df5.tx_power_dbm, "dBm")
    movement = df5.movement_counter
    add("movement_count", None if movement == _MOVEMENT_NA else movement, None)
    sequence = df5.measurement_sequence_number
    return BleReading(None if sequence == _SEQUENCE_NA else sequence, tuple(out))
