"""The one small interface every pipeline stage implements, and what flows between stages.

A stage takes a batch and returns a batch. What it drops it hands to the :class:`Emitter` as a
:class:`Reject` with a reason; events it raises (aggregates, later alerts) also go to the emitter.
The runner publishes both after the batch, so stages never touch the broker themselves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pipeline.model import new_event_id
from pipeline.topics import TopicFields

In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as the broker saw it: ``origin`` is the MQTT client id, None for in-process drivers."""

    topic: str
    payload: bytes
    origin: str | None
    received_at: datetime
    event_id: str = field(default_factory=new_event_id)  # assigned on arrival: a replay keeps it


@dataclass(frozen=True, slots=True)
class Draft:
    """A reading between collect and define: its value not yet checked."""

    topic: str
    fields: TopicFields
    transport: str
    value: object
    unit: str | None
    device_ts: datetime | None
    seq: int | None
    received_at: datetime
    payload: bytes
    event_id: str = ""
    quality: tuple[str, ...] = ()  # flags set on the way (clean's clock_corrected)


@dataclass(frozen=True, slots=True)
class Reject:
    stage: str
    reason: str
    detail: str
    topic: str
    payload: bytes


class Deferred(Protocol):
    """Events a stage raised whose payloads are made only if someone wants them (the valid events of a
    batch's readings: pipeline/define.py), all on one topic."""

    @property
    def topic(self) -> str: ...

    @property
    def count(self) -> int: ...

    def events(self) -> list[tuple[str, dict[str, Any]]]: ...


Event = tuple[str, dict[str, Any]]


@dataclass(slots=True)
class Emitter:
    """Collects what a batch rejected and the events it raised, for the runner to publish."""

    rejects: list[Reject] = field(default_factory=list)
    _items: list[Event | Deferred] = field(default_factory=list)  # in the order raised

    def reject(self, stage: str, reason: str, detail: str, topic: str, payload: bytes) -> None:
        self.rejects.append(Reject(stage, reason, detail, topic, payload))

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        self._items.append((topic, event))

    def defer(self, events: Deferred) -> None:
        """Events to be made only when wanted (see :meth:`outgoing`)."""
        self._items.append(events)

    @property
    def events(self) -> list[Event]:
        """Every event raised, in order, deferred ones made now (once)."""
        if not all(type(item) is tuple for item in self._items):
            made: list[Event | Deferred] = []
            for item in self._items:
                if isinstance(item, tuple):
                    made.append(item)
                else:
                    made.extend(item.events())
            self._items = made
        return self._items  # type: ignore[return-value]  # all made above

    def outgoing(self) -> list[Event | Deferred]:
        """What was raised, in order, deferred events still deferred: the publisher makes those whose
        topic somebody consumes."""
        return self._items

    @property
    def count(self) -> int:
        """How many events were raised (deferred ones included)."""
        return sum(1 if isinstance(item, tuple) else item.count for item in self._items)


@dataclass(slots=True)
class StageStats:
    received: int = 0
    passed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"in": self.received, "out": self.passed, "rejected": dict(sorted(self.rejected.items()))}


class Stage(Protocol[In_contra, Out_co]):
    """collect, clean, define, store, analyze: each is one of these."""

    name: str
    stats: StageStats

    async def process(self, batch: Sequence[In_contra], emit: Emitter) -> Sequence[Out_co]: ...
