"""The Kafka destination: its settings (:mod:`.settings`) and how they become a destination
(:mod:`.destination`, aiokafka)."""

from __future__ import annotations

from gateway.forward.base import Destination
from gateway.forward.kafka.settings import KafkaForward
from pipeline.topics import TopicTemplate

__all__ = ["KafkaForward", "build"]


def build(cfg: KafkaForward, gateway_id: str, template: TopicTemplate) -> Destination:
    """The destination ``cfg`` describes (no I/O: it connects once started).

    Raises :class:`~gateway.forward.kafka.destination.KafkaSettingsError` for a ``kafka_topic``
    template that is not valid.
    """
    from gateway.forward.kafka.destination import (  # noqa: PLC0415  aiokafka loads only when used
        KafkaDestination,
        KafkaSettings,
    )

    return KafkaDestination(cfg.name, KafkaSettings(
        bootstrap_servers=cfg.url.removeprefix("kafka://"), topic=cfg.kafka_topic,
        client_id=f"iotgw-{gateway_id}-{cfg.name}",
    ))
