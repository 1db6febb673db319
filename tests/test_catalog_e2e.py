"""The catalog learning from real traffic: ``iotgw run`` with declared types, a real MQTT publisher and a
real subscriber (paho), and ``iotgw catalog`` reading what the gateway learned while and after it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from conftest import GatewayProcess, iotgw
from peers import MqttCollector, mqtt_publish

TEMPERATURE_V1 = "com.example.environment.temperature.v1"
CONFIG = """\
site = "plant"
gateway_id = "gw-e2e"
[broker]
allow_anonymous = true
[storage]
data_dir = "{data_dir}"
[catalog]
flush_interval_s = 0.5
[[catalog.types]]
name = "{name}"
version = "1.0"
metric = "temperature"
device_classes = ["environment"]
value = {{ unit = "°C", minimum = -40, maximum = 85 }}
[[catalog.types]]
name = "{name}"
version = "1.1"
metric = "temperature"
device_classes = ["environment"]
value = {{ unit = "°C", minimum = -40, maximum = 85 }}
fields.accuracy = {{ type = "number", unit = "°C" }}
"""


def catalog_json(config: Path) -> dict[str, dict[str, Any]]:
    done = iotgw("catalog", "--config", str(config), "--format", "json")
    assert done.returncode == 0, done.stderr
    return {r["key"]: r for r in json.loads(done.stdout)}


def wait_for_catalog(config: Path, ready: Any, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = catalog_json(config)
        if ready(records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"the catalog did not learn the traffic within {timeout} s: {records}")
        time.sleep(0.3)


def clients(rows: list[dict[str, Any]]) -> set[str]:
    return {row["client"] for row in rows}


def test_the_catalog_learns_producers_and_consumers_from_a_running_gateway(
    tmp_path: Path, port: int, gateway_process: type[GatewayProcess]
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(CONFIG.format(data_dir=tmp_path / "data", name=TEMPERATURE_V1), encoding="utf-8")
    url = f"mqtt://127.0.0.1:{port}"
    gw = gateway_process(["run", "--config", str(config), "--mqtt-port", str(port)], port)
    v10, v11 = f"{TEMPERATURE_V1}@1.0", f"{TEMPERATURE_V1}@1.1"
    rejected = "io.iotgw.telemetry.rejected.v1@1.0"
    with MqttCollector(url, ["telemetry/valid/#", "telemetry/rejected/#"], client_id="dashboard-e2e") as dashboard:
        mqtt_publish(url, [
            ("telemetry/raw/1.0/plant/environment/t-1/temperature", json.dumps({"value": 21.5})),
            ("telemetry/raw/1.1/plant/environment/t-1/temperature", json.dumps({"value": 21.7, "accuracy": 0.2})),
            ("telemetry/raw/1.0/plant/environment/t-1/temperature", json.dumps({"value": 100})),  # > declared 85
        ], client_id="sensor-e2e")
        messages = dashboard.wait_for(3, timeout=30)
        events = {m.topic: json.loads(m.payload) for m in messages}
        valid = events["telemetry/valid/1.1/plant/environment/t-1/temperature"]
        assert (valid["type"], valid["data"]["accuracy"], valid["data"]["unit"]) == (TEMPERATURE_V1, 0.2, "°C")
        reject = events["telemetry/rejected/1.0/plant/environment/t-1/temperature"]["data"]
        assert reject["reason"] == "invalid_event"
        assert "less than or equal to 85" in reject["detail"]

        # while the gateway runs: the publisher produces both versions, the dashboard consumes them
        records = wait_for_catalog(config, lambda r: (
            "mqtt:sensor-e2e" in clients(r[v11]["producers"])
            and "mqtt:dashboard-e2e" in clients(r[v10]["consumers"])
            and r[rejected]["producers"]
        ))
        assert [(p["client"], p["messages"]) for p in records[v10]["producers"]] == [("mqtt:sensor-e2e", 2)]
        assert [(c["client"], c["filter"], c["active"]) for c in records[v11]["consumers"]] == [
            ("mqtt:dashboard-e2e", "telemetry/valid/#", True)]
        assert clients(records[rejected]["producers"]) == {"gateway:gw-e2e"}
        assert [c["filter"] for c in records[rejected]["consumers"]] == ["telemetry/rejected/#"]
        assert records["io.iotgw.alert.raised.v1@1.0"]["consumers"] == []

    code, _, err = gw.stop()
    assert code == 0, err
    # after the gateway stopped: still there, the subscriptions marked as ended
    after = catalog_json(config)
    assert [p["messages"] for p in after[v10]["producers"]] == [2]
    assert [(c["client"], c["active"]) for c in after[v11]["consumers"]] == [("mqtt:dashboard-e2e", False)]
    document = iotgw("catalog", "--config", str(config), "--format", "asyncapi")
    channel = json.loads(document.stdout)["channels"][f"{TEMPERATURE_V1}_1.1"]
    assert [p["client"] for p in channel["x-iotgw-producers"]] == ["mqtt:sensor-e2e"]
