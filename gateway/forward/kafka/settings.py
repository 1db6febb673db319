"""``[[forward]] type = "kafka"``: Kafka brokers, topics named from a template over the local topic."""

from __future__ import annotations

from typing import Literal

from gateway.forward.settings import ForwardSettingsBase


class KafkaForward(ForwardSettingsBase):
    type: Literal["kafka"]
    kafka_topic: str = "iotgw.{stage}"
