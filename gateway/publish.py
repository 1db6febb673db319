"""Events back onto the broker: the pipeline's results and rejects, and the gateway's own events.

Everything goes through the embedded broker in-process, as if a client had published it, so
subscribers, the outboxes (through ingest) and the catalog's traffic learner all see it. A stage
never publishes (pipeline/stage.py): the flow hands its :class:`~pipeline.stage.Emitter` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from gateway.status import PublishedStatus
from pipeline.stage import Emitter, Reject


class Broker(Protocol):
    """What publishing needs of the broker (gateway/broker/embedded.py ``EmbeddedBroker``)."""

    async def publish(
        self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None, qos: int = 0
    ) -> None: ...


def dumps(event: dict[str, Any]) -> bytes:
    """The compact JSON every event and driver reading is published as."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


class Publisher:
    """Publishes events and rejects, counting what the pipeline and the drivers published."""

    def __init__(self, broker: Broker, reject_event: Callable[[Reject], tuple[str, dict[str, Any]]]) -> None:
        """``reject_event``: where a reject goes and its CloudEvent (``Pipeline.reject_event``)."""
        self._broker = broker
        self._reject_event = reject_event
        self._events = 0
        self._rejects = 0

    async def results(self, emit: Emitter) -> None:
        """What a batch (or a closing window) produced: its events, then its rejects."""
        for topic, event in emit.events:
            await self._broker.publish(topic, dumps(event), event_id=event.get("id"))
        self._events += len(emit.events)
        await self.rejects(emit.rejects)

    async def rejects(self, rejects: list[Reject]) -> None:
        for reject in rejects:
            topic, event = self._reject_event(reject)
            await self._broker.publish(topic, dumps(event), event_id=event["id"])
        self._rejects += len(rejects)

    async def event(self, topic: str, event: dict[str, Any]) -> None:
        """One event of the gateway's own (an alert, a command's outcome): not counted as a result."""
        await self._broker.publish(topic, dumps(event), event_id=event["id"])

    def status(self) -> PublishedStatus:
        return PublishedStatus(events=self._events, rejects=self._rejects)
