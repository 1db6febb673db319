"""The event catalog: declarations and the versioning rule, topic patterns, validation in the define
stage, traffic learning and its file, ``iotgw catalog``, and the AsyncAPI 3.0 document checked against
the official AsyncAPI JSON Schema (fetched from the npm registry at test time, cached under pytest's
cache: never committed)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import ROOT, iotgw
from jsonschema import Draft7Validator
from referencing import Registry
from referencing.jsonschema import DRAFT7

from gateway.config import CatalogSettings, GatewayConfig, parse_config
from gateway.errors import ConfigError
from pipeline.asyncapi import asyncapi_document
from pipeline.catalog import ALERT_CLEARED_TYPE, Catalog, CatalogError, EventType, TopicPattern
from pipeline.collect import CollectStage
from pipeline.define import DefineStage
from pipeline.model import AGGREGATE_TYPE, ALERT_TYPE, COMMAND_ACK_TYPE, READING_TYPE, REJECT_TYPE, Reading, cloudevent
from pipeline.runner import Pipeline
from pipeline.stage import Draft, Emitter, RawMessage
from pipeline.topics import TopicFilter, TopicTemplate, compile_filter
from pipeline.traffic import TrafficLearner, read_traffic

TEMPLATE = TopicTemplate()
RECEIVED = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
DEVICE_TS = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TEMPERATURE_V1 = "com.example.environment.temperature.v1"

# An "environment" device class producing temperature in °C: 1.0, and 1.1 with an optional field.
ENV_TYPES: list[dict[str, Any]] = [
    {
        "name": TEMPERATURE_V1, "version": "1.0", "metric": "temperature", "device_classes": ["environment"],
        "description": "air temperature", "value": {"unit": "°C", "minimum": -40, "maximum": 85},
    },
    {
        "name": TEMPERATURE_V1, "version": "1.1", "metric": "temperature", "device_classes": ["environment"],
        "description": "air temperature, with the sensor's accuracy",
        "value": {"unit": "°C", "minimum": -40, "maximum": 85},
        "fields": {"accuracy": {"type": "number", "unit": "°C", "minimum": 0, "description": "± of value"}},
    },
]


def catalog_settings(types: list[dict[str, Any]] | None = None, **extra: Any) -> CatalogSettings:
    return parse_config({"catalog": {"types": ENV_TYPES if types is None else types, **extra}}).catalog


def make_catalog(*, strict: bool = False, types: list[dict[str, Any]] | None = None) -> Catalog:
    return Catalog(TEMPLATE, catalog_settings(types).all_types, strict=strict)


def config_problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def draft(
    value: object = 21.5, *, metric: str = "temperature", device_class: str = "environment", version: str = "1.0",
    unit: str | None = "°C", payload: dict[str, Any] | None = None, transport: str = "mqtt",
) -> Draft:
    topic = f"telemetry/raw/{version}/site1/{device_class}/dev-1/{metric}"
    fields = TEMPLATE.parse(topic)
    assert fields is not None
    body = payload if payload is not None else {"value": value, "unit": unit}
    return Draft(topic=topic, fields=fields, transport=transport, value=value, unit=unit, device_ts=DEVICE_TS,
                 seq=1, received_at=RECEIVED, payload=json.dumps(body).encode())


async def define(catalog: Catalog, *drafts: Draft) -> tuple[Sequence[Reading], Emitter, DefineStage]:
    stage = DefineStage(TEMPLATE, catalog=catalog)
    emit = Emitter()
    return await stage.process(list(drafts), emit), emit, stage


# ===========================================================================
# declarations and the versioning rule
# ===========================================================================


def test_defaults_are_lenient_with_no_declared_types() -> None:
    settings = GatewayConfig().catalog
    assert (settings.strict, settings.files, settings.types, settings.flush_interval_s) == (False, [], [], 5.0)
    catalog = Catalog(TEMPLATE)
    assert [(t.name, t.variant) for t in catalog.types] == [
        (READING_TYPE, ""), (AGGREGATE_TYPE, ""), (REJECT_TYPE, ""), (ALERT_TYPE, ""), (ALERT_CLEARED_TYPE, ""),
        (ALERT_TYPE, "outbox_dropped"), (COMMAND_ACK_TYPE, ""),
    ]
    assert len({t.key for t in catalog.types}) == len(catalog.types)


def test_alert_types_declare_exactly_the_rule_fields() -> None:
    catalog = Catalog(TEMPLATE)
    for key in (f"{ALERT_TYPE}@1.0", f"{ALERT_CLEARED_TYPE}@1.0"):
        event_type = catalog.get(key)
        assert event_type is not None
        fields = {f["name"]: (f["type"], f["required"]) for f in event_type.schema_fields()}
        assert fields == {
            "rule": ("string", True), "kind": ("threshold|rate|zscore|inactivity", True), "device_id": ("string", True),
            "metric": ("string", True), "severity": ("string", True), "value": ("number", True),
            "message": ("string", True), "raised_at": ("string (date-time)", True),
        }
    raised = catalog.get(f"{ALERT_TYPE}@1.0")
    assert raised is not None
    assert str(raised.pattern) == "alert/raised/1.0/{site}/{device_class}/{device_id}/{metric}"
    with pytest.raises(ValueError, match="raised_at"):  # RFC 3339 with an offset
        raised.model.model_validate({"rule": "hot", "kind": "threshold", "device_id": "d", "metric": "m",
                                     "severity": "warning", "value": 1.0, "message": "x",
                                     "raised_at": "2024-05-01T12:00:00"})


def test_declared_types_from_config() -> None:
    catalog = make_catalog()
    v10, v11 = catalog.get(f"{TEMPERATURE_V1}@1.0"), catalog.get(f"{TEMPERATURE_V1}@1.1")
    assert v10 is not None
    assert v11 is not None
    assert str(v10.pattern) == "telemetry/valid/1.0/{site}/environment/{device_id}/temperature"
    assert str(v11.pattern) == "telemetry/valid/1.1/{site}/environment/{device_id}/temperature"
    assert (v11.device_classes, v11.metric, v11.unit, v11.extra_fields) == (("environment",), "temperature", "°C",
                                                                            ("accuracy",))
    fields = {f["name"]: f for f in v11.schema_fields()}
    assert fields["value"]["unit"] == "°C"
    assert (fields["accuracy"]["unit"], fields["accuracy"]["required"]) == ("°C", False)
    assert "accuracy" not in {f["name"] for f in v10.schema_fields()}


BREAKING_MINORS = [
    pytest.param({"fields": {"accuracy": {"type": "number", "required": True}}}, "field 'accuracy' is new and required",
                 id="new-required-field"),
    pytest.param({"value": {"unit": "°F"}}, "field 'value': unit '°F' differs", id="value-unit-changed"),
    pytest.param({"metric": "humidity"}, "metric 'humidity' differs", id="metric-changed"),
    pytest.param({"device_classes": ["weather"]}, "device class 'environment' of 1.0 is missing",
                 id="device-class-dropped"),
]


@pytest.mark.parametrize(("change", "message"), BREAKING_MINORS)
def test_a_minor_version_that_breaks_its_major_is_refused(change: dict[str, Any], message: str) -> None:
    v11 = {**ENV_TYPES[0], "version": "1.1", "value": {"unit": "°C"}, **change}
    problems = config_problems({"catalog": {"types": [{**ENV_TYPES[0], "value": {"unit": "°C"}}, v11]}})
    assert len(problems) == 1
    assert problems[0].startswith(f"catalog: event type {TEMPERATURE_V1} 1.1: {message}"), problems


@pytest.mark.parametrize(
    ("previous", "current", "message"),
    [
        pytest.param({"accuracy": {"type": "number"}}, {}, "field 'accuracy' of 1.0 is missing", id="field-removed"),
        pytest.param({"accuracy": {"type": "number"}}, {"accuracy": {"type": "string"}},
                     "field 'accuracy': type 'string' differs", id="field-type-changed"),
        pytest.param({"accuracy": {"type": "number", "unit": "K"}}, {"accuracy": {"type": "number", "unit": "°C"}},
                     "field 'accuracy': unit '°C' differs", id="field-unit-changed"),
        pytest.param({"accuracy": {"type": "number", "required": True}}, {"accuracy": {"type": "number"}},
                     "field 'accuracy': required=False differs", id="required-became-optional"),
    ],
)
def test_a_minor_version_keeps_every_field(previous: dict[str, Any], current: dict[str, Any], message: str) -> None:
    base = {"name": TEMPERATURE_V1, "metric": "temperature", "device_classes": ["environment"]}
    problems = config_problems({"catalog": {"types": [
        {**base, "version": "1.0", "fields": previous}, {**base, "version": "1.1", "fields": current},
    ]}})
    assert problems == [f"catalog: event type {TEMPERATURE_V1} 1.1: {message}" + problems[0].split(message)[1]]


def test_a_new_major_may_change_anything() -> None:
    v2 = {**ENV_TYPES[0], "name": "com.example.environment.temperature.v2", "version": "2.0",
          "value": {"unit": "K"}, "fields": {"raw": {"type": "integer", "required": True}}}
    catalog = make_catalog(types=[*ENV_TYPES, v2])
    assert catalog.get("com.example.environment.temperature.v2@2.0") is not None


@pytest.mark.parametrize(
    ("declared", "problem"),
    [
        pytest.param({"name": "com.example.temperature"}, "catalog.types[0]: name 'com.example.temperature' must be",
                     id="name-without-major"),
        pytest.param({"name": "com.example.temperature.v2"}, "catalog.types[0]: name 'com.example.temperature.v2'"
                     " ends in .v2 but version 1.0 has major 1", id="name-major-mismatch"),
        pytest.param({"version": "1"}, "catalog.types[0]: version '1' must be MAJOR.MINOR",
                     id="version-not-major-minor"),
        pytest.param({"name": "io.iotgw.telemetry.reading.v1"},
                     "catalog.types[0]: name 'io.iotgw.telemetry.reading.v1': the prefix 'io.iotgw.' is reserved",
                     id="builtin-prefix"),
        pytest.param({"device_classes": []}, "catalog.types[0].device_classes: List should have at least 1 item",
                     id="no-device-class"),
        pytest.param({"fields": {"x": {"type": "float"}}}, "catalog.types[0].fields.x.type: Input should be 'number',",
                     id="unknown-field-type"),
        pytest.param({"fields": {"seq": {"type": "integer"}}}, "catalog: event type com.example.t.v1 1.0: field 'seq'"
                     " is a reading field already", id="field-shadows-reading"),
        pytest.param({"colour": "red"}, "catalog.types[0].colour: unknown field", id="unknown-key"),
    ],
)
def test_declaration_errors_name_the_field(declared: dict[str, Any], problem: str) -> None:
    base = {"name": "com.example.t.v1", "version": "1.0", "metric": "temperature", "device_classes": ["env"]}
    problems = config_problems({"catalog": {"types": [{**base, **declared}]}})
    assert len(problems) == 1
    assert problems[0].startswith(problem), problems


def test_duplicates_and_overlaps_are_refused() -> None:
    assert config_problems({"catalog": {"types": [ENV_TYPES[0], ENV_TYPES[0]]}}) == [
        f"catalog: event type {TEMPERATURE_V1} 1.0 is declared twice"]
    other = {**ENV_TYPES[0], "name": "com.example.other.v1"}
    assert config_problems({"catalog": {"types": [ENV_TYPES[0], other]}}) == [
        "catalog: event type com.example.other.v1 1.0: metric 'temperature' of device class 'environment' at version"
        f" 1.0 is already covered by {TEMPERATURE_V1}"]


def test_catalog_files(tmp_path: Path) -> None:
    path = tmp_path / "environment.toml"
    path.write_text(
        '[[types]]\nname = "com.example.environment.humidity.v1"\nversion = "1.0"\nmetric = "humidity"\n'
        'device_classes = ["environment", "weather"]\nvalue = { unit = "%", minimum = 0, maximum = 100 }\n',
        encoding="utf-8",
    )
    settings = catalog_settings(files=[str(path)])
    assert [t.name for t in settings.all_types] == [
        TEMPERATURE_V1, TEMPERATURE_V1, "com.example.environment.humidity.v1"]
    humidity = Catalog(TEMPLATE, settings.all_types).get("com.example.environment.humidity.v1@1.0")
    assert humidity is not None
    assert str(humidity.pattern) == "telemetry/valid/1.0/{site}/{device_class=environment|weather}/{device_id}/humidity"
    # the config's types and the files' are checked together
    path.write_text(f'[[types]]\nname = "{TEMPERATURE_V1}"\nversion = "1.1"\nmetric = "temperature"\n'
                    'device_classes = ["environment"]\n', encoding="utf-8")
    assert config_problems({"catalog": {"files": [str(path)], "types": ENV_TYPES[:1]}}) == [
        f"catalog: event type {TEMPERATURE_V1} 1.1: field 'value': unit None differs from 1.0's '°C'"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param('[[types]]\nname = "com.example.t.v1"\nversion = "1.0"\nmetric = "t"\ndevice_classes = ["e"]\n'
                     '[types.fields.x]\ntype = "number"\nrequird = true\n',
                     "types[0].fields.x.requird: unknown field", id="typo-in-field"),
        pytest.param("[[types]\n", "not valid TOML", id="bad-toml"),
        pytest.param(None, "cannot read (No such file or directory)", id="missing-file"),
    ],
)
def test_catalog_file_errors_name_the_file_and_field(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "types.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    [line] = config_problems({"catalog": {"files": [str(path)]}})
    assert line.startswith(f"catalog: {path}: ")
    assert problem in line


def test_catalog_error_from_the_catalog_itself() -> None:
    class Decl:
        name, version, metric, device_classes, description = "bad", "1.0", "t", ("e",), ""
        value = GatewayConfig().catalog  # never read: the name fails first
        fields: ClassVar[dict[str, Any]] = {}

    with pytest.raises(CatalogError, match=r"event type bad 1\.0: name 'bad' must be"):
        Catalog(TEMPLATE, [Decl()])  # type: ignore[list-item]


# ===========================================================================
# topic patterns: topics, and subscriptions' filters
# ===========================================================================

READING_PATTERN = TopicPattern.parse("telemetry/valid/{version}/{site}/{device_class}/{device_id}/{metric}")
ENV_PATTERN = TopicPattern.parse("telemetry/valid/1.0/{site}/{device_class}/{device_id}/temperature",
                                 {"device_class": ["environment", "weather"]})


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        (READING_PATTERN, "telemetry/valid/1.0/s/c/d/m", True),
        (READING_PATTERN, "telemetry/raw/1.0/s/c/d/m", False),
        (READING_PATTERN, "telemetry/valid/1.0/s//d/m", False),  # a placeholder is never empty
        (READING_PATTERN, "telemetry/valid/1.0/s/c/d/m/x", False),
        (ENV_PATTERN, "telemetry/valid/1.0/s/weather/d/temperature", True),
        (ENV_PATTERN, "telemetry/valid/1.0/s/particulate/d/temperature", False),
        (ENV_PATTERN, "telemetry/valid/1.1/s/weather/d/temperature", False),
    ],
)
def test_pattern_matches_topics(pattern: TopicPattern, topic: str, expected: bool) -> None:
    assert pattern.matches(topic) is expected


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        pytest.param(READING_PATTERN, "#", True, id="hash"),
        pytest.param(READING_PATTERN, "telemetry/#", True, id="prefix-hash"),
        pytest.param(READING_PATTERN, "telemetry/valid/+/+/+/+/+", True, id="plus-everywhere"),
        pytest.param(READING_PATTERN, "telemetry/+/1.0/site1/env/dev-1/temperature", True, id="exact-values"),
        pytest.param(READING_PATTERN, "telemetry/raw/#", False, id="other-stage"),
        pytest.param(READING_PATTERN, "telemetry/valid/+/+/+/+", False, id="too-few-levels"),
        pytest.param(READING_PATTERN, "telemetry/valid/1.0/s//d/m", False, id="empty-level"),
        pytest.param(READING_PATTERN, "+/+/+/+/+/+/+/+", False, id="too-many-levels"),
        pytest.param(ENV_PATTERN, "telemetry/valid/1.0/+/weather/#", True, id="allowed-value"),
        pytest.param(ENV_PATTERN, "telemetry/valid/1.0/+/particulate/#", False, id="value-not-allowed"),
        pytest.param(ENV_PATTERN, "telemetry/valid/1.1/#", False, id="other-version"),
        pytest.param(ENV_PATTERN, "telemetry/valid/1.0/*/we*/>", True, id="smf-prefix-wildcard"),
        pytest.param(ENV_PATTERN, "telemetry/valid/1.0/*/pa*/>", False, id="smf-prefix-excludes"),
        pytest.param(ENV_PATTERN, "telemetry/valid/1.0/*/*/*/temperature", True, id="smf-star"),
    ],
)
def test_pattern_overlaps_filters(pattern: TopicPattern, topic_filter: str, expected: bool) -> None:
    assert pattern.overlaps(compile_filter(topic_filter)) is expected


def test_most_specific_type_wins_for_a_topic() -> None:
    catalog = make_catalog()

    def key(topic: str) -> str | None:
        found = catalog.type_for_topic(topic)
        return found.key if found else None

    assert key("telemetry/valid/1.0/s/environment/d/temperature") == f"{TEMPERATURE_V1}@1.0"
    assert key("telemetry/valid/1.1/s/environment/d/temperature") == f"{TEMPERATURE_V1}@1.1"
    assert key("telemetry/valid/1.0/s/environment/d/humidity") == f"{READING_TYPE}@1.0"
    assert key("alert/raised/1.0/s/environment/d/temperature") == f"{ALERT_TYPE}@1.0"
    assert key("alert/raised/1.0/s/gateway/gw-1/outbox_dropped") == f"{ALERT_TYPE}@1.0#outbox_dropped"
    assert key("cmdack/s/dev-1/sleep") == f"{COMMAND_ACK_TYPE}@1.0"
    assert key("somewhere/else") is None
    assert [t.key for t in catalog.types_for_filter(TopicFilter("alert/+/1.0/+/gateway/#", "mqtt"))] == [
        f"{ALERT_TYPE}@1.0", f"{ALERT_CLEARED_TYPE}@1.0", f"{ALERT_TYPE}@1.0#outbox_dropped"]


# ===========================================================================
# validation on ingest (define)
# ===========================================================================


async def test_lenient_catalog_takes_any_numeric_metric() -> None:
    out, emit, _ = await define(make_catalog(), draft(3.0, metric="vibration", device_class="pump", unit="mm/s"))
    assert [(r.metric, r.value, r.unit) for r in out] == [("vibration", 3.0, "mm/s")]
    assert emit.rejects == []
    assert emit.events[0][1]["type"] == READING_TYPE


async def test_strict_catalog_rejects_undeclared_metrics_as_unknown_event_type() -> None:
    out, emit, stage = await define(make_catalog(strict=True), draft(1.0), draft(3.0, metric="vibration"),
                                    draft(3.0, device_class="pump"))
    assert [r.metric for r in out] == ["temperature"]
    assert [(r.stage, r.reason) for r in emit.rejects] == [("define", "unknown_event_type")] * 2
    assert emit.rejects[0].detail == ("metric 'vibration' is not declared for device class 'environment'"
                                      " (the catalog is strict)")
    assert emit.rejects[1].detail == ("metric 'temperature' is not declared for device class 'pump'"
                                      " (the catalog is strict)")
    assert stage.stats.as_dict() == {"in": 3, "out": 1, "rejected": {"unknown_event_type": 2}}


async def test_an_undeclared_version_of_a_declared_metric_is_unknown_even_when_lenient() -> None:
    out, emit, _ = await define(make_catalog(), draft(1.0, version="1.2"), draft(1.0, version="2.0"))
    assert out == []
    assert [r.reason for r in emit.rejects] == ["unknown_event_type"] * 2
    assert emit.rejects[0].detail == ("version 1.2 of metric 'temperature' for device class 'environment' is not"
                                      " declared (declared: 1.0, 1.1)")


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        pytest.param(draft(99.0), "value: Input should be less than or equal to 85", id="above-declared-max"),
        pytest.param(draft(-41.0), "value: Input should be greater than or equal to -40", id="below-declared-min"),
        pytest.param(draft(20.0, unit="°F"), "unit: Input should be '°C'", id="other-unit"),
        pytest.param(draft(20.0, version="1.1", payload={"value": 20.0, "accuracy": "good"}),
                     "accuracy: Input should be a valid number", id="extra-field-wrong-type"),
        pytest.param(draft(20.0, version="1.1", payload={"value": 20.0, "accuracy": -1}),
                     "accuracy: Input should be greater than or equal to 0", id="extra-field-below-minimum"),
        pytest.param(draft(20.0, transport="zigbee"), "transport: Input should be 'serial', 'ble' or 'mqtt'",
                     id="reading-field-invalid"),
    ],
)
async def test_invalid_events_are_rejected_with_the_validation_error(bad: Draft, detail: str) -> None:
    out, emit, stage = await define(make_catalog(strict=True), draft(20.0), bad)
    assert len(out) == 1
    [reject] = emit.rejects
    assert (reject.stage, reject.reason, reject.topic, reject.payload) == ("define", "invalid_event", bad.topic,
                                                                           bad.payload)
    version = bad.fields.version
    assert reject.detail.startswith(f"{TEMPERATURE_V1}@{version}: {detail}"), reject.detail
    assert len(emit.events) == 1
    assert stage.stats.rejected == {"invalid_event": 1}


async def test_declared_types_fill_the_unit_read_extra_fields_and_name_the_event() -> None:
    v10 = draft(20.0, unit=None)
    v11 = draft(21.0, version="1.1", payload={"value": 21.0, "accuracy": 0.3, "ignored": True})
    v11_without = draft(22.0, version="1.1", payload={"value": 22.0})
    v11_bom = dataclasses.replace(v11, payload=b"\xef\xbb\xbf" + v11.payload)  # collect accepts a UTF-8 BOM
    out, emit, _ = await define(make_catalog(strict=True), v10, v11, v11_without, v11_bom)
    assert emit.rejects == []
    assert [r.unit for r in out] == ["°C"] * 4
    assert [getattr(r, "accuracy", "absent") for r in out] == ["absent", 0.3, None, 0.3]
    emit.events.pop()
    assert [(t, e["type"], e["data"].get("accuracy", "absent")) for t, e in emit.events] == [
        ("telemetry/valid/1.0/site1/environment/dev-1/temperature", TEMPERATURE_V1, "absent"),
        ("telemetry/valid/1.1/site1/environment/dev-1/temperature", TEMPERATURE_V1, 0.3),
        ("telemetry/valid/1.1/site1/environment/dev-1/temperature", TEMPERATURE_V1, None),
    ]
    # a consumer of 1.0 reads a 1.1 event: the 1.0 model accepts it once the added optional fields are dropped
    v10_type = make_catalog().get(f"{TEMPERATURE_V1}@1.0")
    assert v10_type is not None
    data = {k: v for k, v in emit.events[1][1]["data"].items() if k != "accuracy"}
    assert v10_type.model.model_validate(data).value == 21.0  # type: ignore[attr-defined]


async def test_valid_event_is_what_cloudevent_builds() -> None:
    """The define stage writes the envelope itself for speed: it must equal the shared helper's."""
    [reading], emit, _ = await define(Catalog(TEMPLATE), draft(20.0))
    [(topic, event)] = emit.events
    assert event == cloudevent(event_id=reading.id, source="/iotgw/site1/dev-1", type_=READING_TYPE, subject=topic,
                               time=DEVICE_TS, data=reading.model_dump(mode="json"))


async def test_rejects_reach_the_reject_topic_with_their_reason() -> None:
    catalog = make_catalog(strict=True)
    pipeline = Pipeline([CollectStage(TEMPLATE, {}), DefineStage(TEMPLATE, catalog=catalog)], TEMPLATE,
                        site="site1", version="1.0")
    batch = [
        RawMessage("telemetry/raw/1.0/site1/environment/dev-1/pressure", b'{"value": 1000}', "c", RECEIVED),
        RawMessage("telemetry/raw/1.0/site1/environment/dev-1/temperature", b'{"value": 300}', "c", RECEIVED),
        RawMessage("telemetry/raw/1.0/site1/environment/dev-1/temperature", b'{"value": 20}', "c", RECEIVED),
    ]
    emit = await pipeline.run(batch)
    events = [pipeline.reject_event(r) for r in emit.rejects]
    assert [(t, e["data"]["reason"]) for t, e in events] == [
        ("telemetry/rejected/1.0/site1/environment/dev-1/pressure", "unknown_event_type"),
        ("telemetry/rejected/1.0/site1/environment/dev-1/temperature", "invalid_event"),
    ]
    assert "less than or equal to 85" in events[1][1]["data"]["detail"]
    assert json.loads(events[1][1]["data"]["payload"]) == {"value": 300}
    assert len(emit.events) == 1


# ===========================================================================
# learning from traffic
# ===========================================================================


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_traffic_learner_attributes_publishes_and_subscriptions(tmp_path: Path) -> None:
    clock = Clock()
    reading = f"{READING_TYPE}@1.0"
    async with TrafficLearner(make_catalog(), tmp_path, gateway_id="gw-1", flush_interval_s=3600,
                              clock=clock) as learner:
        raw = "telemetry/raw/1.0/site1/pump/p-1/vibration"
        learner.published(raw, "mqtt:sensor-1")
        clock.now += 1
        learner.published(raw, "mqtt:sensor-1")
        learner.published("telemetry/raw/1.0/site1/particulate/pm-1/pm2_5", None, 5)  # an in-process driver's burst
        learner.published("telemetry/raw/1.0/site1/environment/t-1/temperature", "mqtt:env-1")
        learner.published("telemetry/valid/1.0/site1/pump/p-1/vibration", None)  # the gateway's relay: not counted
        learner.published("telemetry/agg/1.0/site1/pump/p-1/vibration", None)
        learner.published("alert/raised/1.0/site1/gateway/gw-1/outbox_dropped", None)
        learner.published("not/in/the/catalog", "mqtt:x")
        learner.subscribed("mqtt:dashboard", "telemetry/valid/#")
        learner.subscribed("mqtt:ops", "alert/#")
        learner.subscribed("mqtt:ops", "nothing/here")
        learner.subscribed("forward:central", "telemetry/agg/>")
        assert read_traffic(tmp_path) == ([], [])  # nothing written per message
        await learner.flush()
        clock.now += 1
        learner.unsubscribed("mqtt:ops", "alert/#")
        await learner.flush()
        producers, consumers = read_traffic(tmp_path)
        assert {(p.type_key, p.client, p.messages) for p in producers} == {
            (reading, "mqtt:sensor-1", 2), (reading, "driver:pm-1", 5), (f"{TEMPERATURE_V1}@1.0", "mqtt:env-1", 1),
            (f"{AGGREGATE_TYPE}@1.0", "gateway:gw-1", 1), (f"{ALERT_TYPE}@1.0#outbox_dropped", "gateway:gw-1", 1),
        }
        sensor = next(p for p in producers if p.client == "mqtt:sensor-1")
        assert sensor.last_seen_ms - sensor.first_seen_ms == 1000
        active = {(c.type_key, c.client, c.filter) for c in consumers if c.active}
        assert (reading, "mqtt:dashboard", "telemetry/valid/#") in active
        assert (f"{TEMPERATURE_V1}@1.1", "mqtt:dashboard", "telemetry/valid/#") in active
        assert (f"{AGGREGATE_TYPE}@1.0", "forward:central", "telemetry/agg/>") in active
        assert {c.type_key for c in consumers if c.client == "mqtt:ops"} == {
            f"{ALERT_TYPE}@1.0", f"{ALERT_CLEARED_TYPE}@1.0", f"{ALERT_TYPE}@1.0#outbox_dropped"}
        assert not any(c.active for c in consumers if c.client == "mqtt:ops")
        learner.published(raw, "mqtt:sensor-1")
    producers, consumers = read_traffic(tmp_path)  # the exit flushed, and every subscription ended with the broker
    assert next(p for p in producers if p.client == "mqtt:sensor-1").messages == 3
    assert consumers
    assert not any(c.active for c in consumers)


async def test_traffic_learner_writes_in_the_background(tmp_path: Path) -> None:
    async with TrafficLearner(Catalog(TEMPLATE), tmp_path, gateway_id="gw", flush_interval_s=0.05) as learner:
        learner.published("telemetry/raw/1.0/s/c/d/m", "mqtt:a")
        for _ in range(400):
            if read_traffic(tmp_path)[0]:
                break
            await asyncio_sleep(0.05)
        assert [p.client for p in read_traffic(tmp_path)[0]] == ["mqtt:a"]
        assert learner.flushes >= 1


async def asyncio_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


# ===========================================================================
# AsyncAPI 3.0, checked against the official JSON Schema
# ===========================================================================


SPECS_PACKAGE = "https://registry.npmjs.org/@asyncapi%2Fspecs"


def _fetch_asyncapi_schema(target: Path) -> None:
    """The newest 6.x of the npm package @asyncapi/specs, straight from the npm registry (no npm needed)."""
    try:
        with urllib.request.urlopen(SPECS_PACKAGE, timeout=60) as response:
            meta = json.load(response)
        versions = [v for v in meta["versions"] if v.startswith("6.") and "-" not in v]
        newest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
        with urllib.request.urlopen(meta["versions"][newest]["dist"]["tarball"], timeout=120) as response:  # noqa: S310
            tarball = response.read()
    except (OSError, ValueError, KeyError) as exc:
        pytest.fail(f"could not fetch @asyncapi/specs@6 from the npm registry (needed to validate the AsyncAPI "
                    f"document): {exc}", pytrace=False)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        member = archive.extractfile("package/schemas/3.0.0.json")
        assert member is not None, "package/schemas/3.0.0.json is missing from @asyncapi/specs"
        target.write_bytes(member.read())


@pytest.fixture(scope="session")
def asyncapi_schema(pytestconfig: pytest.Config) -> Draft7Validator:
    """The AsyncAPI 3.0.0 JSON Schema from the npm package @asyncapi/specs (v6), fetched from the npm
    registry at test time and cached under pytest's cache (or build/) directory: never committed."""
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    directory = cache.mkdir("asyncapi-specs-6") if cache is not None else ROOT / "build" / "asyncapi-specs-6"
    directory.mkdir(parents=True, exist_ok=True)
    schema_path = directory / "3.0.0.json"
    if not schema_path.exists():
        _fetch_asyncapi_schema(schema_path)
    root = json.loads(schema_path.read_text(encoding="utf-8"))
    definitions = root.pop("definitions")
    registry: Registry[Any] = Registry().with_resources(
        (uri, DRAFT7.create_resource(schema)) for uri, schema in definitions.items()
    )
    return Draft7Validator(root, registry=registry)


def assert_valid_asyncapi(validator: Draft7Validator, document: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]
    assert errors == []
    # every local $ref resolves (the JSON Schema cannot check that)
    for ref in _refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict), f"dangling $ref {ref}"
            assert part in node, f"dangling $ref {ref}"
            node = node[part]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_validator_catches_invalid_documents(asyncapi_schema: Draft7Validator) -> None:
    document = asyncapi_document(Catalog(TEMPLATE), host="127.0.0.1", port=1883, site="site1")
    broken = json.loads(json.dumps(document))
    broken["operations"][next(iter(broken["operations"]))]["action"] = "publish"  # AsyncAPI 2's word
    assert list(asyncapi_schema.iter_errors(broken))
    del broken["servers"]["embedded"]["protocol"]
    assert len(list(asyncapi_schema.iter_errors(broken))) == 2


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_asyncapi_document_is_valid_asyncapi_3(asyncapi_schema: Draft7Validator, strict: bool) -> None:
    catalog = make_catalog(strict=strict)
    document = asyncapi_document(catalog, host="127.0.0.1", port=18830, site="site1")
    assert_valid_asyncapi(asyncapi_schema, document)
    assert document["asyncapi"] == "3.0.0"
    assert document["servers"]["embedded"] == {"host": "127.0.0.1:18830", "protocol": "mqtt",
                                               "protocolVersion": "3.1.1",
                                               "description": "the gateway's embedded MQTT broker"}
    channels = document["channels"]
    v11 = channels[f"{TEMPERATURE_V1}_1.1"]
    assert v11["address"] == "telemetry/valid/1.1/{site}/environment/{device_id}/temperature"
    assert set(v11["parameters"]) == {"site", "device_id"}
    raw = channels[f"raw.{TEMPERATURE_V1}_1.1"]
    assert raw["address"] == "telemetry/raw/1.1/{site}/environment/{device_id}/temperature"
    assert channels[f"{ALERT_TYPE}_1.0"]["address"] == "alert/raised/1.0/{site}/{device_class}/{device_id}/{metric}"
    actions = {(op["action"], op["channel"]["$ref"]) for op in document["operations"].values()}
    assert ("send", f"#/channels/{TEMPERATURE_V1}_1.1") in actions
    assert ("receive", f"#/channels/raw.{TEMPERATURE_V1}_1.1") in actions
    assert (f"{READING_TYPE}_1.0" in channels) is not strict


async def test_published_events_validate_against_their_asyncapi_message(asyncapi_schema: Draft7Validator) -> None:
    """The payload schemas say what define really publishes: each valid event checks against its message."""
    catalog = make_catalog()
    document = asyncapi_document(catalog, host="127.0.0.1", port=1883, site="site1")
    _, emit, _ = await define(catalog, draft(20.0), draft(21.0, version="1.1", payload={"value": 21, "accuracy": 0.5}),
                              draft(5.0, metric="co2", unit=None))
    registry: Registry[Any] = Registry().with_resource("urn:doc", DRAFT7.create_resource(document))
    for topic, event in emit.events:
        event_type = catalog.type_for_topic(topic)
        assert isinstance(event_type, EventType)
        ident = event_type.key.replace("@", "_")
        payload = {**document["components"]["messages"][ident]["payload"]}
        validator = Draft7Validator(json.loads(json.dumps(payload).replace('"#/components', '"urn:doc#/components')),
                                    registry=registry)
        assert list(validator.iter_errors(json.loads(json.dumps(event)))) == [], topic
        wrong = {**event, "data": {**event["data"], "value": "hot"}}
        assert list(validator.iter_errors(json.loads(json.dumps(wrong))))


# ===========================================================================
# iotgw catalog
# ===========================================================================


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        'site = "plant"\n[catalog]\nstrict = true\n' + extra + "".join(
            f'[[catalog.types]]\nname = "{t["name"]}"\nversion = "{t["version"]}"\nmetric = "{t["metric"]}"\n'
            f'device_classes = ["environment"]\nvalue = {{ unit = "°C", minimum = -40, maximum = 85 }}\n'
            + ("[catalog.types.fields.accuracy]\ntype = \"number\"\nunit = \"°C\"\n" if "fields" in t else "")
            for t in ENV_TYPES),
        encoding="utf-8",
    )
    return path


def test_cli_lists_types_as_json_and_table(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = iotgw("catalog", "--config", str(config), "--data-dir", str(tmp_path), "--format", "json")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    by_key = {r["key"]: r for r in records}
    assert f"{READING_TYPE}@1.0" not in by_key  # strict: the built-in reading covers nothing
    v11 = by_key[f"{TEMPERATURE_V1}@1.1"]
    assert v11["topic"] == "telemetry/valid/1.1/{site}/environment/{device_id}/temperature"
    assert {"name": "accuracy", "type": "number|null", "unit": "°C", "required": False, "description": ""} in v11[
        "fields"]
    assert (v11["producers"], v11["consumers"]) == ([], [])
    table = iotgw("catalog", "--config", str(config), "--data-dir", str(tmp_path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TYPE", "VERSION", "TOPIC", "FIELDS", "PRODUCERS", "CONSUMERS"]
    assert any(line.startswith(TEMPERATURE_V1) and "accuracy?:number|null [°C]" in line for line in lines)
    asyncapi = iotgw("catalog", "--config", str(config), "--data-dir", str(tmp_path), "--format", "asyncapi")
    assert json.loads(asyncapi.stdout)["asyncapi"] == "3.0.0"


def test_cli_reports_catalog_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[catalog]\nfiles = ["nowhere.toml"]\n', encoding="utf-8")
    done = iotgw("catalog", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith("catalog: nowhere.toml: cannot read")
    checked = iotgw("check-config", str(path))
    assert checked.returncode == 2
    assert "catalog: nowhere.toml: cannot read" in checked.stdout
