"""Foreign dialects (pipeline/dialects.py): each preset against payloads written from its firmware's
documentation (tests/fixtures/dialects/, each citing its source), compared as whole results; custom rules
from the config; the collect stage turning one message into a draft per metric; never an exception on
random input."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import MqttCollector, free_port, mqtt_publish

from gateway.app import Gateway
from gateway.config import ConfigError, build_dialects, parse_config
from pipeline.collect import CollectStage
from pipeline.dialects import (
    DialectSet,
    MappedMessage,
    MappedMetric,
    Unmapped,
    derived_event_id,
    multi_metric,
    preset,
)
from pipeline.model import new_event_id
from pipeline.stage import Emitter, RawMessage
from pipeline.store import StoreReader
from pipeline.topics import TopicTemplate

FIXTURES = Path(__file__).parent / "fixtures" / "dialects"
TEMPLATE = TopicTemplate()


def fixture(name: str) -> tuple[str, bytes]:
    """(topic, payload) of a fixture file: ``#`` comments (the source), ``topic: ...``, then the payload."""
    lines = [line for line in (FIXTURES / f"{name}.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines[0].startswith("topic: ")
    return lines[0].removeprefix("topic: "), "\n".join(lines[1:]).encode()


def every_preset() -> DialectSet:
    return DialectSet([preset("zigbee2mqtt"), preset("tasmota"), preset("shelly"), multi_metric(TEMPLATE)],
                      site="site1", version="1.0")


def m(metric: str, value: object, unit: str | None = None) -> MappedMetric:
    return MappedMetric(metric, value, unit)


def z2m(device: str, *metrics: MappedMetric, ts: object = None) -> MappedMessage:
    return MappedMessage("zigbee2mqtt", device, "zigbee", "site1", "1.0", metrics, ts)


def tasmota(device: str, *metrics: MappedMetric) -> MappedMessage:
    return MappedMessage("tasmota", device, "tasmota", "site1", "1.0", metrics)


def shelly(device: str, ts: float, *metrics: MappedMetric) -> MappedMessage:
    return MappedMessage("shelly", device, "shelly", "site1", "1.0", metrics, ts)


CASES = [
    pytest.param("z2m-wsdcgq01lm", z2m("0x00158d0001dc126a", m("temperature", 27.34, "°C"), m("humidity", 44.72, "%")),
                 id="z2m-temperature-humidity"),
    pytest.param("z2m-wxkg01lm", Unmapped("no_metrics", "zigbee2mqtt: no metric found in the payload"),
                 id="z2m-action-only"),
    pytest.param("z2m-rtcgq01lm", z2m("hall_motion", m("occupancy", 1)), id="z2m-boolean"),
    pytest.param("z2m-led1545g12", z2m("living_room_lamp", m("brightness", 215), m("color_temp", 325)),
                 id="z2m-string-state-skipped"),
    pytest.param("z2m-wsdcgq11lm-last-seen", z2m(
        "bathroom", m("battery", 91, "%"), m("humidity", 54.34, "%"), m("linkquality", 105, "lqi"),
        m("pressure", 1002.1, "hPa"), m("temperature", 22.78, "°C"), m("voltage", 2995),
        ts="2024-03-01T09:00:00.000Z"), id="z2m-last-seen-is-device-time"),
    pytest.param("tasmota-am2301", tasmota("sonoff_th", m("temperature", 24.6, "°C"), m("humidity", 58.2, "%")),
                 id="tasmota-am2301"),
    pytest.param("tasmota-ds18b20-two", tasmota(
        "boiler", m("temperature_ds18b20-1", 70.7, "°F"), m("temperature_ds18b20-2", 71.2, "°F")),
        id="tasmota-two-sensors-of-a-kind-fahrenheit"),
    pytest.param("tasmota-bme280", tasmota(
        "weather", m("temperature", 24.5, "°C"), m("humidity", 38.2, "%"), m("dew_point", 9.3, "°C"),
        m("pressure", 1011.0, "hPa")), id="tasmota-bme280"),
    pytest.param("tasmota-energy", tasmota(
        "plug_1", m("power", 22, "W"), m("apparent_power", 30, "VA"), m("reactive_power", 20, "var"),
        m("power_factor", 0.73), m("voltage", 230, "V"), m("current", 0.13, "A"), m("energy_total", 12.345, "kWh"),
        m("energy_today", 0.203, "kWh")), id="tasmota-energy"),
    pytest.param("tasmota-sds011", tasmota("air", m("pm2_5", 3.4, "µg/m³"), m("pm10", 7.1, "µg/m³")),
                 id="tasmota-member-name-with-a-dot"),
    pytest.param("shelly-switch-output", shelly("shellypro4pm-f008d1d8b8b8", 1631266595.43, m("switch_0_output", 0)),
                 id="shelly-switch-output"),
    pytest.param("shelly-switch-power", shelly(
        "shellyplus1pm-a8032ab636ec", 1654260040.23, m("switch_0_power", 8.9, "W"), m("switch_0_voltage", 230.1, "V"),
        m("switch_0_current", 0.062, "A"), m("switch_0_energy", 1054.812, "Wh"),
        m("switch_0_temperature", 45.3, "°C")), id="shelly-metering-switch"),
    pytest.param("shelly-ht-full", MappedMessage("shelly", "shellyplusht-08b61fcb7f3c", "shelly", "site1", "1.0", (
        m("temperature_0", 21.8, "°C"), m("humidity_0", 52.3, "%"), m("devicepower_0_battery", 100, "%"),
        m("devicepower_0_battery_voltage", 5.96, "V"), m("wifi_rssi", -58, "dBm")), 1675355018.07),
        id="shelly-ht-full-status"),
    pytest.param("shelly-event", Unmapped(
        "unmapped", "shelly: method is 'NotifyEvent', not one of ['NotifyFullStatus', 'NotifyStatus']"),
        id="shelly-event-is-not-a-status"),
    pytest.param("multi-basic", MappedMessage("multi", "room-3", "air", "site1", "1.0", (
        m("temperature", 21.5, "°C"), m("humidity", 40), m("co2", 612, "ppm")), 1764312000.5, 17),
        id="multi-metric-taxonomy"),
]


@pytest.mark.parametrize(("name", "expected"), CASES)
def test_presets_map_documented_payloads(name: str, expected: MappedMessage | Unmapped) -> None:
    topic, payload = fixture(name)
    assert every_preset().map(topic, payload) == expected


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    pytest.param("zigbee2mqtt/a", b"{not json", Unmapped("invalid_json", ""), id="bad-json"),
    pytest.param("zigbee2mqtt/a", b"[1, 2]", Unmapped("not_an_object", "payload is a JSON list"), id="a-list"),
    pytest.param("zigbee2mqtt/bridge", b'{"state": "online"}',
                 Unmapped("ignored_device", "zigbee2mqtt: 'bridge' is not a device"), id="z2m-bridge"),
    pytest.param("shellyx/events/rpc", b'{"params": {}}',
                 Unmapped("unmapped", "shelly: method is None, not one of ['NotifyFullStatus', 'NotifyStatus']"),
                 id="shelly-without-method"),
])
def test_malformed_messages_are_unmapped_with_a_reason(topic: str, payload: bytes, expected: Unmapped) -> None:
    got = every_preset().map(topic, payload)
    assert isinstance(got, Unmapped)
    assert got.reason == expected.reason
    assert expected.detail in got.detail


@pytest.mark.parametrize("topic", [
    "zigbee2mqtt/kitchen/availability", "zigbee2mqtt/bridge/state", "tele/plug/STATE", "shelly/events/other",
    "telemetry/raw/1.0/site1/air/room-3/temperature", "telemetry/valid/1.0/site1/air/room-3",
])
def test_topics_no_preset_reads(topic: str) -> None:
    assert every_preset().map(topic, b"{}") is None


def test_own_topics_are_never_read_by_a_dialect() -> None:
    config = parse_config({"dialects": [{"name": "all", "topic": "{device_id}/+/+", "metrics": [{"path": "v"}]}]})
    dialects = build_dialects(config.dialects, TEMPLATE, site="s", version="1.0", own=("gw/status/x",))
    assert dialects.map("dev/a/b", b'{"v": 1}') == MappedMessage("all", "dev", "mqtt", "s", "1.0", (m("v", 1),))
    for own in ("cmd/s/dev", "status/s/gw", "gw/status/x"):
        assert dialects.map(own, b'{"v": 1}') is None


def test_custom_dialect_from_config() -> None:
    config = parse_config({"dialects": [
        {"preset": "zigbee2mqtt", "topic": "zb/{device_id}", "units": {"voltage": "mV"}, "exclude": ["linkquality"]},
        {"name": "weather", "topic": "weather/{site}/{device_id}/state", "device_class": "weather",
         "ts": "dt", "metrics": [
             {"path": "main.temp", "metric": "temperature", "unit": "K"},
             {"path": "wind.*", "metric": "wind_{0}"},
             {"path": ["rain", "1h"], "metric": "rain", "unit": "mm"},
             {"path": "state", "values": {"ON": 1, "OFF": 0}},
         ], "match": {"kind": ["report"]}},
        {"name": "esphome", "topic": "{device_id}/sensor/{metric}/state", "units": {"temperature": "°C"}},
    ]})
    dialects = build_dialects(config.dialects, TEMPLATE, site="s1", version="1.0")
    assert dialects.map("zb/door", b'{"voltage": 3000, "linkquality": 9, "contact": false}') == MappedMessage(
        "zigbee2mqtt", "door", "zigbee", "s1", "1.0", (m("voltage", 3000, "mV"), m("contact", 0)))
    weather = (b'{"kind": "report", "dt": 1700000000123, "main": {"temp": 280.1}, "wind": {"speed": 3.5, "deg": 200},'
               b' "rain": {"1h": 0.2}, "state": "ON"}')
    assert dialects.map("weather/north/ws-1/state", weather) == MappedMessage(
        "weather", "ws-1", "weather", "north", "1.0",
        (m("temperature", 280.1, "K"), m("wind_speed", 3.5), m("wind_deg", 200), m("rain", 0.2, "mm"), m("state", 1)),
        1700000000.123)
    assert dialects.map("weather/north/ws-1/state", b'{"kind": "forecast"}') == Unmapped(
        "unmapped", "weather: kind is 'forecast', not one of ['report']")
    # A bare value on a topic per metric (ESPHome's <node>/sensor/<name>/state).
    assert dialects.map("livingroom/sensor/temperature/state", b"21.5") == MappedMessage(
        "esphome", "livingroom", "mqtt", "s1", "1.0", (m("temperature", 21.5, "°C"),))


@pytest.mark.parametrize(("dialects", "problem"), [
    pytest.param([{"topic": "a/{device_id}"}], "a dialect without a preset needs a name and a topic", id="no-name"),
    pytest.param([{"name": "x", "topic": "a/{device}", "metrics": [{"path": "v"}]}], "is not one of", id="bad-field"),
    pytest.param([{"name": "x", "topic": "a/+", "metrics": [{"path": "v"}]}], "needs a {device_id}", id="no-device"),
    pytest.param([{"name": "x", "topic": "a/#/{device_id}"}], "use literals", id="hash"),
    pytest.param([{"name": "x", "topic": "a/{device_id}"}], "needs metric rules", id="no-metrics"),
    pytest.param([{"preset": "multi", "topic": "a/{device_id}"}], "cannot be set", id="multi-topic"),
    pytest.param([{"preset": "shelly"}, {"preset": "shelly", "topic": "x/{device_id}/events/rpc"}],
                 "dialect names must be unique", id="twice"),
    pytest.param([{"preset": "tasmotta"}], "dialects[0].preset", id="unknown-preset"),
])
def test_bad_dialects_are_config_errors(dialects: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"dialects": dialects})
    assert problem in "\n".join(caught.value.problems)


def test_multi_metric_needs_the_metric_last() -> None:
    with pytest.raises(ConfigError, match="ending in"):
        parse_config({"topics": {"template": "t/{stage}/{site}/{metric}/{device_class}/{device_id}"},
                      "dialects": [{"preset": "multi"}]})


async def test_collect_makes_a_draft_per_metric_with_stable_ids() -> None:
    stage = CollectStage(TEMPLATE, {"pm-1": "serial"}, every_preset())
    received = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    messages = [RawMessage(*fixture(name), "mqtt:external", received, new_event_id())
                for name in ("tasmota-am2301", "multi-basic", "shelly-event", "z2m-wsdcgq11lm-last-seen")]
    messages.append(RawMessage("zigbee2mqtt/pm-1", b'{"temperature": 1}', "mqtt:x", received, new_event_id()))
    messages.append(RawMessage("zigbee2mqtt/x", b'{"temperature": 1, "last_seen": "yesterday"}', "mqtt:x", received,
                               new_event_id()))
    emit = Emitter()
    drafts = await stage.process(messages, emit)
    assert [(d.topic, d.value, d.unit, d.event_id) for d in drafts[:5]] == [
        ("telemetry/raw/1.0/site1/tasmota/sonoff_th/temperature", 24.6, "°C",
         derived_event_id(messages[0].event_id, "temperature")),
        ("telemetry/raw/1.0/site1/tasmota/sonoff_th/humidity", 58.2, "%",
         derived_event_id(messages[0].event_id, "humidity")),
        ("telemetry/raw/1.0/site1/air/room-3/temperature", 21.5, "°C",
         derived_event_id(messages[1].event_id, "temperature")),
        ("telemetry/raw/1.0/site1/air/room-3/humidity", 40, None, derived_event_id(messages[1].event_id, "humidity")),
        ("telemetry/raw/1.0/site1/air/room-3/co2", 612, "ppm", derived_event_id(messages[1].event_id, "co2")),
    ]
    room = drafts[2]
    assert (room.seq, room.device_ts, room.transport, room.payload) == (
        17, datetime(2025, 11, 28, 6, 40, 0, 500000, tzinfo=UTC), "mqtt", messages[1].payload)
    assert drafts[5].device_ts == datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
    assert len(drafts) == 11  # 2 + 3 + 0 + 6
    assert stage.stats.rejected == {"unmapped": 1, "device_conflict": 1, "invalid_ts": 1}
    assert [r.topic for r in emit.rejects] == ["shellyplusi4-c4d8d5568e2c/events/rpc", "zigbee2mqtt/pm-1",
                                               "zigbee2mqtt/x"]
    # In-process publishers (drivers) never speak a dialect: a topic outside the taxonomy is unknown.
    emit = Emitter()
    assert await stage.process([RawMessage("zigbee2mqtt/a", b'{"t": 1}', None, received)], emit) == []
    assert emit.rejects[0].reason == "unknown_topic"


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from(["zigbee2mqtt/a", "tele/a/SENSOR", "a/events/rpc", "telemetry/raw/1.0/s/c/d",
                              "x/sensor/t/state"]),
       payload=st.one_of(st.binary(max_size=200), st.recursive(
           st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
               st.sampled_from(["params", "switch:0", "apower", "ENERGY", "Power", "ts", "method", "seq", "units",
                                "temperature", "AM2301", "Temperature", "TempUnit", "last_seen"]), inner, max_size=4),
           max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_mapping_never_raises(topic: str, payload: bytes) -> None:
    dialects = every_preset()
    extra = DialectSet([*dialects.dialects, *build_dialects(parse_config({"dialects": [
        {"name": "bare", "topic": "{device_id}/sensor/{metric}/state"}]}).dialects, TEMPLATE, site="s",
        version="1.0").dialects], site="s", version="1.0")
    result = extra.map(topic, payload)
    assert isinstance(result, MappedMessage | Unmapped)


async def test_multi_metric_json_and_a_preset_on_the_embedded_broker(tmp_path: Path) -> None:
    """End to end on the embedded broker: a device publishing plain multi-metric JSON at device level and a
    Zigbee2MQTT bridge publishing its objects; every metric is stored as its own series, and what cannot
    be read is rejected with its reason."""
    port = free_port()
    config = parse_config({
        "site": "s1", "gateway_id": "gw-d", "broker": {"port": port, "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")}, "pipeline": {"max_latency_s": 0.05},
        "dialects": [{"preset": "multi"}, {"preset": "zigbee2mqtt"}],
    })
    url = f"mqtt://127.0.0.1:{port}"
    async with Gateway(config) as gw:
        watcher = await asyncio.to_thread(MqttCollector, url, ["telemetry/valid/#", "telemetry/rejected/#"],
                                          client_id="dialect-watcher")
        try:
            await asyncio.to_thread(mqtt_publish, url, [
                ("telemetry/raw/1.0/s1/air/room-1", b'{"temperature": 21.5, "humidity": 40, "seq": 1}'),
                ("zigbee2mqtt/kitchen", b'{"temperature": 19.25, "battery": 87, "linkquality": 90}'),
                ("zigbee2mqtt/button", b'{"action": "single"}'),
                ("zigbee2mqtt/kitchen", b"not json"),
            ], client_id="dialect-devices")
            got = await asyncio.to_thread(watcher.wait_for, 7)
        finally:
            watcher.close()
        deadline = asyncio.get_running_loop().time() + 10
        while gw.store.rows_written < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stages = gw.status().stages
    valid = sorted(t for t, *_ in got if t.startswith("telemetry/valid/"))
    assert valid == [
        "telemetry/valid/1.0/s1/air/room-1/humidity", "telemetry/valid/1.0/s1/air/room-1/temperature",
        "telemetry/valid/1.0/s1/zigbee/kitchen/battery", "telemetry/valid/1.0/s1/zigbee/kitchen/linkquality",
        "telemetry/valid/1.0/s1/zigbee/kitchen/temperature",
    ]
    assert stages["collect"].rejected == {"no_metrics": 1, "invalid_json": 1}
    with StoreReader(tmp_path / "gw") as store:
        assert {(d.device_id, d.device_class, d.metrics) for d in store.devices()} == {
            ("room-1", "air", ("humidity", "temperature")),
            ("kitchen", "zigbee", ("battery", "linkquality", "temperature")),
        }
        assert store.series("kitchen", "temperature") is not None
