"""Simulated SDS011 firmware: builds the sensor's 10-byte data frames.

Written from the datasheet layout, independently of ``drivers.serial.sds011``
(the tests check one against the other)::

    AA C0 PM25_lo PM25_hi PM10_lo PM10_hi ID_lo ID_hi CHECKSUM AB

with PM values in units of 0.1 µg/m³ and the checksum the low byte of the sum
of the six bytes between the command byte and the checksum.
"""

from __future__ import annotations

import math

__all__ = ["PM_MAX", "encode_frame"]

PM_MAX = 999.9
"""Largest concentration the sensor reports, in µg/m³."""

_HEAD = b"\xaa\xc0"
_TAIL = b"\xab"


def _tenths(value: float, name: str) -> int:
    """``value`` in 0.1 µg/m³ steps, clamped to the sensor's range."""
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    clamped = min(max(value, 0.0), PM_MAX)
    return min(round(clamped * 10), round(PM_MAX * 10))


def encode_frame(
    pm2_5: float,
    pm10: float,
    device_id: int = 0xA1B2,
    *,
    corrupt_checksum: bool = False,
) -> bytes:
    """One SDS011 data frame.

    Values are clamped to 0..999.9 µg/m³ and rounded to 0.1 (round half to
    even).  ``device_id`` (0..0xFFFF) is sent low byte first.  With
    ``corrupt_checksum`` the checksum byte is deliberately wrong.

    Raises ``ValueError`` for a NaN value or an out-of-range ``device_id``.
    """
    if not 0 <= device_id <= 0xFFFF:
        raise ValueError(f"device_id {device_id!r} is not a uint16")
    body = (
        _tenths(pm2_5, "pm2_5").to_bytes(2, "little")
        + _tenths(pm10, "pm10").to_bytes(2, "little")
        + device_id.to_bytes(2, "little")
    )
    checksum = sum(body) & 0xFF
    if corrupt_checksum:
        checksum ^= 0xFF
    return _HEAD + body + bytes([checksum]) + _TAIL
