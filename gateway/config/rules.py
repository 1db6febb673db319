"""``[[rules]]``: alert rules (threshold, rate of change, z-score, by ``kind``) over selected series, and
device inactivity (``kind = "inactivity"``, pipeline/liveness.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway.settings import Model
from pipeline.liveness import InactivityRule
from pipeline.rules import RateRule, Rule, Selector, ThresholdRule, ZScoreRule


class _Rule(Model):
    name: str = Field(min_length=1, max_length=128)
    device_id: str = Field(default="*", min_length=1, description="wildcards: * ? [abc]")
    device_class: str = Field(default="*", min_length=1)
    metric: str = Field(default="*", min_length=1)
    severity: str = Field(default="warning", min_length=1)

    def _selector(self) -> Selector:
        return Selector(self.device_id, self.device_class, self.metric)


class ThresholdRuleSettings(_Rule):
    kind: Literal["threshold"]
    high: float | None = None
    low: float | None = None
    clear_below: float | None = Field(default=None, description="default: high")
    clear_above: float | None = Field(default=None, description="default: low")
    for_s: float = Field(default=0.0, ge=0, description="how long the value must stay over the limit")

    @model_validator(mode="after")
    def _limits(self) -> ThresholdRuleSettings:
        if self.high is None and self.low is None:
            raise ValueError("needs high, low or both")
        if self.high is not None and self.clear_below is not None and self.clear_below > self.high:
            raise ValueError("clear_below must not exceed high")
        if self.low is not None and self.clear_above is not None and self.clear_above < self.low:
            raise ValueError("clear_above must not be under low")
        if self.high is not None and self.low is not None:
            top = self.high if self.clear_below is None else self.clear_below
            bottom = self.low if self.clear_above is None else self.clear_above
            if bottom >= top:
                raise ValueError("low (clear_above) must be under high (clear_below)")
        if (self.high is None and self.clear_below is not None) or (self.low is None and self.clear_above is not None):
            raise ValueError("clear_below needs high, clear_above needs low")
        return self

    def to_rule(self) -> ThresholdRule:
        return ThresholdRule(self.name, self._selector(), self.high, self.low, self.clear_below, self.clear_above,
                             self.for_s, self.severity)


class RateRuleSettings(_Rule):
    kind: Literal["rate"]
    max_rate: float = Field(gt=0, description="absolute change per `per`")
    per: Literal["s", "min"] = "min"
    window_s: float = Field(default=60.0, gt=0)
    clear_rate: float | None = Field(default=None, ge=0, description="default: max_rate")

    @model_validator(mode="after")
    def _clear(self) -> RateRuleSettings:
        if self.clear_rate is not None and self.clear_rate > self.max_rate:
            raise ValueError("clear_rate must not exceed max_rate")
        return self

    def to_rule(self) -> RateRule:
        return RateRule(self.name, self._selector(), self.max_rate, self.per, self.window_s, self.clear_rate,
                        self.severity)


class ZScoreRuleSettings(_Rule):
    kind: Literal["zscore"]
    k: float = Field(default=3.0, gt=0)
    window: int = Field(default=30, ge=2, le=100_000, description="readings")
    clear_k: float | None = Field(default=None, gt=0, description="default: k")

    @model_validator(mode="after")
    def _clear(self) -> ZScoreRuleSettings:
        if self.clear_k is not None and self.clear_k > self.k:
            raise ValueError("clear_k must not exceed k")
        return self

    def to_rule(self) -> ZScoreRule:
        return ZScoreRule(self.name, self._selector(), self.k, self.window, self.clear_k, self.severity)


class InactivityRuleSettings(_Rule):
    """No reading from a selected device (of ``metric``, when it names one) for ``after_s`` raises an alert;
    its next reading clears it."""

    kind: Literal["inactivity"]
    after_s: float = Field(gt=0, description="seconds without a reading")

    def to_rule(self) -> InactivityRule:
        return InactivityRule(self.name, self._selector(), self.after_s, self.severity)


RuleSettings = Annotated[
    ThresholdRuleSettings | RateRuleSettings | ZScoreRuleSettings | InactivityRuleSettings,
    Field(discriminator="kind"),
]
RULE_KINDS = ("threshold", "rate", "zscore", "inactivity")


def series_rules(rules: list[RuleSettings]) -> list[Rule]:
    """The rules the analyze stage evaluates on each reading (pipeline/rules.py)."""
    return [r.to_rule() for r in rules if not isinstance(r, InactivityRuleSettings)]


def inactivity_rules(rules: list[RuleSettings]) -> list[InactivityRule]:
    """The rules the liveness stage watches devices by (pipeline/liveness.py)."""
    return [r.to_rule() for r in rules if isinstance(r, InactivityRuleSettings)]
