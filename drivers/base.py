"""What every driver is: a source of readings that runs until cancelled.

A driver moves bytes and frames; decoding lives in pure parser modules beside it. It hands each
reading, and each frame it could not decode, to a :class:`Sink` that the gateway provides.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class DriverReading:
    device_id: str
    metric: str
    value: float
    unit: str | None
    device_ts: datetime | None = None
    seq: int | None = None


class Sink(Protocol):
    async def reading(self, reading: DriverReading) -> None: ...

    async def error(self, device_id: str, reason: str, detail: str, raw: bytes) -> None: ...


@dataclass(slots=True)
class DriverStats:
    frames: int = 0
    readings: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # not errors: duplicates, strangers
    anomalies: Counter[str] = field(default_factory=Counter)  # kept but suspect: clock_skew
    disconnects: int = 0
    connected: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "readings": self.readings, "errors": dict(sorted(self.errors.items())),
            "skipped": dict(sorted(self.skipped.items())), "anomalies": dict(sorted(self.anomalies.items())),
            "disconnects": self.disconnects, "connected": self.connected,
        }


class Driver(Protocol):
    name: str

    @property
    def stats(self) -> DriverStats: ...  # read-only here, so a driver may keep a subclass

    async def run(self, sink: Sink) -> None:
        """Read until cancelled; recover from device faults by itself."""
        ...
