"""``[pipeline]`` and ``[topics]``: the stages' queue and batches, the clean stage's rules per metric,
the analyze stage's windows, and the topic taxonomy."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from gateway.query import parse_duration
from gateway.settings import Level, Model
from pipeline.errors import TopicError
from pipeline.topics import DEFAULT_TEMPLATE, DEFAULT_VERSION, TopicTemplate
from pipeline.units import UNITS


class MetricRules(Model):
    """How the clean stage treats one metric, whichever device sends it (pipeline/clean.py)."""

    min: float | None = None
    max: float | None = None
    max_rate_per_s: float | None = Field(
        default=None, gt=0, description="spike filter: a faster step from the last kept value is dropped"
    )
    stuck_after_s: float | None = Field(default=None, gt=0, description="the same value for longer is 'stuck'")
    deadband: float | None = Field(default=None, gt=0, description="report on change: smaller changes are dropped")
    deadband_max_interval_s: float = Field(default=300.0, gt=0, description="a heartbeat passes the deadband")

    @model_validator(mode="after")
    def _ordered(self) -> MetricRules:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


DEFAULT_METRIC_RULES: dict[str, MetricRules] = {
    "temperature": MetricRules(min=-60, max=150),
    "humidity": MetricRules(min=0, max=100),
    "battery": MetricRules(min=0, max=100),
    "pm2_5": MetricRules(min=0, max=1000),
    "pm10": MetricRules(min=0, max=2000),
    "co2": MetricRules(min=0, max=40000),
    "pressure": MetricRules(min=300, max=1200),
}


def _known_unit(value: str) -> str:
    if value not in UNITS:
        raise ValueError(f"unknown unit {value!r}; known: {', '.join(sorted({u.symbol for u in UNITS.values()}))}")
    return value


class CleanSettings(Model):
    metrics: dict[str, MetricRules] = Field(
        default_factory=lambda: dict(DEFAULT_METRIC_RULES),
        description="rules by metric name; naming [pipeline.clean.metrics] replaces the built-in ones",
    )
    units: dict[Level, dict[str, Annotated[str, AfterValidator(_known_unit)]]] = Field(
        default_factory=dict, description="device class -> metric -> unit to normalise to"
    )
    clock_policy: Literal["correct", "reject"] = "correct"
    max_clock_ahead_s: float = Field(default=60.0, gt=0)
    max_clock_behind_s: float = Field(default=86_400.0, gt=0)
    duplicate_window_s: float = Field(default=600.0, ge=0, description="a repeated sequence number is a duplicate")


class AnalyzeSettings(Model):
    windows: list[str] = Field(default_factory=lambda: ["1m", "1h"], min_length=1,
                               description="tumbling windows, aligned to wall-clock boundaries")
    grace_s: float = Field(default=5.0, ge=0, description="how long a window waits for late readings")

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        seconds = []
        for text in value:
            duration = parse_duration(text).total_seconds()
            if duration < 1 or duration != int(duration):
                raise ValueError(f"{text!r}: a window must be a whole number of seconds")
            seconds.append(duration)
        if len(set(seconds)) != len(seconds):
            raise ValueError("windows must differ")
        return value

    @property
    def windows_s(self) -> list[float]:
        return [parse_duration(text).total_seconds() for text in self.windows]


class PipelineSettings(Model):
    queue_size: int = Field(default=1000, ge=1, le=1_000_000, description="messages")
    batch_size: int = Field(default=500, ge=1, le=50_000)
    max_latency_s: float = Field(default=0.5, ge=0, le=60, description="how long a short batch waits to fill")
    clean: CleanSettings = CleanSettings()
    analyze: AnalyzeSettings = AnalyzeSettings()
    stall_s: float = Field(default=120.0, gt=0, description="a batch inside the stages longer is unhealthy")


class TopicSettings(Model):
    template: str = DEFAULT_TEMPLATE
    version: str = DEFAULT_VERSION

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            TopicTemplate(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+", value):
            raise ValueError("must be MAJOR.MINOR, for example 1.0")
        return value
