"""clean: drop values that cannot be a measurement, each with a counted reason.

In this first version: non-numeric values (strings, booleans, null, NaN, infinities) and values
outside the configured range of their metric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Protocol

from pipeline.stage import Draft, Emitter, StageStats


class Bounds(Protocol):
    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...


class CleanStage:
    name = "clean"

    def __init__(self, ranges: Mapping[str, Bounds]) -> None:
        self._ranges = {metric: (bounds.min, bounds.max) for metric, bounds in ranges.items()}
        self.stats = StageStats()

    async def process(self, batch: list[Draft], emit: Emitter) -> list[Draft]:
        out: list[Draft] = []
        for draft in batch:
            reason, detail = self._check(draft)
            if reason:
                self.stats.rejected[reason] += 1
                emit.reject(self.name, reason, detail, draft.topic, draft.payload)
                continue
            value = draft.value
            out.append(draft if isinstance(value, float) else dataclasses.replace(draft, value=float(value)))  # type: ignore[arg-type]
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out

    def _check(self, draft: Draft) -> tuple[str, str]:
        value = draft.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "non_numeric", f"value {value!r} is not a number"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            return "non_numeric", f"value {str(value)[:40]} is not a finite float"
        bounds = self._ranges.get(draft.fields.metric)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            return "out_of_range", f"{value} outside [{bounds[0]}, {bounds[1]}] for {draft.fields.metric}"
        return "", ""
