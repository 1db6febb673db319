"""The common output types of every frame parser and advertisement decoder.

A decoder turns raw bytes into either measurements or a :class:`FrameError`.
Decoders never raise on bad input: they return a ``FrameError`` whose
``reason`` is a short, stable key meant to be used as a counter label
(``"bad_checksum"``, ``"bad_tail"``, ``"garbage"``, ``"truncated"``,
``"unsupported"``, ``"decrypt_failed"``, ...), with free-form ``detail``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FrameError", "Measurement"]


@dataclass(frozen=True, slots=True)
class Measurement:
    """One physical quantity read from a device."""

    metric: str
    """snake_case name, e.g. ``"pm2_5"``, ``"pm10"``, ``"temperature"``."""
    value: float
    unit: str | None
    """e.g. ``"µg/m³"``, ``"°C"``, ``"%"``; ``None`` for dimensionless values."""


@dataclass(frozen=True, slots=True)
class FrameError:
    """Bytes a decoder rejected; ``reason`` is a short counter key."""

    reason: str
    detail: str = ""
