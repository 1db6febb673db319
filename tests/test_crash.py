"""``kill -9`` of the gateway under load, three times: after each restart, everything that had been
acknowledged to the device reaches the backbone (a real Mosquitto), and an event that arrives twice
arrives with the same event id."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from gatewayproc import Device, RunningGateway, kill_9_under_load, wait_for
from peers import Mosquitto, MqttCollector, free_port, mosquitto_fixture  # noqa: F401  (pytest fixture)


def test_kill_9_under_load_three_times_loses_nothing_acknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    config = tmp_path / "gw.toml"
    config.write_text(
        f'site = "s1"\ngateway_id = "gw-crash"\n[broker]\nport = {port}\nallow_anonymous = true\n'
        f'[storage]\ndata_dir = "{tmp_path / "d"}"\n'
        f'[pipeline]\nmax_latency_s = 0.05\n'
        f'[[forward]]\nname = "central"\ntype = "mqtt"\nurl = "{mosquitto.url}"\ntopics = ["telemetry/valid/#"]\n'
    )
    collector = MqttCollector(mosquitto.url, ["telemetry/valid/#"], client_id="crash-collector")
    gateway = RunningGateway(config, mqtt_port=port)
    load: list[Device] = []
    try:
        load += [Device(port, d, 100, unit=None, reconnect_max_s=1).start() for d in ("k-1", "k-2")]
        acked = kill_9_under_load(gateway, load, kills=3, run_s=2.5, away_s=0.5, settle_s=3, resend_s=3)
        expected = sum(len(a) for a in acked.values())
        assert expected > 500

        def delivered() -> bool:
            got = defaultdict(set)
            for r in collector.messages:
                data = json.loads(r.payload)["data"]
                got[data["device_id"]].add(data["seq"])
            return all(set(acked[d]) <= got[d] for d in acked)

        wait_for(delivered, 90)
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
