"""Destinations by type name (``[[forward]] type = "mqtt" | "nats" | "kafka" | "influxdb" | "rabbitmq" |
"redis"``): each type's settings model, which ``[[forward]]`` validates against, and its factory. A client
library loads only when a destination of its type is built."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Generic, TypeVar

from pydantic import Field

from gateway.forward import influxdb, kafka, mqtt, nats, rabbitmq, redis
from gateway.forward.base import Destination
from gateway.forward.influxdb import InfluxForward
from gateway.forward.kafka import KafkaForward
from gateway.forward.mqtt import MqttForward
from gateway.forward.nats import NatsForward
from gateway.forward.rabbitmq import RabbitForward
from gateway.forward.redis import RedisForward
from gateway.forward.settings import ForwardSettingsBase
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate

S = TypeVar("S", bound=ForwardSettingsBase)


@dataclass(frozen=True, slots=True)
class DestinationType(Generic[S]):
    """A destination type: its ``[[forward]]`` settings, and how they become a destination (no I/O)."""

    settings: type[S]
    build: Callable[[S, str, TopicTemplate], Destination]  # (settings, gateway id, topic template)


DESTINATIONS: Mapping[str, DestinationType[Any]] = MappingProxyType({
    "mqtt": DestinationType(MqttForward, mqtt.build),
    "nats": DestinationType(NatsForward, nats.build),
    "kafka": DestinationType(KafkaForward, kafka.build),
    "influxdb": DestinationType(InfluxForward, influxdb.build),
    "rabbitmq": DestinationType(RabbitForward, rabbitmq.build),
    "redis": DestinationType(RedisForward, redis.build),
})
FORWARD_TYPES = tuple(DESTINATIONS)

# The settings of one [[forward]]: the models of DESTINATIONS, told apart by ``type`` (written out for
# the type checker; tests/test_forward_registry.py checks that it names each registered model).
ForwardSettings = MqttForward | NatsForward | KafkaForward | InfluxForward | RabbitForward | RedisForward
Forward = Annotated[ForwardSettings, Field(discriminator="type")]


def build_destination(cfg: ForwardSettings, gateway_id: str, template: TopicTemplate | None = None) -> Destination:
    """The destination ``cfg`` describes, not yet started. ``template``: the topic taxonomy's (the
    default one when not given), which destinations that map topics to fields read."""
    return DESTINATIONS[cfg.type].build(cfg, gateway_id, template or TopicTemplate(DEFAULT_TEMPLATE))
