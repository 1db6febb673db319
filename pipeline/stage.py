"""The one small interface every pipeline stage implements, and what flows between stages.

A stage takes a batch and returns a batch. What it drops it hands to the :class:`Emitter` as a
:class:`Reject` with a reason; events it raises (aggregates, later alerts) also go to the emitter.
The runner publishes both after the batch, so stages never touch the broker themselves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pipeline.model import new_event_id
from pipeline.topics import TopicFields

In = TypeVar("In")
Out = TypeVar("Out")


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


@dataclass(slots=True)
class Emitter:
    """Collects what a batch rejected and the events it raised, for the runner to publish."""

    rejects: list[Reject] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def reject(self, stage: str, reason: str, detail: str, topic: str, payload: bytes) -> None:
        self.rejects.append(Reject(stage, reason, detail, topic, payload))

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        self.events.append((topic, event))


@dataclass(slots=True)
class StageStats:
    received: int = 0
    passed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"in": self.received, "out": self.passed, "rejected": dict(sorted(self.rejected.items()))}


class Stage(Protocol[In, Out]):
    """collect, clean, define, store, analyze: each is one of these."""

    name: str
    stats: StageStats

    async def process(self, batch: list[In], emit: Emitter) -> list[Out]: ...
