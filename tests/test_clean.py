"""The clean stage's rules: units, ranges, clock sanity, duplicates, spikes, stuck sensors, deadband.

Every drop must come out of the emitter with its reason (the runner publishes it on the `rejected`
stage) and be counted by reason; nothing disappears.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import MetricRules
from pipeline.clean import CLOCK_CORRECTED, CleanStage, ClockPolicy
from pipeline.define import DefineStage
from pipeline.model import Quality
from pipeline.stage import Draft, Emitter
from pipeline.topics import DEFAULT_VERSION, TopicFields, TopicTemplate
from pipeline.units import UNITS, UnitProblem, convert

TEMPLATE = TopicTemplate()
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def draft(
    value: object, *, metric: str = "temperature", device_id: str = "dev-1", device_class: str = "environment",
    at: float = 0.0, unit: str | None = "°C", seq: int | None = None, device_ts: datetime | bool | None = True,
    received_at: datetime | None = None,
) -> Draft:
    """A reading taken ``at`` seconds after T0 and received 50 ms later."""
    fields = TopicFields(stage="raw", version=DEFAULT_VERSION, site="s", device_class=device_class,
                         device_id=device_id, metric=metric)
    ts = T0 + timedelta(seconds=at)
    return Draft(
        topic=TEMPLATE.format(fields), fields=fields, transport="mqtt", value=value, unit=unit,
        device_ts=ts if device_ts is True else (device_ts or None), seq=seq,
        received_at=received_at or ts + timedelta(milliseconds=50), payload=f'{{"value": {value!r}}}'.encode(),
    )


async def clean(stage: CleanStage, *drafts: Draft) -> tuple[list[Draft], Emitter]:
    emit = Emitter()
    return await stage.process(list(drafts), emit), emit


def reasons(emit: Emitter) -> list[str]:
    return [r.reason for r in emit.rejects]


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (212.0, "°F", "°C", 100.0), (32.0, "F", "°C", 0.0), (-40.0, "°F", "°C", -40.0), (0.0, "°C", "K", 273.15),
        (1013.25, "hPa", "Pa", 101_325.0), (1.0, "bar", "hPa", 1000.0), (1.5, "kWh", "Wh", 1500.0),
        (36.0, "km/h", "m/s", 10.0), (450.0, "ug/m3", "µg/m³", 450.0), (0.5, "%", "ppm", 5000.0),
    ],
)
def test_known_conversions(value: float, source: str, target: str, expected: float) -> None:
    result = convert(value, source, target)
    assert isinstance(result, float)
    assert result == pytest.approx(expected)


def test_conversion_problems_say_why() -> None:
    assert convert(1.0, "furlongs", "m") == UnitProblem(
        "unknown_unit", "unit 'furlongs' is not one the gateway can convert"
    )
    problem = convert(1.0, "%", "°C")
    assert isinstance(problem, UnitProblem)
    assert problem.reason == "unit_mismatch"


@settings(max_examples=200, deadline=None)
@given(
    value=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    pair=st.sampled_from([(a, b) for a in UNITS for b in UNITS if UNITS[a].dimension == UNITS[b].dimension]),
)
def test_conversions_round_trip(value: float, pair: tuple[str, str]) -> None:
    there = convert(value, *pair)
    assert isinstance(there, float)
    back = convert(there, pair[1], pair[0])
    assert isinstance(back, float)
    assert back == pytest.approx(value, rel=1e-9, abs=1e-6)


async def test_units_are_normalised_per_device_class() -> None:
    stage = CleanStage({"temperature": MetricRules(min=-60, max=150)},
                       units={"environment": {"temperature": "°C"}})
    out, emit = await clean(
        stage,
        draft(212.0, unit="°F"),  # converted
        draft(21.0, unit=None, at=1),  # no unit: taken to be in the declared one
        draft(400.0, unit="°F", at=2),  # 204 °C: the range applies after conversion
        draft(20.0, unit="%", at=3),  # not a temperature
        draft(20.0, unit="lightyears", at=4),
        draft(70.0, unit="°F", device_class="freezer", at=5),  # nothing declared for this class
    )
    assert [(d.value, d.unit) for d in out] == [(pytest.approx(100.0), "°C"), (21.0, "°C"), (70.0, "°F")]
    assert reasons(emit) == ["out_of_range", "unit_mismatch", "unknown_unit"]
    assert stage.corrected == {"unit_converted": 2}
    assert stage.stats.as_dict() == {
        "in": 6, "out": 3, "rejected": {"out_of_range": 1, "unit_mismatch": 1, "unknown_unit": 1},
    }


# --- clock sanity ------------------------------------------------------------------------------


async def test_device_clock_far_off_is_corrected_and_flagged() -> None:
    stage = CleanStage({}, clock=ClockPolicy(max_ahead_s=60, max_behind_s=3600, policy="correct"))
    received = T0
    ahead = draft(1.0, device_ts=T0 + timedelta(seconds=61), received_at=received)
    behind = draft(2.0, device_ts=T0 - timedelta(seconds=3601), received_at=received)
    fine = draft(3.0, device_ts=T0 + timedelta(seconds=59), received_at=received)
    out, emit = await clean(stage, ahead, behind, fine)
    assert emit.rejects == []
    assert [(d.device_ts, d.quality) for d in out] == [
        (None, (CLOCK_CORRECTED,)), (None, (CLOCK_CORRECTED,)), (fine.device_ts, ()),
    ]
    assert stage.corrected == {CLOCK_CORRECTED: 2}
    readings = await DefineStage(TEMPLATE).process(out, Emitter())
    assert readings[0].quality == (Quality.CLOCK_CORRECTED,)
    assert readings[0].ts == received  # the receive time stands in for the device's
    assert readings[2].quality == ()


async def test_device_clock_far_off_is_rejected_by_policy() -> None:
    stage = CleanStage({}, clock=ClockPolicy(max_ahead_s=60, max_behind_s=3600, policy="reject"))
    out, emit = await clean(stage, draft(1.0, device_ts=datetime(1970, 1, 1, tzinfo=UTC), received_at=T0))
    assert out == []
    assert reasons(emit) == ["clock_skew"]
    assert "behind the gateway's" in emit.rejects[0].detail


# --- duplicates --------------------------------------------------------------------------------


async def test_repeated_sequence_numbers_are_duplicates_within_the_window() -> None:
    stage = CleanStage({}, duplicate_window_s=60)
    out, emit = await clean(
        stage,
        draft(1.0, seq=7), draft(1.0, seq=7, at=1), draft(2.0, seq=8, at=2),
        draft(1.0, seq=7, metric="humidity", unit="%", at=3),  # another series: its own numbers
        draft(3.0, seq=7, at=120),  # the device rebooted and counts again: not a duplicate any more
    )
    assert [d.value for d in out] == [1.0, 2.0, 1.0, 3.0]
    assert reasons(emit) == ["duplicate"]


async def test_duplicate_memory_is_bounded() -> None:
    stage = CleanStage({}, duplicate_window_s=3600)
    out, _ = await clean(stage, *(draft(float(i), seq=i, at=i) for i in range(1000)))
    assert len(out) == 1000
    assert all(len(s.seqs) <= 64 for s in stage._series.values())


# --- spikes, stuck sensors, deadband -------------------------------------------------------------


async def test_a_single_spike_is_dropped_and_a_new_level_is_kept() -> None:
    stage = CleanStage({"temperature": MetricRules(max_rate_per_s=1.0)})
    values = [20.0, 20.5, 45.0, 21.0, 21.2, 30.0, 30.1, 30.3]  # one spike, then a real step to 30
    out, emit = await clean(stage, *(draft(v, at=i) for i, v in enumerate(values)))
    assert [d.value for d in out] == [20.0, 20.5, 21.0, 21.2, 30.1, 30.3]
    assert reasons(emit) == ["spike", "spike"]
    assert "stepped from 20.5 to 45" in emit.rejects[0].detail


async def test_stuck_sensor_is_dropped_until_the_value_changes() -> None:
    stage = CleanStage({"humidity": MetricRules(stuck_after_s=30)})
    values = [50.0] * 7 + [51.0, 51.0]  # readings every 10 s: stuck after 30 s
    out, emit = await clean(stage, *(draft(v, metric="humidity", unit="%", at=10 * i) for i, v in enumerate(values)))
    assert [d.value for d in out] == [50.0, 50.0, 50.0, 50.0, 51.0, 51.0]
    assert reasons(emit) == ["stuck", "stuck", "stuck"]


async def test_deadband_reports_on_change_with_a_heartbeat() -> None:
    stage = CleanStage({"co2": MetricRules(deadband=5, deadband_max_interval_s=60)})
    at_values = [(0, 600.0), (10, 603.0), (20, 597.0), (30, 606.0), (40, 607.0), (100, 608.0), (105, 609.0)]
    out, emit = await clean(stage, *(draft(v, metric="co2", unit="ppm", at=t) for t, v in at_values))
    assert [d.value for d in out] == [600.0, 606.0, 608.0]  # 608: the heartbeat after 60 s
    assert reasons(emit) == ["deadband"] * 4


async def test_out_of_order_readings_skip_the_temporal_rules() -> None:
    stage = CleanStage({"temperature": MetricRules(max_rate_per_s=0.5)})
    out, emit = await clean(stage, draft(20.0, at=100), draft(50.0, at=10), draft(20.1, at=101))
    assert [d.value for d in out] == [20.0, 50.0, 20.1]  # an old reading is not judged against newer ones
    assert emit.rejects == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True), st.integers(), st.none(), st.text(max_size=3)), max_size=40))
def test_every_draft_comes_out_kept_or_rejected(values: list[object]) -> None:
    stage = CleanStage(
        {"temperature": MetricRules(min=-50, max=50, max_rate_per_s=1, stuck_after_s=5, deadband=0.5)},
        units={"environment": {"temperature": "°C"}},
    )
    drafts = [draft(v, at=i, seq=i % 5) for i, v in enumerate(values)]
    out, emit = asyncio.run(clean(stage, *drafts))
    assert len(out) + len(emit.rejects) == len(drafts)
    assert sum(stage.stats.rejected.values()) == len(emit.rejects)
    assert all(isinstance(d.value, float) and math.isfinite(d.value) for d in out)
