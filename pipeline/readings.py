"""A batch of validated readings, kept column by column.

The define stage validates a batch one topic at a time (one validation per batch shape, not per
reading: pipeline/define.py) and hands the store and analyze stages a :class:`ReadingBatch`: for each
topic of the batch a :class:`Run` holding what its readings share (event type, site, device, metric)
once, and what varies (id, value, unit, times, sequence number, quality flags, declared extra fields)
as one list per field. The store makes its rows and the analyze stage its windows straight from the
columns.

A :class:`ReadingBatch` is also a sequence of :class:`~pipeline.model.Reading` objects: those are made
(validated again by their model, so they are exactly what the model makes) only when someone asks for
them, by iterating or indexing the batch, in the order the readings arrived. Callers that hold readings
as objects hand them in through :meth:`ReadingBatch.of`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import chain, islice
from operator import le
from typing import Any, overload

from pipeline.model import Quality, Reading

SHARED = ("site", "device_id", "device_class", "metric")  # fixed by a raw topic: once per run
VARYING = ("id", "transport", "value", "unit", "device_ts", "received_at", "seq", "quality")


def mean_of(values: Sequence[float]) -> float:
    """The mean of finite values, exactly rounded; finite even where their sum is not."""
    try:
        mean = math.fsum(values) / len(values)
    except OverflowError:
        mean = math.inf
    if math.isfinite(mean):
        return mean
    mean = 0.0
    for n, value in enumerate(values, 1):  # incremental: no sum that could overflow
        mean = mean * (1 - 1 / n) + value / n
    return mean


def spans(ts: list[int], width: int) -> list[tuple[int, int, int]] | None:
    """How times split into aligned windows of ``width`` ms: ``(window start, i, j)`` where ``ts[i:j]`` fall
    in ``[start, start + width)``, in order; None when the times are not in order and span windows."""
    first = ts[0]
    start = first - first % width
    if len(ts) == 1:
        return [(start, 0, 1)]
    low, high = min(ts), max(ts)
    if low >= start and high < start + width:
        return [(start, 0, len(ts))]
    if low != first or high != ts[-1] or not all(map(le, ts, islice(ts, 1, None))):
        return None
    out = []
    i, end = 0, len(ts)
    while i < end:
        start = ts[i] - ts[i] % width
        j = bisect_left(ts, start + width, i)
        out.append((start, i, j))
        i = j
    return out


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)  # the one conversion pipeline.model.to_ms makes


@dataclass(slots=True, eq=False)
class Run:
    """Readings of one raw topic in a batch, in the order they arrived."""

    model: type[Reading]
    site: str
    device_id: str
    device_class: str
    metric: str
    positions: list[int]  # where each reading sits in its batch
    ids: list[str]
    transports: list[str]
    values: list[float]
    units: list[str | None]
    device_ts: list[datetime | None]
    received_at: list[datetime]
    seqs: list[int | None]
    quality: list[tuple[Quality, ...]]
    extras: dict[str, list[Any]] | None = None  # declared extra fields, by name
    objects: list[Reading] | None = None  # the readings as objects, when the run was made from them
    _ts_ms: list[int] | None = None
    _received_ms: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ts_ms(self) -> list[int]:
        """Each reading's time (the device's, else the gateway's) in epoch milliseconds."""
        if self._ts_ms is None:
            self._ts_ms, self._received_ms = ms_columns(self.device_ts, self.received_at)
        return self._ts_ms

    @property
    def received_ms(self) -> list[int]:
        if self._received_ms is None:
            self._ts_ms, self._received_ms = ms_columns(self.device_ts, self.received_at)
        return self._received_ms

    def data(self, i: int) -> dict[str, Any]:
        """Reading ``i`` as its model's input."""
        data: dict[str, Any] = {
            "id": self.ids[i], "site": self.site, "device_id": self.device_id, "device_class": self.device_class,
            "transport": self.transports[i], "metric": self.metric, "value": self.values[i], "unit": self.units[i],
            "device_ts": self.device_ts[i], "received_at": self.received_at[i], "seq": self.seqs[i],
            "quality": self.quality[i],
        }
        for name, column in (self.extras or {}).items():
            data[name] = column[i]
        return data

    def reading(self, i: int) -> Reading:
        if self.objects is not None:
            return self.objects[i]
        reading: Reading = self.model.__pydantic_validator__.validate_python(self.data(i))
        return reading

    def readings(self) -> list[Reading]:
        if self.objects is None:
            names = ("id", "transport", "value", "unit", "device_ts", "received_at", "seq", "quality",
                     *(self.extras or ()))
            columns = (self.ids, self.transports, self.values, self.units, self.device_ts, self.received_at,
                       self.seqs, self.quality, *(self.extras or {}).values())
            shared = {"site": self.site, "device_id": self.device_id, "device_class": self.device_class,
                      "metric": self.metric}
            validate = self.model.__pydantic_validator__.validate_python
            self.objects = [validate(shared | dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
        return self.objects


def ms_columns(device_ts: list[datetime | None], received_at: list[datetime]) -> tuple[list[int], list[int]]:
    """Readings' times (the device's, else the gateway's) and receive times in epoch milliseconds, converted as
    :func:`~pipeline.model.to_ms` converts them."""
    if None in device_ts:
        ts = [_ms(d or r) for d, r in zip(device_ts, received_at, strict=True)]
    else:
        ts = [int(d.timestamp() * 1000) for d in device_ts]  # type: ignore[union-attr]
    return ts, [int(r.timestamp() * 1000) for r in received_at]


def times_ms(runs: Sequence[Run]) -> tuple[list[int], list[int]]:
    """:attr:`Run.ts_ms` and :attr:`Run.received_ms` of the runs, one run after the other. Those not worked
    out yet (define works them out for the runs it makes) are converted in one pass over the batch rather
    than one a run, and each run keeps its part."""
    if all(run._ts_ms is not None and run._received_ms is not None for run in runs):
        return (list(chain.from_iterable(run.ts_ms for run in runs)),
                list(chain.from_iterable(run.received_ms for run in runs)))
    ts, received = ms_columns(list(chain.from_iterable(run.device_ts for run in runs)),
                              list(chain.from_iterable(run.received_at for run in runs)))
    if len(runs) == 1:
        runs[0]._ts_ms, runs[0]._received_ms = ts, received
        return ts, received
    start = 0
    for run in runs:
        stop = start + len(run.ids)
        run._ts_ms, run._received_ms = ts[start:stop], received[start:stop]
        start = stop
    return ts, received


class ReadingBatch(Sequence[Reading]):
    """Runs of readings; as a sequence, the readings in arrival order (made when first asked for)."""

    __slots__ = ("_readings", "_size", "runs")

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self._size = sum([len(run.ids) for run in runs])
        self._readings: list[Reading] | None = None

    @classmethod
    def of(cls, readings: Sequence[Reading]) -> ReadingBatch:
        """Readings held as objects, as a batch (a batch is returned as it is)."""
        if isinstance(readings, ReadingBatch):
            return readings
        groups: dict[tuple[Any, ...], list[int]] = {}
        for position, r in enumerate(readings):
            key = (type(r), r.site, r.device_id, r.device_class, r.metric)
            positions = groups.get(key)
            if positions is None:
                groups[key] = [position]
            else:
                positions.append(position)
        runs = []
        for (model, site, device_id, device_class, metric), positions in groups.items():
            objects = [readings[i] for i in positions] if len(groups) > 1 else list(readings)
            runs.append(Run(
                model, site, device_id, device_class, metric, positions, [r.id for r in objects],
                [r.transport for r in objects], [r.value for r in objects], [r.unit for r in objects],
                [r.device_ts for r in objects], [r.received_at for r in objects], [r.seq for r in objects],
                [r.quality for r in objects], objects=objects,
            ))
        batch = cls(runs)
        batch._readings = list(readings)
        return batch

    def _all(self) -> list[Reading]:
        if self._readings is None:
            if len(self.runs) == 1:
                self._readings = list(self.runs[0].readings())
            else:
                made = [run.readings() for run in self.runs]
                placed = sorted((position, n, i) for n, run in enumerate(self.runs)
                                for i, position in enumerate(run.positions))
                self._readings = [made[n][i] for _, n, i in placed]
        return self._readings

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int) -> Reading: ...
    @overload
    def __getitem__(self, index: slice) -> list[Reading]: ...
    def __getitem__(self, index: int | slice) -> Reading | list[Reading]:
        return self._all()[index]

    def __iter__(self) -> Iterator[Reading]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ReadingBatch | list | tuple):
            return other is self or list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"ReadingBatch({len(self.runs)} runs, {self._size} readings)"
