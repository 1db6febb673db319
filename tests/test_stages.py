"""The five pipeline stages, each run for real: collect, clean, define, store, analyze, and the runner
that chains them. Nothing of the code under test is mocked; the only stand-in is analyze's clock, a
plain callable the stage takes by design."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import sqlite3
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings

from gateway.config import DEFAULT_METRIC_RULES, MetricRules
from pipeline.analyze import AnalyzeStage
from pipeline.clean import CleanStage
from pipeline.collect import CollectStage, parse_timestamp
from pipeline.define import DefineStage
from pipeline.model import (
    AGGREGATE_TYPE,
    READING_TYPE,
    REJECT_TYPE,
    Quality,
    Reading,
    new_event_id,
    to_ms,
    ulid_time_ms,
)
from pipeline.runner import Pipeline
from pipeline.stage import Draft, Emitter, RawMessage, Reject, Stage, StageStats
from pipeline.store import SCHEMA_VERSION, SqliteStore, StoreError, StoreReader, StoreStage, db_path
from pipeline.topics import DEFAULT_VERSION, TopicFields, TopicTemplate

T = TypeVar("T")

TEMPLATE = TopicTemplate()
SITE = "site1"
VERSION = DEFAULT_VERSION
CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
RECEIVED = datetime(2024, 5, 1, 12, 0, 30, 250000, tzinfo=UTC)
DEVICE_TS = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
# in-process (driver) devices, and one MQTT device that is configured too
TRANSPORTS = {"pm-1": "serial", "ble-1": "ble", "mq-1": "mqtt"}
PROPERTY = settings(max_examples=50, deadline=None)


def topic(
    device_id: str = "dev-1", metric: str = "temperature", *, stage: str = "raw", device_class: str = "environment"
) -> str:
    return TEMPLATE.format(TopicFields(
        stage=stage, version=VERSION, site=SITE, device_class=device_class, device_id=device_id, metric=metric,
    ))


def raw(payload: bytes | dict[str, Any], *, to: str | None = None, origin: str | None = "client-1") -> RawMessage:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return RawMessage(topic=to or topic(), payload=body, origin=origin, received_at=RECEIVED)


def draft(
    value: object,
    metric: str = "temperature",
    *,
    device_id: str = "dev-1",
    transport: str = "mqtt",
    device_ts: datetime | None = DEVICE_TS,
    received_at: datetime = RECEIVED,
    unit: str | None = "C",
    seq: int | None = None,
) -> Draft:
    t = topic(device_id, metric)
    fields = TEMPLATE.parse(t)
    assert fields is not None
    return Draft(
        topic=t, fields=fields, transport=transport, value=value, unit=unit, device_ts=device_ts, seq=seq,
        received_at=received_at, payload=json.dumps({"value": repr(value)}).encode(),
    )


def reading(
    value: float,
    *,
    device_id: str = "dev-1",
    metric: str = "temperature",
    ts_ms: int = 1_714_564_800_000,
    transport: str = "mqtt",
    device_class: str = "environment",
    seq: int | None = None,
    unit: str | None = "C",
) -> Reading:
    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return Reading.model_validate({
        "id": new_event_id(ts_ms), "site": SITE, "device_id": device_id, "device_class": device_class,
        "transport": transport, "metric": metric, "value": value, "unit": unit, "device_ts": ts,
        "received_at": ts + timedelta(milliseconds=5), "seq": seq,
    })


def run(coro: Coroutine[Any, Any, T]) -> T:
    """For hypothesis tests, which are synchronous: one fresh event loop per example."""
    return asyncio.run(coro)


# ===========================================================================
# collect
# ===========================================================================

OK = "ok"
ACCEPTED = [
    pytest.param(raw({"value": 21.5}), {"transport": "mqtt", "value": 21.5, "unit": None, "device_ts": None,
                                         "seq": None}, id="minimal-mqtt-unconfigured-device"),
    pytest.param(raw({"value": 21, "unit": "C", "seq": 7, "ts": 1_700_000_000}),
                 {"transport": "mqtt", "value": 21, "unit": "C", "seq": 7,
                  "device_ts": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)}, id="all-fields"),
    pytest.param(raw({"value": 5}, to=topic("pm-1", "pm2_5"), origin=None), {"transport": "serial"},
                 id="in-process-serial-device"),
    pytest.param(raw({"value": 5}, to=topic("ble-1", "humidity"), origin=None), {"transport": "ble"},
                 id="in-process-ble-device"),
    pytest.param(raw({"value": 5}, to=topic("mq-1"), origin=None), {"transport": "mqtt"},
                 id="in-process-configured-mqtt-device"),
    pytest.param(raw({"value": 5}, to=topic("mq-1"), origin="mq-1"), {"transport": "mqtt"},
                 id="mqtt-client-as-configured-mqtt-device"),
    pytest.param(raw({"value": "12"}), {"value": "12"}, id="string-value-left-for-clean"),
    pytest.param(raw({"value": None}), {"value": None}, id="null-value-left-for-clean"),
    pytest.param(raw({"value": 1, "rssi": -70, "fw": {"v": [1, 2]}, "Value": 3}), {"value": 1, "unit": None},
                 id="unknown-keys-ignored"),
    pytest.param(raw({"value": 1, "ts": None, "unit": None, "seq": None}),
                 {"device_ts": None, "unit": None, "seq": None}, id="explicit-nulls-mean-absent"),
    pytest.param(raw({"value": 1, "seq": 0}), {"seq": 0}, id="seq-zero"),
    pytest.param(raw(b'\xef\xbb\xbf{"value": 1}'), {"value": 1}, id="utf8-bom"),
]


@pytest.mark.parametrize(("message", "expected"), ACCEPTED)
async def test_collect_accepts(message: RawMessage, expected: dict[str, object]) -> None:
    stage = CollectStage(TEMPLATE, TRANSPORTS)
    emit = Emitter()
    [out] = await stage.process([message], emit)
    assert emit.rejects == []
    for name, value in expected.items():
        assert getattr(out, name) == value, name
        assert type(getattr(out, name)) is type(value), name
    assert out.topic == message.topic
    assert out.payload == message.payload
    assert out.received_at == message.received_at
    assert out.fields == TEMPLATE.parse(message.topic)


REJECTED = [
    pytest.param(raw({"value": 1}, to="not/a/telemetry/topic"), "unknown_topic", id="topic-not-in-template"),
    pytest.param(raw({"value": 1}, to=topic(stage="valid")), "unknown_topic", id="topic-on-valid-stage"),
    pytest.param(raw({"value": 1}, to=topic(stage="agg")), "unknown_topic", id="topic-on-agg-stage"),
    pytest.param(raw({"value": 1}, to="telemetry/raw/1.0/site1//dev-1/temperature"), "unknown_topic",
                 id="topic-empty-level"),
    pytest.param(raw({"value": 1}, to=topic() + "/extra"), "unknown_topic", id="topic-extra-level"),
    pytest.param(raw({"value": 1}, origin=None), "unknown_device", id="in-process-unconfigured-device"),
    pytest.param(raw({"value": 1}, to=topic("pm-1", "pm2_5"), origin="evil"), "device_conflict",
                 id="mqtt-client-as-serial-device"),
    pytest.param(raw({"value": 1}, to=topic("ble-1"), origin="pm-1"), "device_conflict",
                 id="mqtt-client-as-ble-device"),
    pytest.param(raw(b"{"), "invalid_json", id="json-truncated"),
    pytest.param(raw(b""), "invalid_json", id="json-empty"),
    pytest.param(raw(b"\xff\xfe\x80garbage"), "invalid_json", id="json-not-utf8"),
    pytest.param(raw(b"{'value': 1}"), "invalid_json", id="json-single-quotes"),
    pytest.param(raw(b"[1, 2]"), "not_an_object", id="array"),
    pytest.param(raw(b"42"), "not_an_object", id="number"),
    pytest.param(raw(b'"value"'), "not_an_object", id="string"),
    pytest.param(raw(b"null"), "not_an_object", id="null"),
    pytest.param(raw({}), "missing_value", id="empty-object"),
    pytest.param(raw({"unit": "C", "ts": 1}), "missing_value", id="no-value-key"),
    pytest.param(raw({"value": 1, "unit": 5}), "invalid_unit", id="unit-number"),
    pytest.param(raw({"value": 1, "unit": ["C"]}), "invalid_unit", id="unit-list"),
    pytest.param(raw({"value": 1, "unit": True}), "invalid_unit", id="unit-bool"),
    pytest.param(raw({"value": 1, "seq": True}), "invalid_seq", id="seq-bool"),
    pytest.param(raw({"value": 1, "seq": False}), "invalid_seq", id="seq-false"),
    pytest.param(raw({"value": 1, "seq": -1}), "invalid_seq", id="seq-negative"),
    pytest.param(raw({"value": 1, "seq": 1.5}), "invalid_seq", id="seq-float"),
    pytest.param(raw({"value": 1, "seq": 2.0}), "invalid_seq", id="seq-integral-float"),
    pytest.param(raw({"value": 1, "seq": "3"}), "invalid_seq", id="seq-string"),
    pytest.param(raw({"value": 1, "ts": "2024-05-01T12:00:00"}), "invalid_ts", id="ts-naive-rfc3339"),
    pytest.param(raw({"value": 1, "ts": "2024-05-01"}), "invalid_ts", id="ts-date-only"),
    pytest.param(raw({"value": 1, "ts": "yesterday"}), "invalid_ts", id="ts-garbage-string"),
    pytest.param(raw({"value": 1, "ts": 1_714_564_800_000}), "invalid_ts", id="ts-epoch-milliseconds"),
    pytest.param(raw({"value": 1, "ts": 1e300}), "invalid_ts", id="ts-absurd-epoch"),
    pytest.param(raw({"value": 1, "ts": 253_402_300_800}), "invalid_ts", id="ts-year-10000"),
    pytest.param(raw({"value": 1, "ts": -1}), "invalid_ts", id="ts-negative-epoch"),
    pytest.param(raw(b'{"value": 1, "ts": NaN}'), "invalid_ts", id="ts-nan"),
    pytest.param(raw({"value": 1, "ts": True}), "invalid_ts", id="ts-bool"),
    pytest.param(raw({"value": 1, "ts": [1]}), "invalid_ts", id="ts-list"),
]


@pytest.mark.parametrize(("message", "reason"), REJECTED)
async def test_collect_rejects(message: RawMessage, reason: str) -> None:
    stage = CollectStage(TEMPLATE, TRANSPORTS)
    emit = Emitter()
    assert await stage.process([message], emit) == []
    [reject] = emit.rejects
    assert (reject.stage, reject.reason) == ("collect", reason)
    assert reject.detail
    assert reject.topic == message.topic
    assert reject.payload == message.payload
    assert emit.events == []
    assert stage.stats.as_dict() == {"in": 1, "out": 0, "rejected": {reason: 1}}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        pytest.param(1_714_564_800, datetime(2024, 5, 1, 12, 0, tzinfo=UTC), id="epoch-int"),
        pytest.param(1_714_564_800.25, datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC), id="epoch-float"),
        pytest.param(0, datetime(1970, 1, 1, tzinfo=UTC), id="epoch-zero"),
        pytest.param(253_402_300_799, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), id="epoch-last-second"),
        pytest.param("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, 0, tzinfo=UTC), id="rfc3339-Z"),
        pytest.param("2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, 0, tzinfo=UTC), id="rfc3339-lowercase"),
        pytest.param("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, 0, tzinfo=UTC), id="rfc3339-plus-0200"),
        pytest.param("2024-05-01T07:30:00-04:30", datetime(2024, 5, 1, 12, 0, tzinfo=UTC), id="rfc3339-minus-0430"),
        pytest.param("2024-05-01T12:00:00.5Z", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC),
                     id="rfc3339-fraction"),
    ],
)
async def test_collect_timestamps_become_utc(ts: object, expected: datetime) -> None:
    stage = CollectStage(TEMPLATE, TRANSPORTS)
    [out] = await stage.process([raw({"value": 1, "ts": ts})], Emitter())
    assert out.device_ts == expected
    assert out.device_ts is not None
    assert out.device_ts.utcoffset() == timedelta(0)


async def test_collect_stats_and_rejects_over_a_batch() -> None:
    stage = CollectStage(TEMPLATE, TRANSPORTS)
    batch = [
        raw({"value": 1}),
        raw(b"{"),
        raw({"value": 2}, to=topic("pm-1", "pm2_5"), origin=None),
        raw({"value": 3}, to="elsewhere"),
        raw(b"[]"),
        raw(b"}"),
        raw({"value": 4, "seq": -3}),
    ]
    emit = Emitter()
    out = await stage.process(batch, emit)
    assert [d.value for d in out] == [1, 2]
    assert [(r.stage, r.reason) for r in emit.rejects] == [
        ("collect", "invalid_json"), ("collect", "unknown_topic"), ("collect", "not_an_object"),
        ("collect", "invalid_json"), ("collect", "invalid_seq"),
    ]
    assert [(r.topic, r.payload) for r in emit.rejects] == [
        (m.topic, m.payload) for m in (batch[1], batch[3], batch[4], batch[5], batch[6])
    ]
    assert all(isinstance(r, Reject) for r in emit.rejects)
    assert stage.stats.received == 7
    assert stage.stats.passed == 2
    assert stage.stats.rejected == {"invalid_json": 2, "unknown_topic": 1, "not_an_object": 1, "invalid_seq": 1}
    await stage.process([raw({"value": 5})], Emitter())  # stats accumulate across batches
    assert stage.stats.as_dict() == {
        "in": 8, "out": 3, "rejected": {"invalid_json": 2, "invalid_seq": 1, "not_an_object": 1, "unknown_topic": 1},
    }


# A hostile or broken MQTT client must cost one reject, never the batch: an exception out of
# process() ends the gateway's pipeline task (gateway/flow.py).
CRASHERS = [
    pytest.param(raw({"value": 1, "ts": "0001-01-01T00:30:00+01:00"}), "invalid_ts", id="ts-offset-before-year-1"),
    pytest.param(raw({"value": 1, "ts": "9999-12-31T23:59:59-01:00"}), "invalid_ts", id="ts-offset-after-9999"),
    pytest.param(raw(b'{"value": 1, "ts": 1' + b"0" * 400 + b"}"), "invalid_ts", id="ts-huge-int"),
    pytest.param(raw(b'{"value": 1' + b"0" * 5000 + b"}"), "invalid_json", id="int-over-4300-digits"),
    pytest.param(raw(b"[" * 100_000), "invalid_json", id="deeply-nested-json"),
]


@pytest.mark.parametrize(("message", "reason"), CRASHERS)
async def test_collect_rejects_instead_of_raising(message: RawMessage, reason: str) -> None:
    stage = CollectStage(TEMPLATE, TRANSPORTS)
    emit = Emitter()
    assert await stage.process([message, raw({"value": 1})], emit) != []
    assert [r.reason for r in emit.rejects] == [reason]


# ===========================================================================
# clean
# ===========================================================================


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("12", id="numeric-string"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param(None, id="null"),
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="inf"),
        pytest.param(-math.inf, id="minus-inf"),
        pytest.param([1.0], id="list"),
        pytest.param({"v": 1}, id="object"),
    ],
)
async def test_clean_non_numeric(value: object) -> None:
    stage = CleanStage(DEFAULT_METRIC_RULES)
    emit = Emitter()
    d = draft(value)
    assert await stage.process([d], emit) == []
    assert emit.rejects == [Reject("clean", "non_numeric", emit.rejects[0].detail, d.topic, d.payload)]
    assert stage.stats.as_dict() == {"in": 1, "out": 0, "rejected": {"non_numeric": 1}}


@pytest.mark.parametrize(
    ("metric", "value", "passes"),
    [
        pytest.param("temperature", -60, True, id="temperature-min-int"),
        pytest.param("temperature", -60.0, True, id="temperature-min"),
        pytest.param("temperature", 150.0, True, id="temperature-max"),
        pytest.param("temperature", -60.000001, False, id="temperature-below"),
        pytest.param("temperature", 150.000001, False, id="temperature-above"),
        pytest.param("humidity", 0, True, id="humidity-zero"),
        pytest.param("humidity", 100, True, id="humidity-hundred"),
        pytest.param("humidity", 100.5, False, id="humidity-above"),
        pytest.param("humidity", -0.1, False, id="humidity-negative"),
        pytest.param("pressure", 299.99, False, id="pressure-below"),
        pytest.param("pm2_5", 1000, True, id="pm2_5-max"),
        pytest.param("pm2_5", 1001, False, id="pm2_5-above"),
        pytest.param("voltage", 1e300, True, id="no-range-huge"),
        pytest.param("voltage", -1e300, True, id="no-range-negative-huge"),
    ],
)
async def test_clean_default_ranges_inclusive(metric: str, value: float, passes: bool) -> None:
    stage = CleanStage(DEFAULT_METRIC_RULES)
    emit = Emitter()
    out = await stage.process([draft(value, metric)], emit)
    if passes:
        assert [d.value for d in out] == [float(value)]
        assert emit.rejects == []
    else:
        assert out == []
        [reject] = emit.rejects
        assert (reject.stage, reject.reason) == ("clean", "out_of_range")
        assert metric in reject.detail


async def test_clean_uses_the_given_ranges() -> None:
    stage = CleanStage({"level": MetricRules(min=1, max=2)})
    emit = Emitter()
    batch = [draft(v, "level") for v in (0.999, 1, 1.5, 2, 2.001)] + [draft(-500, "temperature")]
    out = await stage.process(batch, emit)
    assert [d.value for d in out] == [1.0, 1.5, 2.0, -500.0]  # temperature has no range here
    assert [r.reason for r in emit.rejects] == ["out_of_range", "out_of_range"]
    assert stage.stats.as_dict() == {"in": 6, "out": 4, "rejected": {"out_of_range": 2}}


async def test_clean_converts_int_to_float_and_keeps_the_rest() -> None:
    stage = CleanStage(DEFAULT_METRIC_RULES)
    ints = draft(21, "temperature")
    floats = draft(21.5, "temperature")
    [a, b] = await stage.process([ints, floats], Emitter())
    assert type(a.value) is float
    assert a.value == 21.0
    assert a.topic == ints.topic
    assert a.fields == ints.fields
    assert a.device_ts == ints.device_ts
    assert a.payload == ints.payload
    assert b is floats  # already a float: passed through untouched


async def test_clean_huge_int_is_rejected_not_raised() -> None:
    stage = CleanStage(DEFAULT_METRIC_RULES)
    emit = Emitter()
    assert await stage.process([draft(10**400, "voltage")], emit) == []
    assert [r.reason for r in emit.rejects] == ["non_numeric"]


# ===========================================================================
# define
# ===========================================================================


async def test_define_makes_a_reading() -> None:
    received = datetime.now(UTC)
    d = draft(21.5, device_ts=DEVICE_TS, received_at=received, seq=4, unit="C")
    emit = Emitter()
    stage = DefineStage(TEMPLATE)
    [r] = await stage.process([d], emit)
    assert len(r.id) == 26
    assert set(r.id) <= CROCKFORD
    assert ulid_time_ms(r.id) >= to_ms(received)
    assert (r.site, r.device_id, r.device_class, r.metric) == (SITE, "dev-1", "environment", "temperature")
    assert (r.transport, r.value, r.unit, r.seq) == ("mqtt", 21.5, "C", 4)
    assert (r.device_ts, r.received_at, r.ts) == (DEVICE_TS, received, DEVICE_TS)
    assert r.quality == ()
    assert stage.stats.as_dict() == {"in": 1, "out": 1, "rejected": {}}


async def test_define_flags_missing_device_time() -> None:
    [r] = await DefineStage(TEMPLATE).process([draft(1.0, device_ts=None)], Emitter())
    assert r.quality == (Quality.DEVICE_TIME_MISSING,)
    assert r.device_ts is None
    assert r.ts == RECEIVED


async def test_define_publishes_a_valid_cloudevent() -> None:
    d = draft(21.5)
    emit = Emitter()
    [r] = await DefineStage(TEMPLATE).process([d], emit)
    valid = topic(stage="valid")
    assert valid == "telemetry/valid/1.0/site1/environment/dev-1/temperature"
    [(published_topic, event)] = emit.events
    assert published_topic == valid
    assert event["specversion"] == "1.0"
    assert event["id"] == r.id
    assert event["type"] == READING_TYPE == "io.iotgw.telemetry.reading.v1"
    assert event["source"] == "/iotgw/site1/dev-1"
    assert event["subject"] == valid
    assert event["time"] == "2024-05-01T12:00:00Z"
    assert event["datacontenttype"] == "application/json"
    assert event["data"] == r.model_dump(mode="json")
    assert Reading.model_validate(json.loads(json.dumps(event))["data"]) == r


async def test_define_event_time_is_receive_time_without_device_time() -> None:
    emit = Emitter()
    await DefineStage(TEMPLATE).process([draft(1.0, device_ts=None)], emit)
    assert emit.events[0][1]["time"] == "2024-05-01T12:00:30.250000Z"


async def test_define_can_skip_publishing() -> None:
    emit = Emitter()
    out = await DefineStage(TEMPLATE, publish_valid=False).process([draft(1.0)], emit)
    assert len(out) == 1
    assert emit.events == []


async def test_define_ids_increase_across_a_batch() -> None:
    same_ms = [draft(float(i)) for i in range(50)]
    backwards = [draft(float(i), received_at=RECEIVED - timedelta(seconds=i)) for i in range(20)]
    forwards = [draft(float(i), received_at=RECEIVED + timedelta(days=1, milliseconds=i)) for i in range(3)]
    out = await DefineStage(TEMPLATE).process(same_ms + backwards + forwards, Emitter())
    ids = [r.id for r in out]
    assert len(ids) == 73
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("invalid", "field"),
    [
        pytest.param(draft(2.0, transport="zigbee"), "transport", id="unknown-transport"),
        pytest.param(draft(2.0, device_id="d" * 129), "device_id", id="device-id-too-long"),
    ],
)
async def test_define_rejects_invalid_events(invalid: Draft, field: str) -> None:
    good = draft(1.0)
    emit = Emitter()
    stage = DefineStage(TEMPLATE)
    out = await stage.process([good, invalid], emit)
    assert [r.value for r in out] == [1.0]
    [reject] = emit.rejects
    assert (reject.stage, reject.reason) == ("define", "invalid_event")
    assert field in reject.detail
    assert (reject.topic, reject.payload) == (invalid.topic, invalid.payload)
    assert len(emit.events) == 1  # only the good reading
    assert stage.stats.as_dict() == {"in": 2, "out": 1, "rejected": {"invalid_event": 1}}


# ===========================================================================
# store
# ===========================================================================

T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z


async def test_store_written_batch_is_readable(tmp_path: Path) -> None:
    batch = [
        reading(3.0, ts_ms=T0 + 3000),
        reading(1.0, ts_ms=T0 + 1000),
        reading(50.0, metric="humidity", unit="%", ts_ms=T0 + 1500),
        reading(2.0, ts_ms=T0 + 2000),
        reading(7.0, device_id="pm-1", metric="pm2_5", transport="serial", device_class="particulate",
                ts_ms=T0 + 500),
    ]
    async with SqliteStore(tmp_path) as store:
        await store.write(batch)
        await store.write([])  # nothing: no transaction
        assert store.transactions == 1
        assert store.rows_written == 5
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 5
        assert reader.series("dev-1", "temperature") == ("C", [(T0 + 1000, 1.0), (T0 + 2000, 2.0), (T0 + 3000, 3.0)])
        assert reader.series("dev-1", "temperature", since_ms=T0 + 2000) == ("C", [(T0 + 2000, 2.0), (T0 + 3000, 3.0)])
        assert reader.series("dev-1", "temperature", since_ms=T0 + 1500, until_ms=T0 + 2500) == (
            "C", [(T0 + 2000, 2.0)])
        assert reader.series("dev-1", "humidity") == ("%", [(T0 + 1500, 50.0)])
        assert reader.series("dev-1", "pressure") is None
        assert reader.series("nobody", "temperature") is None


async def test_store_devices(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(1.0, ts_ms=T0), reading(40.0, metric="humidity", ts_ms=T0 + 1000)])
        await store.write([
            reading(2.0, ts_ms=T0 + 9000),
            reading(8.0, device_id="pm-1", metric="pm2_5", transport="serial", device_class="particulate",
                    ts_ms=T0 + 4000),
        ])
    with StoreReader(tmp_path) as reader:
        dev, pm = reader.devices()
    assert (dev.device_id, dev.transport, dev.device_class, dev.site) == ("dev-1", "mqtt", "environment", SITE)
    assert dev.metrics == ("humidity", "temperature")
    assert dev.first_seen_ms == T0 + 5  # received_at is ts + 5 ms in reading()
    assert dev.last_seen_ms == T0 + 9005
    assert (pm.device_id, pm.transport, pm.device_class, pm.metrics) == ("pm-1", "serial", "particulate", ("pm2_5",))
    assert pm.first_seen_ms == pm.last_seen_ms == T0 + 4005


async def test_store_ignores_duplicate_events(tmp_path: Path) -> None:
    batch = [reading(float(i), ts_ms=T0 + i) for i in range(10)]
    async with SqliteStore(tmp_path) as store:
        await store.write(batch)
        await store.write(batch)
        await store.write(batch[3:5])
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 10
        found = reader.series("dev-1", "temperature")
        assert found is not None
        assert [v for _, v in found[1]] == [float(i) for i in range(10)]


async def test_store_rows_written_excludes_duplicates(tmp_path: Path) -> None:
    batch = [reading(float(i), ts_ms=T0 + i) for i in range(10)]
    async with SqliteStore(tmp_path) as store:
        await store.write(batch)
        await store.write(batch)
        assert store.rows_written == 10


async def test_store_wal_and_primary_key_range_scan(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(1.0, ts_ms=T0)])
        db = sqlite3.connect(db_path(tmp_path))
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
            plan = " | ".join(row[3] for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT ts, value FROM readings WHERE series_id = ? AND ts >= ? AND ts <= ? "
                "ORDER BY ts", (1, T0, T0 + 1000),
            ))
        finally:
            db.close()
    assert "PRIMARY KEY" in plan
    assert "series_id=?" in plan
    assert "ts>?" in plan
    assert "SCAN" not in plan
    assert "TEMP B-TREE" not in plan


async def test_store_one_transaction_per_write(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        for n in range(4):
            await store.write([reading(float(i), device_id=f"d{i % 3}", ts_ms=T0 + 100 * n + i) for i in range(25)])
        assert store.transactions == 4
        assert store.rows_written == 100


async def test_store_reopen_keeps_series_ids(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(1.0, device_id="a", ts_ms=T0), reading(2.0, device_id="b", ts_ms=T0)])

    def series_ids() -> dict[tuple[str, str], int]:
        db = sqlite3.connect(db_path(tmp_path))
        try:
            return {(d, m): s for s, d, m in db.execute("SELECT series_id, device_id, metric FROM series")}
        finally:
            db.close()

    before = series_ids()
    async with SqliteStore(tmp_path) as store:
        await store.write([reading(3.0, device_id="c", ts_ms=T0 + 1), reading(4.0, device_id="b", ts_ms=T0 + 1)])
    after = series_ids()
    assert {k: after[k] for k in before} == before
    assert len(set(after.values())) == 3
    with StoreReader(tmp_path) as reader:
        assert reader.series("b", "temperature") == ("C", [(T0, 2.0), (T0 + 1, 4.0)])
        assert reader.series("c", "temperature") == ("C", [(T0 + 1, 3.0)])


async def test_store_stage_passes_the_batch_through(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        stage = StoreStage(store)
        batch = [reading(1.0, ts_ms=T0), reading(2.0, ts_ms=T0 + 1)]
        assert await stage.process(batch, Emitter()) == batch
        assert stage.stats.as_dict() == {"in": 2, "out": 2, "rejected": {}}
        assert stage.write_failures == 0
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 2


def test_store_reader_without_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        StoreReader(tmp_path / "missing")
    with pytest.raises(StoreError):
        StoreReader(tmp_path)  # the directory exists, the database does not


async def test_seq_beyond_sqlite_integer_is_rejected_not_raised(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        pipeline = Pipeline(
            [CollectStage(TEMPLATE, {}), CleanStage(DEFAULT_METRIC_RULES), DefineStage(TEMPLATE), StoreStage(store)],
            TEMPLATE, site=SITE, version=VERSION,
        )
        emit = await pipeline.run([raw({"value": 1, "seq": 2**64}), raw({"value": 2, "seq": 1})])
        assert [r.reason for r in emit.rejects] in (["invalid_seq"], ["invalid_event"])
        assert store.rows_written == 1


async def test_store_after_a_failed_write_series_stay_readable(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        unstorable = reading(1.0, device_id="new", ts_ms=T0).model_copy(update={"seq": 2**64})  # no validation
        with pytest.raises((OverflowError, StoreError, sqlite3.Error)):
            await store.write([unstorable])
        await store.write([reading(2.0, device_id="new", ts_ms=T0 + 1)])
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 1
        assert reader.series("new", "temperature") == ("C", [(T0 + 1, 2.0)])


# ===========================================================================
# analyze (windows and rules: tests/test_analyze.py)
# ===========================================================================


class FakeClock:
    """The analyze stage's clock: a callable returning seconds; the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ===========================================================================
# runner
# ===========================================================================


def make_pipeline(store: SqliteStore, clock: FakeClock) -> Pipeline:
    stages: list[Stage[Any, Any]] = [
        CollectStage(TEMPLATE, TRANSPORTS),
        CleanStage(DEFAULT_METRIC_RULES),
        DefineStage(TEMPLATE),
        StoreStage(store),
        AnalyzeStage(TEMPLATE, VERSION, clock=clock),
    ]
    return Pipeline(stages, TEMPLATE, site=SITE, version=VERSION)


async def test_pipeline_runs_a_mixed_batch(tmp_path: Path) -> None:
    batch = [
        raw({"value": 21.5, "unit": "C", "ts": "2024-05-01T12:00:00Z"}),
        raw({"value": "warm"}),
        raw({"value": 400}),
        raw(b"{not json"),
        raw({"value": 1}, to="some/other/topic"),
        raw({"value": 22.5, "unit": "C"}),
        raw({"value": 12, "unit": "ug/m3"}, to=topic("pm-1", "pm2_5", device_class="particulate"), origin=None),
    ]
    async with SqliteStore(tmp_path) as store:
        pipeline = make_pipeline(store, FakeClock())
        emit = await pipeline.run(batch)
        assert store.transactions == 1
    with StoreReader(tmp_path) as reader:
        assert reader.count() == 3
        temperature = reader.series("dev-1", "temperature")
        assert temperature is not None
        assert sorted(v for _, v in temperature[1]) == [21.5, 22.5]
        assert [d.transport for d in reader.devices()] == ["mqtt", "serial"]
    assert [(r.stage, r.reason, r.payload) for r in emit.rejects] == [
        ("collect", "invalid_json", b"{not json"),
        ("collect", "unknown_topic", batch[4].payload),
        ("clean", "non_numeric", batch[1].payload),
        ("clean", "out_of_range", batch[2].payload),
    ]
    kinds = [(t.split("/")[1], e["type"]) for t, e in emit.events]
    assert kinds.count(("valid", READING_TYPE)) == 3
    assert kinds.count(("agg", AGGREGATE_TYPE)) == 0  # windows are published when they close, not per batch
    assert pipeline.stats() == {
        "collect": {"in": 7, "out": 5, "rejected": {"invalid_json": 1, "unknown_topic": 1}},
        "clean": {"in": 5, "out": 3, "rejected": {"non_numeric": 1, "out_of_range": 1}},
        "define": {"in": 3, "out": 3, "rejected": {}},
        "store": {"in": 3, "out": 3, "rejected": {}},
        "analyze": {"in": 3, "out": 3, "rejected": {}},
    }


async def test_pipeline_halves_run_the_front_then_the_back(tmp_path: Path) -> None:
    """What the gateway's two pipeline tasks call: the front stops before the store, the back starts there."""
    async with SqliteStore(tmp_path) as store:
        front: list[Stage[Any, Any]] = [CollectStage(TEMPLATE, TRANSPORTS), CleanStage(DEFAULT_METRIC_RULES),
                                        DefineStage(TEMPLATE)]
        pipeline = Pipeline(front, TEMPLATE, site=SITE, version=VERSION,
                            back=[StoreStage(store), AnalyzeStage(TEMPLATE, VERSION, clock=FakeClock())])
        assert [s.name for s in pipeline.stages] == ["collect", "clean", "define", "store", "analyze"]
        emit = Emitter()
        items = await pipeline.run_front([raw({"value": 21.5, "unit": "C"}), raw(b"{not json")], emit)
        assert [type(item).__name__ for item in items] == ["Reading"]
        assert store.transactions == 0
        assert pipeline.stats()["store"]["in"] == 0
        assert await pipeline.run_back(items, emit) == items
        assert store.rows_written == 1
    assert pipeline.stats()["define"] == pipeline.stats()["analyze"] == {"in": 1, "out": 1, "rejected": {}}
    assert [r.reason for r in emit.rejects] == ["invalid_json"]
    assert [e["type"] for _, e in emit.events] == [READING_TYPE]


async def test_pipeline_stops_when_a_stage_leaves_nothing(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        pipeline = make_pipeline(store, FakeClock())
        emit = await pipeline.run([raw(b"nope"), raw({"value": 999})])
        assert store.transactions == 0
        assert [r.reason for r in emit.rejects] == ["invalid_json", "out_of_range"]
        assert emit.events == []
        assert pipeline.stats()["define"] == {"in": 0, "out": 0, "rejected": {}}


async def test_reject_event_for_a_parseable_topic(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path) as store:
        pipeline = make_pipeline(store, FakeClock())
        emit = await pipeline.run([raw({"value": "hot", "note": "é"})])
    [reject] = emit.rejects
    reject_topic, event = pipeline.reject_event(reject)
    assert reject_topic == topic(stage="rejected") == "telemetry/rejected/1.0/site1/environment/dev-1/temperature"
    assert event["type"] == REJECT_TYPE
    assert event["subject"] == reject_topic
    assert event["source"] == "/iotgw/site1/pipeline/clean"
    assert event["specversion"] == "1.0"
    assert len(event["id"]) == 26
    data = event["data"]
    assert (data["stage"], data["reason"], data["topic"]) == ("clean", "non_numeric", topic())
    assert data["detail"] == reject.detail
    assert data["payload_encoding"] == "utf-8"
    assert data["payload"] == reject.payload.decode("utf-8")
    assert json.loads(data["payload"]) == {"value": "hot", "note": "é"}
    datetime.fromisoformat(event["time"])  # an RFC 3339 time: it parses


@pytest.mark.parametrize(
    ("reject_topic", "payload", "encoding"),
    [
        pytest.param("some/other/topic", b"plain text", "utf-8", id="unknown-topic-text"),
        pytest.param("#", b"\xff\x00\x80binary", "base64", id="unknown-topic-binary"),
        pytest.param(topic(stage="valid"), b"\xc3\x28", "base64", id="wrong-stage-binary"),
    ],
)
def test_reject_event_placeholder_topic_and_payload_encoding(reject_topic: str, payload: bytes, encoding: str) -> None:
    pipeline = Pipeline([], TEMPLATE, site=SITE, version=VERSION)
    where, event = pipeline.reject_event(Reject("collect", "unknown_topic", "nope", reject_topic, payload))
    if TEMPLATE.parse(reject_topic) is None:
        assert where == "telemetry/rejected/1.0/site1/_unknown/_unknown/_unknown"
    else:
        assert where == TEMPLATE.with_stage(reject_topic, "rejected")
    data = event["data"]
    assert data["topic"] == reject_topic
    assert data["payload_encoding"] == encoding
    if encoding == "base64":
        assert base64.b64decode(data["payload"]) == payload
    else:
        assert data["payload"] == payload.decode()
    json.dumps(event, allow_nan=False)


def test_reject_event_time_is_utc() -> None:
    pipeline = Pipeline([], TEMPLATE, site=SITE, version=VERSION)
    _, event = pipeline.reject_event(Reject("collect", "invalid_json", "x", topic(), b"{"))
    stamp = datetime.fromisoformat(event["time"])
    assert event["time"].endswith("Z")
    assert abs(stamp - datetime.now(UTC)) < timedelta(seconds=5)


def test_rfc3339_leap_second_is_the_last_representable_instant() -> None:
    assert parse_timestamp("2016-12-31T23:59:60Z") == datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert parse_timestamp("2016-12-31T23:59:60.5+00:00") == datetime(2016, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)
    for loose in ("2024-W01-1T00:00Z", "2024-01-01T12Z", "20240101T000000Z", "2024-01-01T00:00:00"):
        assert parse_timestamp(loose) is None, loose


class _Broken:
    """A stage with a bug: the runner must reject its batch, not die."""

    name = "clean"

    def __init__(self) -> None:
        self.stats = StageStats()
        self.calls = 0

    async def process(self, batch: Sequence[Draft], emit: Emitter) -> Sequence[Draft]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        return batch


def test_a_failing_stage_rejects_its_batch_and_the_next_batch_runs(tmp_path: Path) -> None:
    template = TopicTemplate()

    async def scenario() -> tuple[Emitter, Emitter, int]:
        async with SqliteStore(tmp_path) as store:
            broken = _Broken()
            pipeline = Pipeline(
                [CollectStage(template, {}), broken, DefineStage(template), StoreStage(store)],
                template, site="s1", version="1.0",
            )
            first = await pipeline.run([raw({"value": 1.0, "seq": 1})])
            second = await pipeline.run([raw({"value": 2.0, "seq": 2})])
            return first, second, store.rows_written

    first, second, stored = asyncio.run(scenario())
    assert [(r.stage, r.reason) for r in first.rejects] == [("clean", "internal_error")]
    assert "boom" in first.rejects[0].detail
    assert json.loads(first.rejects[0].payload)["seq"] == 1  # the original payload is kept
    assert second.rejects == []
    assert stored == 1
