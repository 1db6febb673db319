"""The NATS JetStream destination: its settings (:mod:`.settings`) and how they become a destination
(:mod:`.destination`, nats-py)."""

from __future__ import annotations

from gateway.forward.base import Destination
from gateway.forward.nats.settings import NatsForward
from pipeline.topics import TopicTemplate

__all__ = ["NatsForward", "build"]


def build(cfg: NatsForward, gateway_id: str, template: TopicTemplate) -> Destination:
    """The destination ``cfg`` describes (no I/O: it connects once started)."""
    from gateway.forward.nats.destination import (  # noqa: PLC0415  nats-py loads only when used
        NatsDestination,
        NatsSettings,
    )

    return NatsDestination(cfg.name, NatsSettings(
        url=cfg.url, gateway_id=gateway_id, stream=cfg.stream, create_stream=cfg.create_stream,
        topics=tuple(cfg.topics), subscribe=tuple(cfg.subscribe),
    ))
