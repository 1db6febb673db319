"""Done means: a gateway with one device of each serial protocol (sds011, pms5003, nmea, jsonlines,
kv, modbus) and one MQTT device, all simulated with faults on, stores the right values for every one
and reports every injected fault in its counters (decode errors by reason per driver, clock skew,
disconnects, pipeline rejects for spikes and broken JSON). Also: ``iotgw sim --fleet``."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, Watcher, free_port, until

from firmware_sim.energy_meter import REGISTERS, EnergyMeterSim
from firmware_sim.fleet import Fleet, FleetError, parse_fleet
from firmware_sim.mqtt_sensor import MqttSensorSim
from firmware_sim.serial_sensor import SerialSim
from gateway.app import Gateway
from gateway.config import DEFAULT_METRIC_RULES, parse_config
from pipeline.store import StoreReader

FLEET = """
site = "plant"

[[device]]
kind = "sds011"
id = "pm-1"
[device.faults]
bad_checksum_every = 5
garbage_every = 7
truncate_every = 11
spike_every = 13
stuck_every = 9
burst_every = 17

[[device]]
kind = "pms5003"
id = "pms-1"
[device.faults]
bad_checksum_every = 6
garbage_every = 8
truncate_every = 10
spike_every = 11

[[device]]
kind = "nmea"
id = "gps-1"
[device.faults]
bad_checksum_every = 5
garbage_every = 7
truncate_every = 9
spike_every = 11
clock_drift_s = 0.7

[[device]]
kind = "jsonlines"
id = "js-1"
[device.faults]
garbage_every = 6
truncate_every = 8
spike_every = 10
clock_drift_s = 0.7

[[device]]
kind = "kv"
id = "kv-1"
[device.faults]
stuck_every = 6
unplug_every = 200  # 10 s of frames between outages: a reopen's jittered backoff (up to a few s) loses under half
unplug_for_s = 0.5

[[device]]
kind = "energy_meter"
id = "em-1"
poll_interval_s = 0.05
timeout_s = 1.0
[device.faults]
bad_crc_every = 5
no_reply_every = 7
exception_every = 9
spike_every = 4

[[device]]
kind = "mqtt"
id = "th-1"
interval_s = 0.1
[device.faults]
spike_every = 7
bad_json_every = 9
"""
STREAMS = ("pm-1", "pms-1", "gps-1", "js-1", "kv-1")


def expected_stream_values(sim: SerialSim) -> Counter[tuple[str, float]]:
    """What the store must hold: every reading of every intact frame, except spiked values."""
    return Counter((m, round(v, 6)) for sent in sim.history for m, v in sim.readings(sent) if m != sent.spiked)


# amqtt leaves a closed client connection's transport to the garbage collector (see the end of the test)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
async def test_a_faulty_fleet_of_every_protocol_is_stored_right_and_every_fault_counted(tmp_path: Path) -> None:
    spec = parse_fleet(tomllib.loads(FLEET))
    spec = spec.__class__(tuple(d.__class__(d.kind, d.id, d.link, d.device_class,
                                            {"interval_s": 0.05, **d.options}, d.faults)
                                for d in spec.devices), spec.site)
    data_dir = tmp_path / "gw"
    fleet = Fleet(spec, spec.env(tmp_path / "dev"), paused=True)
    try:
        async with asyncio.timeout(240):  # a hang fails here, with a traceback, instead of at the suite's limit
            await fleet.start_local()
            ranges = {k: {"min": r.min, "max": r.max} for k, r in DEFAULT_METRIC_RULES.items()}
            ranges |= {k: {"min": lo, "max": hi} for k, (lo, hi) in fleet.ranges().items()}
            config = parse_config({
                "site": "plant", "broker": {"port": free_port(), "allow_anonymous": True},
                "storage": {"data_dir": str(data_dir)},
                "pipeline": {"max_latency_s": 0.05, "clean": {"metrics": ranges}},
                "devices": fleet.gateway_devices(),
            })
            async with Gateway(config) as gw:
                drivers = {d.name.split(":", 1)[1]: d for d in gw.devices.drivers}
                await until(lambda: all(d.stats.connected for d in drivers.values()), what="ports open")
                fleet.resume()
                await fleet.start_network(mqtt_port=gw.broker.port)
                sims = fleet.simulators
                streams = {i: sims[i] for i in STREAMS}
                meter, mqtt = sims["em-1"], sims["th-1"]
                assert isinstance(meter, EnergyMeterSim)
                assert isinstance(mqtt, MqttSensorSim)
                await until(lambda: all(s.frames_sent >= 40 for s in streams.values())  # type: ignore[attr-defined]
                            and meter.requests >= 50 and mqtt.seq >= 40 and sims["kv-1"].faults["disconnect"] >= 1,
                            timeout=90, what="enough traffic and one unplug")
                # Quiet the fleet, then let the gateway read and store what is on the wires.
                for sim in streams.values():
                    assert isinstance(sim, SerialSim)
                    sim.sleeping = True
                meter.every = dict.fromkeys(meter.every, 0)
                served = len(meter.history)
                await until(lambda: len(meter.history) >= served + 3, what="clean polls")  # a fault in flight settles
                await fleet.stop("th-1")  # the MQTT device waits for its QoS 1 acknowledgements
                want = {i: expected_stream_values(s) for i, s in streams.items()}  # type: ignore[arg-type]
                await until(lambda: all(drivers[i].stats.readings >= want[i].total() for i in STREAMS if i != "kv-1"),
                            what="the drivers to read every frame sent: " + ", ".join(
                                f"{i} {drivers[i].stats.readings}/{want[i].total()}" for i in STREAMS))
                await until(lambda: gw.store.rows_written >= gw.stats()["stages"]["store"]["in"]
                            and len(gw.queue) == 0, what="the pipeline to drain")
                await until(lambda: drivers["kv-1"].stats.connected, what="kv-1 plugged back in")
                await asyncio.sleep(0.5)
                stats = gw.stats()
    finally:
        async with asyncio.timeout(60):
            await fleet.aclose()
        gc.collect()  # amqtt leaves a closed client's transport to the collector: collect it in this test

    faults = fleet.faults()
    driver_stats = stats["drivers"]
    # Decode errors by reason, per device, exactly as injected.
    for device_id in STREAMS:
        sim = fleet.simulators[device_id]
        assert isinstance(sim, SerialSim)
        expected: Counter[str] = Counter()
        for fault, reason in sim.REASONS.items():
            expected[reason] += faults[device_id][fault]
        assert driver_stats[f"serial:{device_id}"]["errors"] == {k: v for k, v in expected.items() if v}, device_id
        assert driver_stats[f"serial:{device_id}"]["anomalies"].get("clock_skew", 0) == \
            faults[device_id]["clock_drift"], device_id
    for device_id in ("pm-1", "pms-1", "gps-1", "js-1"):
        assert all(faults[device_id][f] for f in ("garbage", "truncated", "spike")), device_id
    assert faults["gps-1"]["clock_drift"]
    assert faults["js-1"]["clock_drift"]
    meter_sim = fleet.simulators["em-1"]
    assert isinstance(meter_sim, EnergyMeterSim)
    assert driver_stats["modbus:em-1"]["errors"] == {
        meter_sim.reasons[f]: n for f, n in faults["em-1"].items() if f in meter_sim.reasons}
    # The unplugged device: every outage counted, no decode error blamed on it.
    assert driver_stats["serial:kv-1"]["disconnects"] == faults["kv-1"]["disconnect"] >= 1
    assert driver_stats["serial:kv-1"]["errors"] == {}
    assert driver_stats["serial:kv-1"]["connected"]
    # Pipeline rejects: every spike out of range, every broken MQTT payload invalid JSON.
    spikes = sum(f["spike"] for f in faults.values())
    assert stats["stages"]["clean"]["rejected"] == {"out_of_range": spikes}
    assert stats["stages"]["collect"]["rejected"] == {"invalid_json": faults["th-1"]["bad_json"]}
    assert faults["th-1"]["spike"]
    assert faults["th-1"]["bad_json"]
    assert faults["pm-1"]["stuck"]

    # Stored values: exactly what the firmware sent intact.
    with StoreReader(data_dir) as store:
        def stored(device_id: str) -> Counter[tuple[str, float]]:
            out: Counter[tuple[str, float]] = Counter()
            for metric in {m for d in store.devices() if d.device_id == device_id for m in d.metrics}:
                series = store.series(device_id, metric)
                assert series is not None
                out.update((metric, round(v, 6)) for _, v in series[1])
            return out

        for device_id in STREAMS:
            sim = fleet.simulators[device_id]
            assert isinstance(sim, SerialSim)
            got, sent = stored(device_id), expected_stream_values(sim)
            if device_id == "kv-1":  # frames sent while its cable was out, or before the port reopened, are lost
                assert got <= sent
                assert got.total() >= sent.total() // 2
            else:
                assert got == sent, device_id
        mqtt_sim = fleet.simulators["th-1"]
        assert isinstance(mqtt_sim, MqttSensorSim)
        assert stored("th-1") == Counter((m, round(v, 6)) for m, v in mqtt_sim.history)
        for reg in REGISTERS:
            name = reg["name"]
            series = store.series("em-1", name)
            assert series is not None
            want_values = [round(h[name], 6) for h in meter_sim.history if name in h and not
                           (name == "voltage" and h[name] > EnergyMeterSim.RANGES["voltage"][1])]
            got_values = [round(v, 6) for _, v in series[1]]
            assert len(want_values) - 1 <= len(got_values) <= len(want_values), name
            assert sorted(got_values) == sorted(want_values[:len(got_values)]) or \
                Counter(got_values) <= Counter(want_values), name


def test_fleet_file_errors_name_the_device() -> None:
    with pytest.raises(FleetError) as info:
        parse_fleet(tomllib.loads("""
            [[device]]
            kind = "toaster"
            id = "t"
            [[device]]
            kind = "kv"
            id = "k"
            [device.faults]
            bad_checksum_every = 3
            [[device]]
            kind = "sds011"
            id = "s"
            [device.faults]
            loudness = 11
        """))
    problems = info.value.problems
    assert problems[0].startswith("device[0].kind: must be one of ")
    assert "energy_meter" in problems[0]
    assert "mqtt" in problems[0]
    assert problems[1] == "device[1] (k): KeyValueSim: the kv format has no 'bad_checksum' fault"
    assert problems[2].startswith("device[2] (s): ")
    assert "loudness" in problems[2]


def test_iotgw_sim_prints_paths_writes_a_gateway_config_and_counts_faults(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text("""
        site = "f1"
        [[device]]
        kind = "sds011"
        id = "pm-1"
        interval_s = 0.05
        [device.faults]
        bad_checksum_every = 2
        [[device]]
        kind = "energy_meter"
        id = "em-1"
    """)
    out_config = tmp_path / "gw.toml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "sim", "--fleet", str(fleet_file), "--dir", str(tmp_path / "dev"),
         "--gateway-config", str(out_config), "--seconds", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    assert str(tmp_path / "dev" / "tty-pm-1") in lines[1]
    assert (tmp_path / "dev" / "tty-pm-1").exists()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "faults injected" in out
    assert "bad_checksum=" in out.split("faults injected")[1]
    checked = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(out_config)], capture_output=True,
                             text=True, cwd=ROOT, check=False)
    assert checked.returncode == 0, checked.stdout
    config = tomllib.loads(out_config.read_text())
    assert [d["protocol"] for d in config["devices"]] == ["sds011", "modbus"]
    assert config["devices"][1]["registers"] == REGISTERS


# amqtt 0.12.1 never closes the server side of a connection that died without a DISCONNECT: its
# transport is garbage-collected unclosed (a ResourceWarning). Collected here, inside this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
async def test_mqtt_device_drops_its_connection_the_broker_sends_its_will_and_it_reconnects(tmp_path: Path) -> None:
    config = parse_config({"site": "plant", "broker": {"port": free_port(), "allow_anonymous": True},
                           "storage": {"data_dir": str(tmp_path)}, "pipeline": {"max_latency_s": 0.05}})
    async with Gateway(config) as gw:
        watcher = await asyncio.to_thread(Watcher, gw.broker.port, ["status/#"])
        try:
            topics = {"temperature": (gw.devices.raw_topic("th-1", "temperature"), "°C", 20.0)}
            async with MqttSensorSim("th-1", "127.0.0.1", gw.broker.port, topics, status_topic="status/plant/th-1",
                                     interval_s=0.05, disconnect_every=10) as sim:
                await until(lambda: sim.faults["disconnect"] >= 1 and sim.seq >= 20, what="a drop and a reconnect")
                await until(lambda: [p for _, p in watcher.messages].count(b"online") >= 2, what="online again")
            statuses = [p for _, p in watcher.messages]
        finally:
            watcher.close()
        await until(lambda: gw.store.rows_written >= len(sim.history), what="every reading stored")
    gc.collect()  # amqtt's leaked transport (see above), while this test's warning filters apply
    first = statuses.index(b"online")
    again = statuses.index(b"online", first + 1)
    assert b"offline" in statuses[first:again]  # the last will, published by the broker when the link died
    assert gw.stats()["stages"]["collect"]["rejected"] == {}
