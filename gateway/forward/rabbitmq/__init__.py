"""The RabbitMQ destination: its settings (:mod:`.settings`), how topics become routing keys
(:mod:`.routing`) and the destination itself (:mod:`.destination`, aiormq)."""

from __future__ import annotations

from gateway.forward.base import Destination
from gateway.forward.rabbitmq.settings import RabbitForward
from pipeline.topics import TopicTemplate

__all__ = ["RabbitForward", "build"]


def build(cfg: RabbitForward, gateway_id: str, template: TopicTemplate) -> Destination:
    """The destination ``cfg`` describes (no I/O: it connects once started)."""
    from gateway.forward.rabbitmq.destination import (  # noqa: PLC0415  aiormq loads only when used
        RabbitDestination,
        RabbitSettings,
    )

    tls = cfg.tls
    own = f"iotgw.{gateway_id}.{cfg.name}"  # the gateway's own exchange and queues on the broker
    return RabbitDestination(cfg.name, RabbitSettings(
        url=cfg.url, gateway_id=gateway_id, username=cfg.username,
        password=cfg.password.get_secret_value() if cfg.password else None,
        ca_file=tls.ca_file if tls else None, cert_file=tls.cert_file if tls else None,
        key_file=tls.key_file if tls else None, exchange=cfg.exchange, declare_exchange=cfg.declare_exchange,
        queue=cfg.queue, topics=tuple(cfg.topics), subscribe=tuple(cfg.subscribe), own_prefix=own,
        downlink_queue=cfg.downlink_queue or f"{own}.downlink", dedupe_window=cfg.dedupe_window,
        confirm_timeout_s=cfg.confirm_timeout_s, heartbeat_s=cfg.heartbeat_s,
    ))
