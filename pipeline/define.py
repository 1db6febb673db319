"""define: drafts -> validated :class:`~pipeline.model.Reading` events.

Each reading gets its event id here and is published on the ``valid`` stage as a CloudEvent.
"""

from __future__ import annotations

from pydantic import ValidationError

from pipeline.model import Quality, Reading, new_event_id, to_ms
from pipeline.stage import Draft, Emitter, StageStats
from pipeline.topics import TopicTemplate


def _quality(draft: Draft) -> tuple[Quality, ...]:
    flags = tuple(Quality(flag) for flag in draft.quality)
    return flags if draft.device_ts or flags else (Quality.DEVICE_TIME_MISSING,)


class DefineStage:
    name = "define"

    def __init__(self, template: TopicTemplate, *, publish_valid: bool = True) -> None:
        self._template = template
        self._publish_valid = publish_valid
        self.stats = StageStats()

    async def process(self, batch: list[Draft], emit: Emitter) -> list[Reading]:
        out: list[Reading] = []
        for draft in batch:
            fields = draft.fields
            try:
                reading = Reading(
                    id=draft.event_id or new_event_id(to_ms(draft.received_at)),
                    site=fields.site,
                    device_id=fields.device_id,
                    device_class=fields.device_class,
                    transport=draft.transport,  # validated by the model
                    metric=fields.metric,
                    value=draft.value,  # validated by the model
                    unit=draft.unit,
                    device_ts=draft.device_ts,
                    received_at=draft.received_at,
                    seq=draft.seq,
                    quality=_quality(draft),
                )
            except ValidationError as exc:
                detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                self.stats.rejected["invalid_event"] += 1
                emit.reject(self.name, "invalid_event", detail, draft.topic, draft.payload)
                continue
            out.append(reading)
            if self._publish_valid:
                topic = self._template.with_stage(draft.topic, "valid")
                if topic is not None:
                    emit.publish(topic, reading.to_cloudevent(topic))
        self.stats.received += len(batch)
        self.stats.passed += len(out)
        return out
