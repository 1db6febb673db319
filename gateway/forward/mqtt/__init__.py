"""The MQTT bridge: its settings (:mod:`.settings`) and how they become a destination
(:mod:`.destination`, paho-mqtt)."""

from __future__ import annotations

from gateway.forward.base import Destination
from gateway.forward.mqtt.settings import MqttForward, RewriteRule, TlsSettings
from pipeline.topics import TopicTemplate

__all__ = ["MqttForward", "RewriteRule", "TlsSettings", "build"]


def build(cfg: MqttForward, gateway_id: str, template: TopicTemplate) -> Destination:
    """The destination ``cfg`` describes (no I/O: it connects once started)."""
    from gateway.forward.mqtt.destination import (  # noqa: PLC0415  paho loads only when used
        MqttDestination,
        MqttSettings,
    )

    tls = cfg.tls
    return MqttDestination(cfg.name, MqttSettings(
        url=cfg.url, gateway_id=gateway_id, client_id=cfg.client_id or f"iotgw-{gateway_id}-{cfg.name}",
        protocol=cfg.protocol, username=cfg.username,
        password=cfg.password.get_secret_value() if cfg.password else None,
        ca_file=tls.ca_file if tls else None, cert_file=tls.cert_file if tls else None,
        key_file=tls.key_file if tls else None, topic_prefix=cfg.topic_prefix,
        rewrite=tuple(cfg.rewrite), subscribe=tuple(cfg.subscribe), max_inflight=cfg.max_inflight,
    ))
