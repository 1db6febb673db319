"""Events back onto the broker: the pipeline's results and rejects, and the gateway's own events.

Everything goes through the embedded broker in-process, as if a client had published it, so
subscribers, the outboxes (through ingest) and the catalog's traffic learner all see it. A stage
never publishes (pipeline/stage.py): the flow hands its :class:`~pipeline.stage.Emitter` here.

The valid events (one per reading) are made and published only for topics somebody consumes: a
subscriber of the broker or a forward destination (``wanted``). The catalog's traffic learner does not
count the gateway's relay of readings onto ``valid`` (pipeline/traffic.py), so it misses nothing when
they are skipped. Each event is encoded once; the broker hands the same bytes to every consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic_core import to_json

from gateway.status import PublishedStatus
from pipeline.stage import Emitter, Reject


class Broker(Protocol):
    """What publishing needs of the broker (gateway/broker/embedded.py ``EmbeddedBroker``)."""

    async def publish(
        self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None, qos: int = 0
    ) -> None: ...

    async def publish_many(self, topic: str, payloads: Sequence[bytes], event_ids: Sequence[str]) -> None: ...


def dumps(event: dict[str, Any]) -> bytes:
    """The compact JSON (UTF-8, not ASCII-escaped) every event and driver reading is published as: pydantic-core's
    encoder, about 5 times the json module's here and byte for byte the same but for a float's exponent
    (``1e-7``, not ``1e-07``)."""
    return to_json(event)


class Publisher:
    """Publishes events and rejects, counting what the pipeline and the drivers published."""

    def __init__(self, broker: Broker, reject_event: Callable[[Reject], tuple[str, dict[str, Any]]], *,
                 wanted: Callable[[str], bool] | None = None) -> None:
        """``reject_event``: where a reject goes and its CloudEvent (``Pipeline.reject_event``); ``wanted``:
        whether anybody consumes a topic (None: everything is published)."""
        self._broker = broker
        self._reject_event = reject_event
        self._wanted = wanted
        self._events = 0
        self._rejects = 0
        self.unwanted = 0  # valid events nobody consumed, so never made

    async def results(self, emit: Emitter) -> None:
        """What a batch (or a closing window) produced: its events, then its rejects."""
        for item in emit.outgoing():
            if isinstance(item, tuple):
                await self._publish(*item)
            elif self._wanted is None or self._wanted(item.topic):
                events = item.events()  # all on the item's topic: published together
                await self._broker.publish_many(item.topic, [dumps(event) for _, event in events],
                                                [event["id"] for _, event in events])
            else:
                self.unwanted += item.count
        self._events += emit.count
        await self.rejects(emit.rejects)

    async def _publish(self, topic: str, event: dict[str, Any]) -> None:
        await self._broker.publish(topic, dumps(event), event_id=event.get("id"))

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
