"""Alert rules (pipeline/rules.py) on synthetic readings with explicit times, their events through the
analyze stage, their config validation, and the store's list of alerts. Nothing is mocked: the
stage's clock is a plain callable it takes by design."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from pipeline.analyze import AnalyzeStage
from pipeline.model import ALERT_CLEARED_TYPE, ALERT_TYPE, Reading, new_event_id
from pipeline.rules import (
    RateRule,
    RateState,
    RuleSet,
    RuleState,
    Selector,
    ThresholdRule,
    ZScoreRule,
    ZScoreState,
)
from pipeline.stage import Emitter
from pipeline.store import SqliteStore, StoreReader
from pipeline.topics import TopicTemplate

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z, seconds
ALL = Selector()
ALERT_FIELDS = {"rule", "kind", "device_id", "metric", "severity", "value", "message", "raised_at"}


def drive(state: RuleState, values: Sequence[float], *, step_s: float = 1.0) -> list[tuple[int, str]]:
    """Feed values one per ``step_s``; return (index, "raise"|"clear") for every change."""
    changes = []
    for i, value in enumerate(values):
        if state.update(T0 + i * step_s, value) is not None:
            changes.append((i, "raise" if state.active else "clear"))
    return changes


# -- threshold ----------------------------------------------------------------------------------


def test_threshold_hysteresis_does_not_flap_around_the_limit() -> None:
    state = ThresholdRule("hot", ALL, high=30.0, clear_below=28.0).new_state()
    noisy = [29.0, 30.5, 29.9, 30.2, 29.5, 30.1, 28.5, 30.9, 27.9, 29.0, 29.9, 30.0, 30.01]
    assert drive(state, noisy) == [(1, "raise"), (8, "clear"), (12, "raise")]


def test_threshold_without_hysteresis_clears_once_strictly_below() -> None:
    state = ThresholdRule("hot", ALL, high=30.0).new_state()
    # raise above 30, clear below 30: exactly 30 does neither
    assert drive(state, [31.0, 30.0, 31.0, 29.9, 30.0, 30.1]) == [(0, "raise"), (3, "clear"), (5, "raise")]


def test_threshold_minimum_duration_needs_an_unbroken_excursion() -> None:
    state = ThresholdRule("hot", ALL, high=30.0, for_s=5.0).new_state()
    # over for 4 s, a dip resets the timer, then over for 5 s: raised on the reading 5 s after the start
    values = [31, 31, 31, 31, 31, 29, 31, 31, 31, 31, 31, 31, 31]
    assert drive(state, [float(v) for v in values]) == [(11, "raise")]
    assert state.update(T0 + 20, 29.0) == "29 back within limits"


def test_threshold_low_side_and_message() -> None:
    state = ThresholdRule("cold", ALL, low=5.0, clear_above=7.0).new_state()
    assert state.update(T0, 4.5) == "4.5 < 5"
    assert state.update(T0 + 1, 6.0) is None  # inside the hysteresis band
    assert state.update(T0 + 2, 7.5) == "7.5 back within limits"


def test_threshold_both_sides_switching_side_restarts_the_timer() -> None:
    state = ThresholdRule("band", ALL, high=10.0, low=0.0, for_s=2.0).new_state()
    assert drive(state, [11.0, -1.0, 11.0, 11.0, 11.0]) == [(4, "raise")]


# -- rate -----------------------------------------------------------------------------------------


def test_rate_per_minute_over_a_window() -> None:
    state = RateRule("climb", ALL, max_rate=6.0, per="min", window_s=30.0).new_state()
    # +0.05/s = 3/min: fine; then +0.2/s = 12/min: raised; then flat again: cleared once the window forgets the climb
    values = [20 + 0.05 * i for i in range(20)] + [21 + 0.2 * i for i in range(1, 10)] + [22.8] * 40
    changes = drive(state, values)
    assert [kind for _, kind in changes] == ["raise", "clear"]
    raise_at, clear_at = changes[0][0], changes[1][0]
    assert 20 <= raise_at < 29
    assert clear_at >= 29


def test_rate_per_second_and_clear_rate_hysteresis() -> None:
    state = RateRule("jump", ALL, max_rate=1.0, per="s", window_s=10.0, clear_rate=0.5).new_state()
    assert state.update(T0, 0.0) is None  # one point: no rate yet
    assert state.update(T0 + 1, 2.0) == "rate +2/s exceeds 1/s"
    assert state.update(T0 + 2, 3.0) is None  # 1.5/s over the window: still active
    assert state.update(T0 + 10, 3.0) == "rate +0.3/s back within limits"


def test_rate_ignores_readings_that_go_back_in_time() -> None:
    state = RateRule("r", ALL, max_rate=1.0, per="s", window_s=10.0).new_state()
    assert isinstance(state, RateState)
    state.update(T0 + 5, 0.0)
    assert state.update(T0 + 4, 100.0) is None
    assert state.update(T0 + 5, 100.0) is None  # the same instant: no division by zero
    assert list(state.points) == [(T0 + 5, 0.0)]


# -- z-score --------------------------------------------------------------------------------------


def test_zscore_matches_statistics_and_raises_beyond_k() -> None:
    state = ZScoreRule("odd", ALL, k=3.0, window=10).new_state()
    assert isinstance(state, ZScoreState)
    base = [10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 10.3, 9.7, 10.0]
    assert drive(state, base) == []  # the window fills first
    expected_z = (12.0 - statistics.fmean(base)) / statistics.pstdev(base)
    assert state.z(12.0) == pytest.approx(expected_z, rel=1e-9)
    assert expected_z > 3
    assert state.update(T0 + 10, 12.0) is not None
    assert state.active
    assert state.update(T0 + 11, 10.0) is not None  # |z| small again: cleared
    assert not state.active


def test_zscore_sliding_window_stays_exact_over_many_readings() -> None:
    state = ZScoreRule("odd", ALL, k=50.0, window=25).new_state()
    assert isinstance(state, ZScoreState)
    values = [((i * 7919) % 101) / 3.0 + 1000.0 for i in range(2000)]
    drive(state, values)
    window = values[-25:]
    assert list(state.values) == window
    assert state.mean == pytest.approx(statistics.fmean(window), rel=1e-12)
    assert state.z(1010.0) == pytest.approx((1010.0 - statistics.fmean(window)) / statistics.pstdev(window), rel=1e-6)


def test_zscore_clear_k_hysteresis_and_flat_window() -> None:
    state = ZScoreRule("odd", ALL, k=2.0, window=4, clear_k=1.0).new_state()
    assert drive(state, [5.0, 5.0, 5.0, 5.0]) == []
    assert state.update(T0 + 4, 5.1) is not None  # a flat window: any change is infinitely unusual
    assert state.active


# -- rule sets and the analyze stage ----------------------------------------------------------------

TEMPLATE = TopicTemplate()


def reading(value: float, t: float, *, device_id: str = "boiler-1", metric: str = "temperature",
            device_class: str = "heating") -> Reading:
    ts = datetime.fromtimestamp(t, UTC)
    return Reading(
        id=new_event_id(int(t * 1000)), site="site1", device_id=device_id, device_class=device_class,
        transport="mqtt", metric=metric, value=value, unit="C", device_ts=ts, received_at=ts,
    )


def test_selector_wildcards_and_cached_matching() -> None:
    rules = RuleSet([
        ThresholdRule("boilers", Selector(device_id="boiler-*", metric="temp*"), high=90.0),
        ThresholdRule("heating", Selector(device_class="heating"), high=95.0),
        ZScoreRule("co2", Selector(metric="co2")),
    ])
    assert [w.rule.name for w in rules.watches("boiler-1", "heating", "temperature")] == ["boilers", "heating"]
    assert [w.rule.name for w in rules.watches("boiler-1", "heating", "pressure")] == ["heating"]
    assert rules.watches("room-1", "env", "humidity") == ()
    assert rules.watches("boiler-1", "heating", "temperature") is rules.watches("boiler-1", "heating", "temperature")
    with pytest.raises(ValueError, match="unique"):
        RuleSet([ThresholdRule("a", ALL, high=1), ThresholdRule("a", ALL, low=1)])


async def test_stage_publishes_raised_and_cleared_events_with_the_catalogued_fields() -> None:
    recorded: list[Any] = []

    async def record(changes: list[Any]) -> None:
        recorded.extend(changes)

    rules = RuleSet([ThresholdRule("hot", Selector(metric="temperature"), high=30.0, clear_below=28.0,
                                   severity="critical")])
    stage = AnalyzeStage(TEMPLATE, "1.0", rules=rules, on_alerts=record, clock=lambda: T0)
    emit = Emitter()
    await stage.process([reading(25.0, T0), reading(31.5, T0 + 1), reading(29.0, T0 + 2), reading(27.0, T0 + 3),
                         reading(99.0, T0 + 4, metric="humidity")], emit)
    alerts = [(topic, event) for topic, event in emit.events if topic.startswith("alert/")]
    assert [topic for topic, _ in alerts] == [
        "alert/raised/1.0/site1/heating/boiler-1/temperature",
        "alert/cleared/1.0/site1/heating/boiler-1/temperature",
    ]
    raised, cleared = (event for _, event in alerts)
    assert raised["type"] == ALERT_TYPE == "io.iotgw.alert.raised.v1"
    assert cleared["type"] == ALERT_CLEARED_TYPE == "io.iotgw.alert.cleared.v1"
    assert set(raised["data"]) == set(cleared["data"]) == ALERT_FIELDS
    assert raised["data"] == {
        "rule": "hot", "kind": "threshold", "device_id": "boiler-1", "metric": "temperature",
        "severity": "critical", "value": 31.5, "message": "hot: boiler-1/temperature 31.5 > 30",
        "raised_at": "2024-05-01T12:00:01Z",
    }
    assert cleared["data"]["value"] == 27.0
    assert cleared["data"]["raised_at"] == "2024-05-01T12:00:01Z"
    assert cleared["time"] == "2024-05-01T12:00:03Z"
    assert raised["subject"] == alerts[0][0]
    assert raised["source"] == "/iotgw/site1/boiler-1"
    json.dumps(raised, allow_nan=False)
    assert [c.raised for c in recorded] == [True, False]
    assert stage.alerts == {"raised": 1, "cleared": 1, "record_failures": 0}


async def test_alerts_are_listed_by_the_store_and_seed_the_next_run(tmp_path: Path) -> None:
    rules = [ThresholdRule("hot", Selector(metric="temperature"), high=30.0)]
    async with SqliteStore(tmp_path) as store:
        stage = AnalyzeStage(TEMPLATE, "1.0", rules=RuleSet(rules), on_alerts=store.record_alerts,
                             clock=lambda: T0)
        await stage.process([reading(35.0, T0), reading(20.0, T0 + 60), reading(36.0, T0 + 120)], Emitter())
        active = await store.active_alerts()
    assert [(r, d, m) for r, d, m, _ in active] == [("hot", "boiler-1", "temperature")]
    with StoreReader(tmp_path) as reader:
        every = reader.alerts()
        assert [(a.rule, a.active, a.value, a.clear_value) for a in every] == [
            ("hot", True, 36.0, None), ("hot", False, 35.0, 20.0)]
        assert every[1].raised_at_ms == int(T0 * 1000)
        assert every[1].cleared_at_ms == int((T0 + 60) * 1000)
        assert [a.alert_id for a in reader.alerts(active=True)] == [every[0].alert_id]
        assert [a.alert_id for a in reader.alerts(active=False)] == [every[1].alert_id]

    # After a restart: the alert still active is known, so a reading still over the limit does not raise it
    # twice, and the first one back under clears it.
    async with SqliteStore(tmp_path) as store:
        rule_set = RuleSet(rules)
        rule_set.seed(await store.active_alerts())
        stage = AnalyzeStage(TEMPLATE, "1.0", rules=rule_set, on_alerts=store.record_alerts, clock=lambda: T0)
        emit = Emitter()
        await stage.process([reading(37.0, T0 + 180), reading(21.0, T0 + 240)], emit)
        assert [t.split("/")[1] for t, _ in emit.events if t.startswith("alert/")] == ["cleared"]
        assert emit.events[-1][1]["data"]["raised_at"] == "2024-05-01T12:02:00Z"
        assert await store.active_alerts() == []

        # A rule that is no longer configured cannot clear its alerts: they are closed at start.
        await stage.process([reading(50.0, T0 + 300)], Emitter())
        assert await store.close_unconfigured_alerts(["other"], int((T0 + 400) * 1000)) == 1
        assert await store.active_alerts() == []
        assert await store.close_unconfigured_alerts(["hot"], int((T0 + 400) * 1000)) == 0
    with StoreReader(tmp_path) as reader:
        assert reader.alerts()[0].clear_message == "rule no longer configured"


async def test_no_matching_rule_costs_nothing_per_series() -> None:
    stage = AnalyzeStage(TEMPLATE, "1.0", rules=RuleSet([ThresholdRule("x", Selector(metric="co2"), high=1.0)]),
                         clock=lambda: T0)
    await stage.process([reading(float(i), T0 + i) for i in range(10)], Emitter())
    assert stage.series[("boiler-1", "temperature")].watches == ()


# -- config ---------------------------------------------------------------------------------------


def test_rules_config_builds_the_rules() -> None:
    config = parse_config({"rules": [
        {"name": "hot", "kind": "threshold", "metric": "temp*", "high": 30, "clear_below": 28, "for_s": 60},
        {"name": "climb", "kind": "rate", "device_class": "boiler", "max_rate": 2, "per": "s"},
        {"name": "odd", "kind": "zscore", "device_id": "co2-*", "k": 4, "window": 50, "severity": "info"},
    ]})
    assert [r.to_rule() for r in config.rules] == [
        ThresholdRule("hot", Selector(metric="temp*"), high=30, clear_below=28, for_s=60),
        RateRule("climb", Selector(device_class="boiler"), max_rate=2, per="s"),
        ZScoreRule("odd", Selector(device_id="co2-*"), k=4, window=50, severity="info"),
    ]


@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        pytest.param([{"name": "a", "kind": "threshold"}], "rules[0]: Value error, needs high, low or both",
                     id="no-limit"),
        pytest.param([{"name": "a", "kind": "threshold", "high": 5, "clear_below": 6}],
                     "rules[0]: Value error, clear_below must not exceed high", id="clear-above-high"),
        pytest.param([{"name": "a", "kind": "rate"}], "rules[0].max_rate: Field required", id="rate-missing"),
        pytest.param([{"name": "a", "kind": "zscore", "window": 1}],
                     "rules[0].window: Input should be greater than or equal to 2", id="tiny-window"),
        pytest.param([{"name": "a", "kind": "magic"}], "rules[0]: must be one of threshold, rate, zscore, inactivity",
                     id="unknown-kind"),
        pytest.param([{"name": "a", "high": 1}], "rules[0]: missing kind (one of threshold, rate, zscore, inactivity)",
                     id="missing-kind"),
        pytest.param([{"name": "a", "kind": "threshold", "high": 1, "hihg": 2}], "rules[0].hihg: unknown field",
                     id="typo"),
        pytest.param([{"name": "a", "kind": "threshold", "high": 1}, {"name": "a", "kind": "rate", "max_rate": 1}],
                     "(root): Value error, rule names must be unique", id="duplicate-name"),
    ],
)
def test_rules_config_errors_name_the_field(rules: list[dict[str, Any]], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"rules": rules})
    assert problem.replace("Value error, ", "") in info.value.problems


@pytest.mark.parametrize(
    ("windows", "problem"),
    [
        (["1m", "60s"], "pipeline.analyze.windows: windows must differ"),
        (["1500ms"], "pipeline.analyze.windows: '1500ms': a window must be a whole number of seconds"),
        (["soon"], "pipeline.analyze.windows: not a duration of at least 1ms: 'soon' (use e.g. 90s, 15m, 2h, 7d)"),
    ],
)
def test_window_config_errors(windows: list[str], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"pipeline": {"analyze": {"windows": windows}}})
    assert info.value.problems == [problem]


def test_window_config_default_and_durations() -> None:
    assert parse_config({}).pipeline.analyze.windows_s == [60.0, 3600.0]
    assert parse_config({"pipeline": {"analyze": {"windows": ["15m", "1d"]}}}).pipeline.analyze.windows_s == [
        900.0, 86400.0]
    assert timedelta(seconds=parse_config({}).pipeline.analyze.grace_s) == timedelta(seconds=5)


async def test_reloaded_rules_keep_the_state_of_unchanged_ones() -> None:
    async def record(changes: list[Any]) -> None:
        pass

    hot = ThresholdRule("hot", Selector(metric="temperature"), high=30.0, clear_below=28.0)
    stage = AnalyzeStage(TEMPLATE, "1.0", rules=RuleSet([hot]), on_alerts=record, clock=lambda: T0)
    emit = Emitter()
    await stage.process([reading(31.0, T0)], emit)  # raised
    stage.set_rules(RuleSet([hot, ThresholdRule("cold", Selector(metric="temperature"), low=0.0)]))
    await stage.process([reading(31.5, T0 + 1)], emit)  # still raised: not raised again
    stage.set_rules(RuleSet([ThresholdRule("hot", Selector(metric="temperature"), high=40.0)]))  # changed
    await stage.process([reading(35.0, T0 + 2), reading(41.0, T0 + 3)], emit)
    topics = [topic.split("/")[1] for topic, _ in emit.events if topic.startswith("alert/")]
    messages = [event["data"]["message"] for topic, event in emit.events if topic.startswith("alert/")]
    assert topics == ["raised", "raised"]  # the changed rule started afresh: raised only above 40
    assert messages == ["hot: boiler-1/temperature 31 > 30", "hot: boiler-1/temperature 41 > 40"]
