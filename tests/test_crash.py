"""``kill -9`` of the gateway under load, three times: after each restart, everything that had been
acknowledged to the device reaches the backbone (a real Mosquitto), and an event that arrives twice
arrives with the same event id."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from conftest import wait_for
from gatewayproc import Device, RunningGateway, crash_config, crash_load, kill_9_under_load
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture  # noqa: F401  (pytest fixture)


def test_kill_9_under_load_three_times_loses_nothing_acknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    config = crash_config(tmp_path / "gw.toml", port,
                          f'name = "central"\ntype = "mqtt"\nurl = "{mosquitto.url}"\ntopics = ["telemetry/valid/#"]\n')
    collector = MqttCollector(mosquitto.url, ["telemetry/valid/#"], client_id="crash-collector")
    gateway = RunningGateway(config, mqtt_port=port)
    load: list[Device] = []
    try:
        load += crash_load(port)
        acked = kill_9_under_load(gateway, load, kills=3, run_s=2.5, away_s=0.5, settle_s=3, resend_s=3)
        expected = sum(len(a) for a in acked.values())
        assert expected > 500

        def delivered() -> bool:
            got = defaultdict(set)
            for r in collector.messages:
                data = json.loads(r.payload)["data"]
                got[data["device_id"]].add(data["seq"])
            return all(set(acked[d]) <= got[d] for d in acked)

        wait_for(delivered, 90, interval=0.5, fail=False)
    finally:
        for d in load:
            d.close()
        gateway.stop(30)
        collector.close()

    ids_by_seq: dict[tuple[str, int], set[str]] = defaultdict(set)
    for r in collector.messages:
        event = json.loads(r.payload)
        ids_by_seq[(event["data"]["device_id"], event["data"]["seq"])].add(event["id"])
    for device, seqs in acked.items():
        missing = [s for s in seqs if (device, s) not in ids_by_seq]
        assert not missing, f"{device}: {len(missing)} acknowledged readings never reached the backbone: {missing[:10]}"
    twice = {key: ids for key, ids in ids_by_seq.items() if len(ids) > 1}
    assert not twice, f"the same reading under different event ids: {list(twice.items())[:5]}"
