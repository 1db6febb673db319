"""Units the clean stage can normalise between: pure functions, no I/O.

Every known unit is a linear map to its dimension's base unit: ``base = value * factor + offset``.
Spellings devices really send (``°C``, ``C``, ``degC``, ``ug/m3``...) are aliases of one canonical
symbol. :func:`convert` returns the value in the target unit, or a :class:`UnitProblem` saying why
it cannot (unknown unit, different dimensions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Unit:
    symbol: str  # canonical spelling
    dimension: str
    factor: float  # to the dimension's base unit
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class UnitProblem:
    reason: str  # "unknown_unit" | "unit_mismatch"
    detail: str


_UNITS: Final = (
    # temperature (base: °C)
    (Unit("°C", "temperature", 1.0), ("C", "degC", "celsius", "℃")),
    (Unit("°F", "temperature", 5 / 9, -32 * 5 / 9), ("F", "degF", "fahrenheit", "℉")),
    (Unit("K", "temperature", 1.0, -273.15), ("kelvin",)),
    # pressure (base: Pa)
    (Unit("Pa", "pressure", 1.0), ()),
    (Unit("hPa", "pressure", 100.0), ("mbar",)),
    (Unit("kPa", "pressure", 1000.0), ()),
    (Unit("bar", "pressure", 100_000.0), ()),
    (Unit("psi", "pressure", 6894.757293168), ()),
    (Unit("inHg", "pressure", 3386.389), ()),
    # ratios (base: fraction)
    (Unit("%", "ratio", 0.01), ("percent", "%RH", "pct")),
    (Unit("ppm", "ratio", 1e-6), ()),
    (Unit("ppb", "ratio", 1e-9), ()),
    # mass concentration (base: µg/m³)
    (Unit("µg/m³", "mass_concentration", 1.0), ("ug/m3", "μg/m³", "µg/m3", "ug/m³")),
    (Unit("mg/m³", "mass_concentration", 1000.0), ("mg/m3",)),
    # electricity
    (Unit("V", "voltage", 1.0), ()),
    (Unit("mV", "voltage", 1e-3), ()),
    (Unit("A", "current", 1.0), ()),
    (Unit("mA", "current", 1e-3), ()),
    (Unit("W", "power", 1.0), ()),
    (Unit("kW", "power", 1000.0), ()),
    (Unit("mW", "power", 1e-3), ()),
    (Unit("Wh", "energy", 1.0), ()),
    (Unit("kWh", "energy", 1000.0), ()),
    (Unit("J", "energy", 1 / 3600), ()),
    # length and speed
    (Unit("m", "length", 1.0), ()),
    (Unit("cm", "length", 0.01), ()),
    (Unit("mm", "length", 0.001), ()),
    (Unit("km", "length", 1000.0), ()),
    (Unit("m/s", "speed", 1.0), ()),
    (Unit("km/h", "speed", 1 / 3.6), ("kph",)),
    (Unit("kn", "speed", 1852 / 3600), ("kt", "knots")),
    (Unit("mph", "speed", 0.44704), ()),
)

UNITS: Final[dict[str, Unit]] = {}
for _unit, _aliases in _UNITS:
    for _name in (_unit.symbol, *_aliases):
        UNITS[_name] = _unit


def lookup(name: str) -> Unit | None:
    return UNITS.get(name) or UNITS.get(name.strip())


def convert(value: float, from_unit: str, to_unit: str) -> float | UnitProblem:
    """``value`` in ``from_unit`` expressed in ``to_unit``."""
    if from_unit == to_unit:
        return value
    source, target = lookup(from_unit), lookup(to_unit)
    if source is None:
        return UnitProblem("unknown_unit", f"unit {from_unit!r} is not one the gateway can convert")
    if target is None:
        return UnitProblem("unknown_unit", f"target unit {to_unit!r} is not one the gateway can convert")
    if source is target:
        return value
    if source.dimension != target.dimension:
        return UnitProblem(
            "unit_mismatch", f"{from_unit!r} ({source.dimension}) cannot become {to_unit!r} ({target.dimension})"
        )
    base = value * source.factor + source.offset
    return (base - target.offset) / target.factor
