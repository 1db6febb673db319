"""The whole gateway as a user runs it: ``iotgw demo`` in a subprocess, watched by an independent
MQTT client, then queried through ``iotgw query`` and ``iotgw devices``."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from conftest import GatewayProcess, Watcher, iotgw

from pipeline.store import StoreReader

DEVICES = {"pm-1": "serial", "t-1": "ble", "co2-1": "mqtt"}


def test_demo_stores_and_publishes_readings_from_all_three_transports(
    tmp_path: Path, port: int, gateway_process: type[GatewayProcess]
) -> None:
    gw = gateway_process(["demo", "--seconds", "14", "--data-dir", str(tmp_path), "--mqtt-port", str(port)], port)
    watcher = Watcher(port, ["telemetry/#"])
    out, err = gw.proc.communicate(timeout=90)  # --seconds ends it
    watcher.close()
    assert gw.proc.returncode == 0, err
    assert "Traceback" not in err

    # The independent client saw raw readings and valid CloudEvents from each device.
    topics = watcher.topics()
    for device in DEVICES:
        assert any(t.startswith("telemetry/raw/1.0/demo/") and f"/{device}/" in t for t in topics), device
    valid = watcher.json("telemetry/valid/")
    assert {e["data"]["transport"] for e in valid} == {"serial", "ble", "mqtt"}
    for event in valid:
        assert event["specversion"] == "1.0"
        assert event["type"] == "io.iotgw.telemetry.reading.v1"
        assert len(event["id"]) == 26
        assert event["subject"].startswith("telemetry/valid/1.0/demo/")
    # The injected faults were rejected on the rejected stage, with their reasons.
    reasons = {e["data"]["reason"] for e in watcher.json("telemetry/rejected/")}
    assert {"bad_checksum", "out_of_range"} <= reasons
    assert "  dashboard: http://127.0.0.1:" in out  # 8080, or any free port when 8080 is taken
    assert "bad_checksum=" in out  # driver faults are counted in the driver's line of the summary
    assert "out_of_range=" in out
    stored = int(out.split("stored=")[1].split()[0])
    assert stored > 0

    # What was stored answers queries.
    listed = json.loads(iotgw("devices", "--data-dir", str(tmp_path), "--format", "json", check=True).stdout)
    assert {d["device_id"]: d["transport"] for d in listed} == DEVICES
    for d in listed:
        assert d["last_seen"]
        assert d["metrics"]
    for device, metric in (("pm-1", "pm2_5"), ("t-1", "temperature"), ("co2-1", "co2")):
        points = json.loads(iotgw("query", "--data-dir", str(tmp_path), "--device", device, "--metric", metric,
                                  "--format", "json", check=True).stdout)
        assert len(points) >= 5, (device, metric)
        assert all(set(p) == {"ts", "value"} for p in points)
        assert [p["ts"] for p in points] == sorted(p["ts"] for p in points)
    with StoreReader(tmp_path) as store:
        assert store.count() == stored


def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path, port: int, gateway_process: type[GatewayProcess]) -> None:
    gw = gateway_process(["demo", "--data-dir", str(tmp_path), "--mqtt-port", str(port)], port)
    time.sleep(3)
    rc, out, err = gw.stop(signal.SIGINT)
    assert rc == 0, err
    assert "Traceback" not in err
    stored = int(out.split("stored=")[1].split()[0])
    with StoreReader(tmp_path) as store:
        assert store.count() == stored > 0
