"""Destinations by type name (``[[forward]] type = "mqtt" | "nats" | "kafka" | "influxdb"``). Each client
library is imported only when a destination of its type is configured."""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import ForwardSettings, InfluxForward, KafkaForward, MqttForward, NatsForward
from gateway.forward.base import Destination
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate


def _mqtt(cfg: MqttForward, gateway_id: str) -> Destination:
    from gateway.forward.mqtt import MqttDestination, MqttSettings, Rewrite

    tls = cfg.tls
    return MqttDestination(cfg.name, MqttSettings(
        url=cfg.url, gateway_id=gateway_id, client_id=cfg.client_id or f"iotgw-{gateway_id}-{cfg.name}",
        protocol=cfg.protocol, username=cfg.username,
        password=cfg.password.get_secret_value() if cfg.password else None,
        ca_file=tls.ca_file if tls else None, cert_file=tls.cert_file if tls else None,
        key_file=tls.key_file if tls else None, topic_prefix=cfg.topic_prefix,
        rewrite=tuple(Rewrite(r.from_, r.to) for r in cfg.rewrite), subscribe=tuple(cfg.subscribe),
    ))


def _nats(cfg: NatsForward, gateway_id: str) -> Destination:
    from gateway.forward.nats import NatsDestination, NatsSettings

    return NatsDestination(cfg.name, NatsSettings(
        url=cfg.url, gateway_id=gateway_id, stream=cfg.stream, create_stream=cfg.create_stream,
        topics=tuple(cfg.topics), subscribe=tuple(cfg.subscribe),
    ))


def _kafka(cfg: KafkaForward, gateway_id: str) -> Destination:
    from gateway.forward.kafka import KafkaDestination, KafkaSettings

    return KafkaDestination(cfg.name, KafkaSettings(
        bootstrap_servers=cfg.url.removeprefix("kafka://"), topic=cfg.kafka_topic,
        client_id=f"iotgw-{gateway_id}-{cfg.name}",
    ))


def _influxdb(cfg: InfluxForward, gateway_id: str, template: TopicTemplate | None = None) -> Destination:
    from gateway.forward.influxdb import InfluxDestination, InfluxMapping, InfluxSettings

    mapping = InfluxMapping(gateway=gateway_id, measurement=cfg.measurement, field=cfg.field, tags=tuple(cfg.tags),
                            agg_measurement=cfg.agg_measurement)
    return InfluxDestination(cfg.name, InfluxSettings(
        url=cfg.url, bucket=cfg.bucket, mapping=mapping, template=template or TopicTemplate(DEFAULT_TEMPLATE),
        org=cfg.org, token=cfg.token_value(), gzip=cfg.gzip, precision=cfg.precision, timeout_s=cfg.timeout_s,
        aggregates=cfg.aggregates,
    ))


BUILDERS: dict[str, Callable[..., Destination]] = {"mqtt": _mqtt, "nats": _nats, "kafka": _kafka, "influxdb": _influxdb}
NEEDS_TEMPLATE = frozenset({"influxdb"})  # builders that map topics to fields (the taxonomy's template)


def build_destination(cfg: ForwardSettings, gateway_id: str, template: TopicTemplate | None = None) -> Destination:
    if cfg.type in NEEDS_TEMPLATE:
        return BUILDERS[cfg.type](cfg, gateway_id, template)
    return BUILDERS[cfg.type](cfg, gateway_id)
