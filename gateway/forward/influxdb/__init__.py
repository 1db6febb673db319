"""The InfluxDB sink: its settings (:mod:`.settings`) and how they become a destination
(:mod:`.destination`, influxdb-client)."""

from __future__ import annotations

from gateway.forward.base import Destination
from gateway.forward.influxdb.settings import INFLUX_DEFAULT_TAGS, INFLUX_NAME_FIELDS, InfluxForward, InfluxTag
from pipeline.topics import TopicTemplate

__all__ = ["INFLUX_DEFAULT_TAGS", "INFLUX_NAME_FIELDS", "InfluxForward", "InfluxTag", "build"]


def build(cfg: InfluxForward, gateway_id: str, template: TopicTemplate) -> Destination:
    """The destination ``cfg`` describes (no I/O: it connects once started). Reads the token from
    where the settings say (:class:`~gateway.errors.ConfigError` when its file or variable is absent)."""
    from gateway.forward.influxdb.destination import (  # noqa: PLC0415  influxdb-client loads only when used
        InfluxDestination,
        InfluxMapping,
        InfluxSettings,
    )

    mapping = InfluxMapping(gateway=gateway_id, measurement=cfg.measurement, field=cfg.field, tags=tuple(cfg.tags),
                            agg_measurement=cfg.agg_measurement)
    return InfluxDestination(cfg.name, InfluxSettings(
        url=cfg.url, bucket=cfg.bucket, mapping=mapping, template=template, org=cfg.org, token=cfg.token_value(),
        gzip=cfg.gzip, precision=cfg.precision, timeout_s=cfg.timeout_s, aggregates=cfg.aggregates,
    ))
