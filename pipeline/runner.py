"""The pipeline: an ordered chain of stages run batch by batch.

The gateway builds the stages from config and hands them here; :meth:`Pipeline.run` turns one
batch of raw messages into stored readings plus the events (valid, agg, rejected) to publish.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pipeline.model import REJECT_TYPE, Reading, cloudevent, new_event_id
from pipeline.stage import Draft, Emitter, RawMessage, Reject, Stage
from pipeline.topics import TopicFields, TopicTemplate

log = logging.getLogger(__name__)
STAGE_NAMES = ("collect", "clean", "define", "store", "analyze")


def _origin(item: object) -> tuple[str, bytes]:
    """The topic and payload an item came from, for the reject topic."""
    if isinstance(item, RawMessage | Draft):
        return item.topic, item.payload
    if isinstance(item, Reading):
        return "", item.model_dump_json().encode()
    return "", repr(item).encode()


class Pipeline:
    def __init__(self, stages: Sequence[Stage[Any, Any]], template: TopicTemplate, *, site: str, version: str) -> None:
        self.stages = tuple(stages)
        self._template = template
        self._site = site
        self._version = version

    async def run(self, batch: list[RawMessage]) -> Emitter:
        emit = Emitter()
        await self.run_range(batch, emit)
        return emit

    async def run_range(self, items: list[Any], emit: Emitter, start: int = 0, stop: int | None = None) -> list[Any]:
        """Stages ``start`` to ``stop`` (exclusive) over ``items``: the gateway runs the stages as two
        tasks joined by a bounded queue (see gateway/service.py), each calling this for its part.
        Never raises for a failing stage: it rejects what it was given and the chain stops there."""
        for stage in self.stages[start:stop]:
            if not items:
                break
            try:
                items = await stage.process(items, emit)
            except Exception as exc:
                # A bug in one stage must not stop ingestion, and the batch must not vanish:
                # every item goes to the reject topic with the error, and the next batch runs.
                log.exception("stage %s failed on a batch of %d; rejecting it as internal_error", stage.name,
                              len(items))
                stage.stats.rejected["internal_error"] += len(items)
                for item in items:
                    emit.reject(stage.name, "internal_error", repr(exc)[:300], *_origin(item))
                return []
        return items

    def reject_event(self, reject: Reject) -> tuple[str, dict[str, Any]]:
        """Where a reject is published (the ``rejected`` stage) and its CloudEvent."""
        topic = self._template.with_stage(reject.topic, "rejected")
        if topic is None:  # the topic itself was the problem: file it under placeholders
            topic = self._template.format(TopicFields(
                stage="rejected", version=self._version, site=self._site,
                device_class="_unknown", device_id="_unknown", metric="_unknown",
            ))
        try:
            payload: str = reject.payload.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(reject.payload).decode("ascii"), "base64"
        return topic, cloudevent(
            event_id=new_event_id(),
            source=f"/iotgw/{self._site}/pipeline/{reject.stage}",
            type_=REJECT_TYPE,
            subject=topic,
            time=datetime.now(UTC),
            data={
                "stage": reject.stage, "reason": reject.reason, "detail": reject.detail,
                "topic": reject.topic, "payload": payload, "payload_encoding": encoding,
            },
        )

    def stats(self) -> dict[str, dict[str, Any]]:
        return {stage.name: stage.stats.as_dict() for stage in self.stages}
