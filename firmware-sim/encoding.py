"""What the simulated firmware encoders share: scaling a value into an integer field, and MACs."""

from __future__ import annotations

import math

__all__ = ["mac_bytes", "scaled"]


def scaled(value: float, name: str, step: float, lo: int, hi: int, *, encoding: str) -> int:
    """``value / step`` rounded; ValueError naming the field if it is not finite or not in lo..hi."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    raw = round(value / step)
    if not lo <= raw <= hi:
        raise ValueError(f"{name} {value!r} does not fit the {encoding} encoding")
    return raw


def mac_bytes(mac: str) -> bytes:
    """"AA:BB:CC:DD:EE:FF" (or with dashes) as 6 bytes in written order; ValueError otherwise."""
    try:
        raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:  # a MAC is 6 bytes
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw
