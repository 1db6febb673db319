"""What every ``[[forward]]`` destination's settings share: its name, what it forwards and receives, and
its outbox's bounds and batches. Each destination type extends :class:`ForwardSettingsBase` with a
``type`` tag and its own fields, in its own package (``gateway/forward/<type>/settings.py``).

Settings modules import no client library: the configuration loads every destination type's model,
and a client library loads only when a destination of its type is built (:mod:`gateway.forward.registry`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.settings import Level, Model
from pipeline.errors import TopicError
from pipeline.topics import TopicTemplate, compile_filter


class ForwardSettingsBase(Model):
    """The fields of every ``[[forward]]``; a destination type adds ``type: Literal["<its name>"]``."""

    name: Level
    url: str = Field(min_length=1)
    topics: list[str] = Field(min_length=1, description="filters, MQTT (+ #) or Solace/NATS (* >) syntax")
    subscribe: list[str] = Field(default_factory=list, description="backbone filters: downlink and mesh")
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    when_full: Literal["drop_oldest", "refuse"] = "drop_oldest"
    batch_size: int = Field(default=500, ge=1, le=10_000)
    replay: Literal["in_order", "fresh_first"] = Field(
        default="in_order", description="after an outage: strict order, or backlog and live data in turn"
    )

    @field_validator("topics", "subscribe")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                compile_filter(pattern)
            except TopicError as exc:
                raise ValueError(f"{pattern!r}: {exc}") from None
        return value

    def default_topics(self, template: TopicTemplate) -> list[str]:
        """What the destination forwards when ``topics`` is left empty (where its type allows that)."""
        return []


def forward_topics(forward: ForwardSettingsBase, template: TopicTemplate) -> list[str]:
    """The topic filters a destination forwards: its own, or its type's default (InfluxDB: the valid
    readings of the topic taxonomy, and its aggregates when enabled)."""
    return list(forward.topics) or forward.default_topics(template)
