"""Home Assistant MQTT discovery (gateway/homeassistant.py), validated against Home Assistant's documented
schema for MQTT sensors (tests/fixtures/homeassistant/mqtt_sensor.schema.json, transcribed from
home-assistant/core; units and state classes per device class below, from its sensor/const.py).

A real Home Assistant cannot run here (no Home Assistant installation in this environment: it needs its own
Python environment and hundreds of packages); what it would read is checked against its schema instead,
and end to end on a real Mosquitto: the retained configs appear, their state topics carry the values their
template reads, and a device removed from the config has its configs removed."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import Watcher, until
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture, mqtt_publish  # noqa: F401  (fixture)
from test_external import external_config, retained

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.homeassistant import Availability, Series, configured_series, sensor_config
from pipeline.topics import TopicTemplate

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "homeassistant" / "mqtt_sensor.schema.json").read_text())
# homeassistant/components/mqtt/discovery.py: <prefix>/<component>/[<node_id>/]<object_id>/config
TOPIC = re.compile(r"homeassistant/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)"
                   r"/config")
# homeassistant/components/sensor/const.py, DEVICE_CLASS_UNITS and DEVICE_CLASS_STATE_CLASSES, for the classes
# a discovery payload here may carry (transcribed separately from the gateway's own table).
HA_UNITS: dict[str, set[str | None]] = {
    "temperature": {"°C", "°F", "K"}, "humidity": {"%"}, "battery": {"%"}, "moisture": {"%"},
    "pressure": {"cbar", "bar", "hPa", "mmHg", "inHg", "inH₂O", "kPa", "mbar", "Pa", "psi", "mmH₂O"},
    "atmospheric_pressure": {"cbar", "bar", "hPa", "mmHg", "inHg", "inH₂O", "kPa", "mbar", "Pa", "psi", "mmH₂O"},
    "carbon_dioxide": {"ppm"}, "pm25": {"µg/m³"}, "pm10": {"µg/m³"}, "pm1": {"µg/m³"}, "illuminance": {"lx"},
    "power": {"mW", "W", "kW", "MW", "GW", "TW"}, "apparent_power": {"mVA", "VA", "kVA"},
    "reactive_power": {"mvar", "var", "kvar"}, "power_factor": {"%", None},
    "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"},
    "voltage": {"µV", "mV", "V", "kV", "MV"}, "current": {"mA", "A"}, "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "signal_strength": {"dB", "dBm"},
}
HA_STATE_CLASSES = {"energy": {"total", "total_increasing"}}  # every other class above: measurement only


def check(topic: str, config: dict[str, Any]) -> None:
    """What Home Assistant would accept: the schema, the topic, a unit and state class its device class allows."""
    jsonschema.validate(config, SCHEMA)
    assert TOPIC.fullmatch(topic), topic
    assert TOPIC.fullmatch(topic)["component"] == "sensor"  # type: ignore[index]
    cls = config.get("device_class")
    if cls is not None:
        assert config.get("unit_of_measurement") in HA_UNITS[cls], (cls, config.get("unit_of_measurement"))
        assert config["state_class"] in HA_STATE_CLASSES.get(cls, {"measurement"})


def series(metric: str, unit: str | None, device: str = "kitchen", cls: str = "zigbee") -> Series:
    return Series("s1", cls, device, metric, unit, "mqtt")


@pytest.mark.parametrize(("item", "device_class", "state_class"), [
    pytest.param(series("temperature", "°C"), "temperature", "measurement", id="temperature"),
    pytest.param(series("temperature_ds18b20-1", "°F"), "temperature", "measurement", id="tasmota-two-sensors"),
    pytest.param(series("humidity_0", "%"), "humidity", "measurement", id="shelly-humidity"),
    pytest.param(series("battery", "%"), "battery", "measurement", id="battery"),
    pytest.param(series("linkquality", "lqi"), None, "measurement", id="no-class-for-link-quality"),
    pytest.param(series("voltage", None), None, "measurement", id="voltage-without-unit"),
    pytest.param(series("devicepower_0_battery_voltage", "V"), "voltage", "measurement", id="battery-voltage"),
    pytest.param(series("switch_0_power", "W"), "power", "measurement", id="shelly-power"),
    pytest.param(series("switch_0_energy", "Wh"), "energy", "total_increasing", id="energy-is-a-total"),
    pytest.param(series("apparent_power", "VA"), "apparent_power", "measurement", id="apparent-power"),
    pytest.param(series("power_factor", None), "power_factor", "measurement", id="power-factor"),
    pytest.param(series("pm2_5", "µg/m³", "pm-1", "particulate"), "pm25", "measurement", id="pm2_5"),
    pytest.param(series("co2", "ppm", "co2-1", "air"), "carbon_dioxide", "measurement", id="co2"),
    pytest.param(series("pressure", "hPa"), "pressure", "measurement", id="pressure"),
    pytest.param(series("wifi_rssi", "dBm"), "signal_strength", "measurement", id="rssi"),
    pytest.param(series("temperature", "degC"), None, "measurement", id="unit-home-assistant-refuses"),
    pytest.param(series("co2", "%"), None, "measurement", id="co2-in-percent-is-no-carbon-dioxide-class"),
])
def test_sensor_configs_follow_home_assistants_schema(
    item: Series, device_class: str | None, state_class: str
) -> None:
    topic, config = sensor_config(item, gateway_id="gw.1", template=TopicTemplate(), version="1.0",
                                  prefix="homeassistant", availability=Availability("status/s1/gw.1"))
    check(topic, config)
    assert (config.get("device_class"), config["state_class"]) == (device_class, state_class)
    assert config["unit_of_measurement" if item.unit else "state_topic"] == (
        item.unit or f"telemetry/valid/1.0/s1/{item.device_class}/{item.device_id}/{item.metric}")


def test_a_whole_config() -> None:
    topic, config = sensor_config(series("temperature", "°C"), gateway_id="gw-1", template=TopicTemplate(),
                                  version="1.0", prefix="homeassistant",
                                  availability=Availability("status/s1/gw-1", "up", "down"))
    assert topic == "homeassistant/sensor/iotgw_gw-1/kitchen_temperature/config"
    assert config == {
        "name": "temperature", "unique_id": "iotgw_gw-1_kitchen_temperature", "object_id": "kitchen_temperature",
        "state_topic": "telemetry/valid/1.0/s1/zigbee/kitchen/temperature",
        "value_template": "{{ value_json.data.value }}",
        "availability": [{"topic": "status/s1/gw-1", "payload_available": "up", "payload_not_available": "down"}],
        "device": {"identifiers": ["iotgw_s1_kitchen"], "name": "kitchen", "manufacturer": "iotgw",
                   "model": "zigbee (mqtt)"},
        "origin": {"name": "iotgw", "sw_version": "0.1.0"},
        "unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
    }


def test_configured_devices_declare_their_metrics_or_wait_for_a_reading() -> None:
    """A Modbus device's registers and a GATT sensor's metric are announced before they report; devices
    whose metrics the config does not name (a serial protocol's, BTHome's, an MQTT device's) are not."""
    config = parse_config({"site": "s1", "devices": [
        {"id": "em-1", "transport": "serial", "port": "/dev/ttyUSB0", "protocol": "modbus", "device_class": "meter",
         "registers": [{"name": "voltage", "address": 0, "unit": "V"}, {"name": "energy", "address": 2}]},
        {"id": "g-1", "transport": "ble", "address": "A4:C1:38:00:00:01", "protocol": "gatt",
         "characteristic": "2a6e", "metric": "temperature", "unit": "°C"},
        {"id": "pm-1", "transport": "serial", "port": "/dev/ttyUSB1", "protocol": "sds011"},
        {"id": "t-1", "transport": "ble", "address": "A4:C1:38:00:00:02", "protocol": "bthome"},
        {"id": "kitchen", "transport": "mqtt"},
    ]})
    assert configured_series(config) == [
        Series("s1", "meter", "em-1", "voltage", "V", "serial"),
        Series("s1", "meter", "em-1", "energy", None, "serial"),
        Series("s1", "environment", "g-1", "temperature", "°C", "ble"),
    ]


def value_json_data_value(template: str, payload: bytes) -> object:
    """``{{ value_json.data.value }}``, as Home Assistant renders it on a state message."""
    assert template == "{{ value_json.data.value }}"
    return json.loads(payload)["data"]["value"]


async def test_discovery_on_the_site_broker_and_removal(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = external_config(
        tmp_path, mosquitto, dialects=[{"preset": "zigbee2mqtt"}],
        devices=[{"id": "kitchen", "transport": "mqtt"}, {"id": "hall", "transport": "mqtt"}],
        homeassistant={"discovery": True, "interval_s": 0.2},
    )
    url = mosquitto.url
    async with Gateway(config) as gw:
        await asyncio.to_thread(mqtt_publish, url, [
            ("zigbee2mqtt/kitchen", b'{"temperature": 19.5, "humidity": 41, "linkquality": 90}'),
            ("zigbee2mqtt/hall", b'{"occupancy": true}'),
        ])
        await until(lambda: gw.homeassistant is not None and gw.homeassistant.published >= 4, 10, "4 configs")
        with MqttCollector(url, ["homeassistant/#", "telemetry/valid/#"], client_id="ha-like") as ha:
            got = await asyncio.to_thread(ha.wait_for, 4, 10)
            configs = {m.topic: json.loads(m.payload) for m in got if m.topic.startswith("homeassistant/")}
            assert sorted(configs) == [
                "homeassistant/sensor/iotgw_gw-x/hall_occupancy/config",
                "homeassistant/sensor/iotgw_gw-x/kitchen_humidity/config",
                "homeassistant/sensor/iotgw_gw-x/kitchen_linkquality/config",
                "homeassistant/sensor/iotgw_gw-x/kitchen_temperature/config",
            ]
            for topic, payload in configs.items():
                check(topic, payload)
            temperature = configs["homeassistant/sensor/iotgw_gw-x/kitchen_temperature/config"]
            assert temperature["availability"][0]["topic"] == "status/s1/gw-x"
            assert await asyncio.to_thread(retained, url, "status/s1/gw-x") == b"online"
            # A new reading reaches the state topic Home Assistant subscribed to, and its template reads it.
            await asyncio.to_thread(mqtt_publish, url, [("zigbee2mqtt/kitchen", b'{"temperature": 20.25}')])
            deadline = time.monotonic() + 10
            while not (states := [m for m in ha.messages if m.topic == temperature["state_topic"]]):
                assert time.monotonic() < deadline, "no state on the state topic"
                await asyncio.sleep(0.05)
            assert value_json_data_value(temperature["value_template"], states[-1].payload) == 20.25
        # The hall is removed from the config: its config goes (an empty retained message), the kitchen's stay.
        await gw.reload(config.model_copy(update={"devices": config.devices[:1]}))
        hall = "homeassistant/sensor/iotgw_gw-x/hall_occupancy/config"
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(retained, url, hall) is not None:
            assert time.monotonic() < deadline, "the removed device's config is still retained"
        kitchen = "homeassistant/sensor/iotgw_gw-x/kitchen_temperature/config"
        assert await asyncio.to_thread(retained, url, kitchen) is not None
    # Across a restart: the hall stays removed, and nothing is published again for it.
    async with Gateway(config.model_copy(update={"devices": config.devices[:1]})) as gw:
        await until(lambda: gw.homeassistant is not None and gw.homeassistant.published >= 3, 10, "republished")
        assert await asyncio.to_thread(retained, url, hall) is None


async def test_discovery_on_the_embedded_broker(tmp_path: Path) -> None:
    """The default mode: a Home Assistant connecting to the gateway's own broker (paho, as Home Assistant's
    MQTT integration is) gets a retained config for every series, the reported one and the configured
    Modbus registers that have not reported yet, and the gateway's retained status: ``online`` while it
    runs, ``offline`` once it stops cleanly."""
    port = free_port()
    config = parse_config({
        "site": "s1", "gateway_id": "gw-e", "broker": {"port": port, "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")}, "pipeline": {"max_latency_s": 0.05},
        "homeassistant": {"discovery": True, "interval_s": 0.2},
        "devices": [
            {"id": "kitchen", "transport": "mqtt", "device_class": "zigbee"},
            {"id": "em-1", "transport": "serial", "port": str(tmp_path / "ttyNone"), "protocol": "modbus",
             "device_class": "meter", "registers": [{"name": "voltage", "address": 0, "unit": "V"},
                                                    {"name": "power", "address": 1, "unit": "W"}]},
        ],
    })
    url = f"mqtt://127.0.0.1:{port}"
    status = "status/s1/gw-e"
    ha: Watcher | None = None
    try:
        async with Gateway(config) as gw:
            await asyncio.to_thread(mqtt_publish, url, [
                ("telemetry/raw/1.0/s1/zigbee/kitchen/temperature", b'{"value": 19.5, "unit": "\\u00b0C"}')])
            await until(lambda: gw.homeassistant is not None and gw.homeassistant.published >= 3, 10, "3 configs")
            ha = watcher = await asyncio.to_thread(Watcher, port, ["homeassistant/#", status, "telemetry/valid/#"])
            await until(lambda: len(watcher.json("homeassistant/")) >= 3 and status in watcher.topics(), 10,
                        "the retained configs and status")
            configs = {t: json.loads(p) for t, p in watcher.messages if t.startswith("homeassistant/")}
            assert sorted(configs) == [
                "homeassistant/sensor/iotgw_gw-e/em-1_power/config",
                "homeassistant/sensor/iotgw_gw-e/em-1_voltage/config",
                "homeassistant/sensor/iotgw_gw-e/kitchen_temperature/config",
            ]
            for topic, payload in configs.items():
                check(topic, payload)
                assert payload["availability"] == [
                    {"topic": status, "payload_available": "online", "payload_not_available": "offline"}]
            assert configs["homeassistant/sensor/iotgw_gw-e/em-1_power/config"]["device_class"] == "power"
            assert [p for t, p in watcher.messages if t == status] == [b"online"]
            # A new reading reaches the state topic Home Assistant subscribed to, and its template reads it.
            temperature = configs["homeassistant/sensor/iotgw_gw-e/kitchen_temperature/config"]
            await asyncio.to_thread(mqtt_publish, url, [
                ("telemetry/raw/1.0/s1/zigbee/kitchen/temperature", b'{"value": 20.25, "unit": "\\u00b0C"}')])
            await until(lambda: temperature["state_topic"] in watcher.topics(), 10, "a state on the state topic")
            state = [p for t, p in watcher.messages if t == temperature["state_topic"]][-1]
            assert value_json_data_value(temperature["value_template"], state) == 20.25
        # The gateway stopped cleanly: Home Assistant, connected until the broker closed, was told.
        assert [p for t, p in ha.messages if t == status] == [b"online", b"offline"]
    finally:
        if ha is not None:
            ha.close()
    # Across a restart: the configs are still retained (sessions.sqlite3), the status is online again.
    async with Gateway(config):
        again = await asyncio.to_thread(Watcher, port, ["homeassistant/#", status])
        try:
            await until(lambda: len(again.json("homeassistant/")) >= 3 and status in again.topics(), 10, "retained")
            assert [p for t, p in again.messages if t == status] == [b"online"]
        finally:
            again.close()


async def test_a_config_the_embedded_broker_cannot_retain_is_not_counted_as_published(tmp_path: Path) -> None:
    """At the bound of retained messages (here 2: the status and one config), the second config is refused:
    discovery does not take it as published, and tries again at its next pass."""
    config = parse_config({
        "site": "s1", "gateway_id": "gw-b", "broker": {"port": free_port(), "max_retained_messages": 2},
        "storage": {"data_dir": str(tmp_path / "gw")}, "homeassistant": {"discovery": True, "interval_s": 0.1},
        "devices": [{"id": "em-1", "transport": "serial", "port": str(tmp_path / "ttyNone"), "protocol": "modbus",
                     "registers": [{"name": "voltage", "address": 0, "unit": "V"},
                                   {"name": "power", "address": 1, "unit": "W"}]}],
    })
    async with Gateway(config) as gw:
        await until(lambda: gw.stats()["broker"]["limits"]["retained_refused"] >= 3, 10, "refusals at each pass")
        assert gw.homeassistant is not None
        assert gw.homeassistant.published == 1
        assert gw.stats()["broker"]["retained"]["messages"] == 2
