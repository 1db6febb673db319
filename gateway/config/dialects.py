"""``[[dialects]]``: foreign MQTT dialects mapped into the taxonomy (pipeline/dialects.py).

A shipped preset by name, changed where the site differs (another base topic, more metrics), or a rule
written out in full::

    [[dialects]]
    preset = "zigbee2mqtt"            # zigbee2mqtt | tasmota | shelly | multi
    topic = "zb/{device_id}"          # Zigbee2MQTT's base_topic is not the default here

    [[dialects]]
    name = "weather"
    topic = "weather/{device_id}/state"
    device_class = "weather"
    metrics = [{ path = "main.temp", metric = "temperature", unit = "K" },
               { path = "wind.*", metric = "wind_{0}" }]
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gateway.settings import Level, Model
from pipeline.dialects import (
    Dialect,
    DialectSet,
    MetricRule,
    TsUnit,
    multi_metric,
    own_topic_filters,
    parse_path,
    preset,
)
from pipeline.errors import TopicError
from pipeline.topics import TopicTemplate

Preset = Literal["zigbee2mqtt", "tasmota", "shelly", "multi"]
JsonPath = str | list[str]


class DialectMetric(Model):
    """One value in the payload: ``path`` (``a.b``, ``*`` for any member, or a list of members for names
    with dots) and the metric it becomes (default: the last member's name; ``{0}``, ``{1}``: what ``*``
    matched)."""

    path: JsonPath
    metric: str = ""
    unit: str | None = None
    unit_path: JsonPath | None = Field(default=None, description="the unit is read from the message here")
    values: dict[str, float] = Field(default_factory=dict, description='strings that stand for numbers: ON = 1')

    def to_rule(self) -> MetricRule:
        return MetricRule(parse_path(self.path), self.metric, self.unit,
                          None if self.unit_path is None else parse_path(self.unit_path), dict(self.values))


class DialectSettings(Model):
    name: Level | None = Field(default=None, description="default: the preset's name")
    preset: Preset | None = None
    topic: str | None = Field(default=None, description="levels: literals, +, {device_id} {device_class} "
                                                        "{site} {version} {metric}; default: the preset's")
    device_class: Level | None = None
    metrics: list[DialectMetric] = Field(default_factory=list, description="after the preset's own")
    units: dict[str, str] = Field(default_factory=dict, description="metric -> unit, over the preset's")
    exclude: list[str] = Field(default_factory=list, description="metric names not taken")
    ts: JsonPath | None = None
    ts_unit: TsUnit = "auto"
    seq: JsonPath | None = None
    match: dict[str, list[str]] = Field(default_factory=dict, description="path -> the values it must have")
    ignore_devices: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> DialectSettings:
        if self.preset is None and (self.name is None or self.topic is None):
            raise ValueError("a dialect without a preset needs a name and a topic")
        if self.preset == "multi" and self.topic is not None:
            raise ValueError("the multi preset's topic is the taxonomy's raw stage; it cannot be set")
        try:
            self.to_dialect(TopicTemplate())
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def effective_name(self) -> str:
        return self.name or self.preset or ""

    def to_dialect(self, template: TopicTemplate) -> Dialect:
        """The rule this entry describes, over ``template`` (the multi-metric preset follows the taxonomy)."""
        base = (multi_metric(template) if self.preset == "multi" else preset(self.preset)) if self.preset else None
        return Dialect(
            name=self.effective_name,
            topic=self.topic or (base.topic if base else ""),
            metrics=(*(base.metrics if base else ()), *(m.to_rule() for m in self.metrics)),
            device_class=self.device_class or (base.device_class if base else "mqtt"),
            units={**(base.units if base else {}), **self.units},
            units_path=base.units_path if base else None,
            exclude=(base.exclude if base else frozenset()) | frozenset(self.exclude),
            ts=parse_path(self.ts) if self.ts is not None else (base.ts if base else None),
            ts_unit=self.ts_unit if self.ts is not None or base is None else base.ts_unit,
            seq=parse_path(self.seq) if self.seq is not None else (base.seq if base else None),
            match=(*(base.match if base else ()), *((parse_path(p), frozenset(v)) for p, v in self.match.items())),
            ignore_devices=(base.ignore_devices if base else frozenset()) | frozenset(self.ignore_devices),
        )


def build_dialects(settings: list[DialectSettings], template: TopicTemplate, *, site: str, version: str,
                   own: tuple[str, ...] = ()) -> DialectSet:
    """The configured dialects, in order; ``own``: topics the gateway publishes beyond its taxonomy's (its
    status topic), which no dialect may read."""
    return DialectSet([d.to_dialect(template) for d in settings], site=site, version=version,
                      reserved=own_topic_filters(template, *own))
