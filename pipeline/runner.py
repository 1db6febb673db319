"""The pipeline: an ordered chain of stages run batch by batch.

The gateway builds the stages from config and hands them here; :meth:`Pipeline.run` turns one
batch of raw messages into stored readings plus the events (valid, agg, rejected) to publish.

A pipeline has two halves: the ``front`` stages (CPU work on the event loop: collect, clean, define)
and the ``back`` stages (the store and what follows it, waiting on SQLite's thread). A caller that
wants one batch in each half at once runs :meth:`Pipeline.run_front` and :meth:`Pipeline.run_back`
in two tasks (gateway/flow.py does); batches stay in order when each half takes them in order.
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
    def __init__(
        self, front: Sequence[Stage[Any, Any]], template: TopicTemplate, *, site: str, version: str,
        back: Sequence[Stage[Any, Any]] = (),
    ) -> None:
        """``front`` then ``back``: see the module docstring for where one half ends."""
        self.stages = (*front, *back)
        self._split = len(front)
        self._template = template
        self._site = site
        self._version = version

    async def run(self, batch: list[RawMessage]) -> Emitter:
        """One batch through every stage."""
        emit = Emitter()
        await self._run(self.stages, batch, emit)
        return emit

    async def run_front(self, batch: list[RawMessage], emit: Emitter) -> Sequence[Any]:
        """The front half over ``batch``: what it returns goes to :meth:`run_back` with the same ``emit``."""
        return await self._run(self.stages[:self._split], batch, emit)

    async def run_back(self, items: Sequence[Any], emit: Emitter) -> Sequence[Any]:
        """The back half over what :meth:`run_front` returned."""
        return await self._run(self.stages[self._split:], items, emit)

    @staticmethod
    async def _run(stages: Sequence[Stage[Any, Any]], items: Sequence[Any], emit: Emitter) -> Sequence[Any]:
        """Never raises for a failing stage: it rejects what it was given and the chain stops there."""
        for stage in stages:
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
