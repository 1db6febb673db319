"""Readings per second through the define stage (catalog validation + the valid CloudEvent), beside the
define stage as it was before the catalog (``Reading(...)`` + ``to_cloudevent`` per draft), in the
same run and on the same drafts.

    .venv/bin/python bench/define.py [--drafts 50000] [--rounds 5]

Cases: the built-in (lenient) catalog; a strict catalog whose declared type checks unit and range;
one whose type also reads an extra field from the raw payload (a JSON parse per reading). Each with
and without publishing the valid event (the store-only path). Figures are the best round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.catalog import Catalog
from pipeline.define import DefineStage
from pipeline.model import Quality, Reading, new_event_id, to_ms
from pipeline.stage import Draft, Emitter
from pipeline.topics import TopicTemplate

TEMPLATE = TopicTemplate()


@dataclass(frozen=True)
class Value:
    unit: str | None = "°C"
    minimum: float | None = -40
    maximum: float | None = 85
    description: str = ""


@dataclass(frozen=True)
class Extra:
    type: Any = "number"
    unit: str | None = "°C"
    description: str = ""
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Decl:
    name: str = "com.example.temperature.v1"
    version: str = "1.0"
    metric: str = "temperature"
    device_classes: tuple[str, ...] = ("environment",)
    description: str = ""
    value: Value = Value()
    fields: dict[str, Extra] = field(default_factory=dict)


class BaselineDefine:
    """The define stage before the catalog (commit 47503f4), kept here as the yardstick."""

    name = "define"

    def __init__(self, template: TopicTemplate, *, publish_valid: bool = True) -> None:
        self._template = template
        self._publish_valid = publish_valid

    async def process(self, batch: list[Draft], emit: Emitter) -> list[Reading]:
        out: list[Reading] = []
        for draft in batch:
            fields = draft.fields
            reading = Reading(
                id=draft.event_id or new_event_id(to_ms(draft.received_at)), site=fields.site,
                device_id=fields.device_id, device_class=fields.device_class,
                transport=draft.transport,
                metric=fields.metric, value=draft.value,
                unit=draft.unit, device_ts=draft.device_ts, received_at=draft.received_at, seq=draft.seq,
                quality=() if draft.device_ts else (Quality.DEVICE_TIME_MISSING,),
            )
            out.append(reading)
            if self._publish_valid:
                topic = self._template.with_stage(draft.topic, "valid")
                if topic is not None:
                    emit.publish(topic, reading.to_cloudevent(topic))
        return out


def make_drafts(count: int) -> list[Draft]:
    now = datetime.now(UTC)
    drafts = []
    for i in range(count):
        topic = f"telemetry/raw/1.0/bench/environment/dev-{i % 16}/temperature"
        fields = TEMPLATE.parse(topic)
        assert fields is not None
        drafts.append(Draft(
            topic=topic, fields=fields, transport="mqtt", value=float(i % 40), unit="°C", device_ts=now, seq=i,
            received_at=now, payload=b'{"value": 21.5, "unit": "\xc2\xb0C", "seq": 1, "accuracy": 0.2}',
            event_id=new_event_id(),
        ))
    return drafts


def measure(process: Callable[[list[Draft], Emitter], Coroutine[Any, Any, Sequence[Reading]]],
            drafts: list[Draft]) -> float:
    gc.collect()
    emit = Emitter()
    start = time.perf_counter()
    out = asyncio.run(process(drafts, emit))
    emit.events  # noqa: B018  (the valid events, made now as for a consumer: the define stage defers them)
    elapsed = time.perf_counter() - start
    if len(out) != len(drafts) or emit.rejects:
        raise SystemExit(f"bench broken: {len(out)} of {len(drafts)} passed, rejects {emit.rejects[:1]}")
    return len(drafts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drafts", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    drafts = make_drafts(args.drafts)
    strict = Catalog(TEMPLATE, [Decl()], strict=True)
    extra = Catalog(TEMPLATE, [Decl(fields={"accuracy": Extra()})], strict=True)
    print(f"define stage, {args.drafts} drafts per round, best of {args.rounds} rounds (readings/s)")
    for publish in (True, False):
        cases: dict[str, Any] = {
            "baseline (before the catalog)": BaselineDefine(TEMPLATE, publish_valid=publish),
            "catalog: built-in reading": DefineStage(TEMPLATE, publish_valid=publish),
            "catalog: strict, unit+range": DefineStage(TEMPLATE, publish_valid=publish, catalog=strict),
            "catalog: strict, +extra field": DefineStage(TEMPLATE, publish_valid=publish, catalog=extra),
        }
        best = dict.fromkeys(cases, 0.0)
        for _ in range(args.rounds):  # interleaved, so load from other processes hits every case alike
            for name, stage in cases.items():
                best[name] = max(best[name], measure(stage.process, drafts))
        base = best["baseline (before the catalog)"]
        print(f"-- {'publishing the valid event' if publish else 'without publishing (store-only path)'}")
        for name, rate in best.items():
            print(f"  {name:<32} {rate:>10,.0f}/s  ratio {rate / base:.2f}")


if __name__ == "__main__":
    main()
