"""A threshold rule raises and clears an alert end to end: ``iotgw run`` in a subprocess, an MQTT
device (paho) publishing values over the threshold and back, an independent paho subscriber watching
``alert/#``, and the store's list of alerts read while the gateway runs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from conftest import GatewayProcess, Watcher
from peers import mqtt_publish

from pipeline.store import StoreReader

TOPIC = "telemetry/raw/1.0/s1/heating/boiler-1/temperature"


def _wait(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_threshold_rule_raises_and_clears_an_alert(
    tmp_path: Path, port: int, gateway_process: type[GatewayProcess]
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "gw.toml"
    config.write_text(
        f'site = "s1"\n[broker]\nport = {port}\nallow_anonymous = true\n[storage]\ndata_dir = "{data}"\n'
        "[pipeline]\nmax_latency_s = 0.05\n"
        '[[rules]]\nname = "boiler-hot"\nkind = "threshold"\ndevice_class = "heat*"\nmetric = "temperature"\n'
        'high = 80.0\nclear_below = 70.0\nseverity = "critical"\n'
        '[[rules]]\nname = "never"\nkind = "threshold"\nmetric = "humidity"\nhigh = 1.0\n'
    )
    gw = gateway_process(["run", "--config", str(config)], port)
    watcher = Watcher(port, ["alert/#"])
    try:
        url = f"mqtt://127.0.0.1:{port}"
        # 79 and 75 sit inside the hysteresis band: neither raise nor clear
        mqtt_publish(url, [(TOPIC, json.dumps({"value": v, "unit": "C"})) for v in (60.0, 79.0, 85.5, 90.0, 75.0)],
                     client_id="boiler-1")
        _wait(lambda: watcher.json("alert/raised/"), "alert/raised")
        mqtt_publish(url, [(TOPIC, json.dumps({"value": v, "unit": "C"})) for v in (69.0, 65.0)],
                     client_id="boiler-1")
        _wait(lambda: watcher.json("alert/cleared/"), "alert/cleared")

        def listed() -> bool:
            with StoreReader(data) as reader:
                return any(not a.active for a in reader.alerts())

        _wait(listed, "the store to list the cleared alert")
        with StoreReader(data) as reader:
            [alert] = reader.alerts()
    finally:
        watcher.close()
        rc, _, err = gw.stop(signal.SIGTERM)
    assert rc == 0, err
    assert "Traceback" not in err

    raised, cleared = watcher.json("alert/raised/"), watcher.json("alert/cleared/")
    assert [t for t in watcher.topics() if t.startswith("alert/")] == [
        "alert/raised/1.0/s1/heating/boiler-1/temperature",
        "alert/cleared/1.0/s1/heating/boiler-1/temperature",
    ]
    assert raised[0]["type"] == "io.iotgw.alert.raised.v1"
    assert cleared[0]["type"] == "io.iotgw.alert.cleared.v1"
    assert {k: v for k, v in raised[0]["data"].items() if k != "raised_at"} == {
        "rule": "boiler-hot", "kind": "threshold", "device_id": "boiler-1", "metric": "temperature",
        "severity": "critical", "value": 85.5, "message": "boiler-hot: boiler-1/temperature 85.5 > 80",
    }
    assert cleared[0]["data"]["value"] == 69.0
    assert cleared[0]["data"]["raised_at"] == raised[0]["data"]["raised_at"]
    assert (alert.rule, alert.severity, alert.value, alert.clear_value) == ("boiler-hot", "critical", 85.5, 69.0)
    assert alert.event_id == raised[0]["id"]
    assert alert.cleared_at_ms is not None
    assert alert.cleared_at_ms >= alert.raised_at_ms
