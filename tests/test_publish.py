"""What the pipeline raised goes onto the broker (gateway/publish.py): the valid events only where
somebody consumes their topic, everything else always."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.publish import Publisher
from pipeline.define import DefineStage
from pipeline.model import new_event_id
from pipeline.runner import Pipeline
from pipeline.stage import Draft, Emitter
from pipeline.topics import TopicTemplate

TEMPLATE = TopicTemplate()
NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)


class Broker:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, str | None]] = []

    async def publish(self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None,
                      qos: int = 0) -> None:
        self.published.append((topic, payload, event_id))

    async def publish_many(self, topic: str, payloads: Sequence[bytes], event_ids: Sequence[str]) -> None:
        self.published += [(topic, payload, event_id) for payload, event_id in zip(payloads, event_ids, strict=True)]


def draft(device: str, value: float) -> Draft:
    topic = f"telemetry/raw/1.0/s1/env/{device}/temperature"
    fields = TEMPLATE.parse(topic)
    assert fields is not None
    return Draft(topic=topic, fields=fields, transport="mqtt", value=value, unit="C", device_ts=NOW, seq=None,
                 received_at=NOW, payload=b"{}", event_id=new_event_id())


async def test_valid_events_go_only_where_they_are_consumed() -> None:
    wanted = "telemetry/valid/1.0/s1/env/d1/temperature"
    broker = Broker()
    publisher = Publisher(broker, Pipeline([], TEMPLATE, site="s1", version="1.0").reject_event,
                          wanted=lambda topic: topic == wanted)
    emit = Emitter()
    readings = await DefineStage(TEMPLATE).process([draft("d1", 1.0), draft("d2", 2.0), draft("d1", 3.0)], emit)
    agg: dict[str, Any] = {"id": new_event_id(), "data": {}}
    emit.publish("telemetry/agg/1.0/s1/env/d2/temperature", agg)
    await publisher.results(emit)
    valid = [(t, json.loads(p)["data"]["value"], i) for t, p, i in broker.published if "/valid/" in t]
    assert valid == [(wanted, 1.0, readings[0].id), (wanted, 3.0, readings[2].id)]
    others = [(t, i) for t, _, i in broker.published if "/valid/" not in t]
    assert others == [("telemetry/agg/1.0/s1/env/d2/temperature", agg["id"])]  # not a valid event: always
    assert publisher.unwanted == 1
    assert publisher.status().events == 4  # raised, consumed or not


async def test_without_a_consumer_check_everything_is_published() -> None:
    broker = Broker()
    publisher = Publisher(broker, Pipeline([], TEMPLATE, site="s1", version="1.0").reject_event)
    emit = Emitter()
    await DefineStage(TEMPLATE).process([draft("d1", 1.0), draft("d2", 2.0)], emit)
    await publisher.results(emit)
    assert len(broker.published) == 2
    assert publisher.unwanted == 0
