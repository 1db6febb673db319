"""External broker mode as users run it (``iotgw run`` processes) beside a real Mosquitto: ``kill -9`` of
the gateway under QoS 1 load loses nothing Mosquitto acknowledged to the devices, and two gateways on one
shared subscription store every message exactly once between them."""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from pathlib import Path

from conftest import wait_for
from gatewayproc import Device, RunningGateway, kill_9_under_load
from peers import Mosquitto, free_port, mosquitto_fixture  # noqa: F401  (pytest fixture)


def write_config(path: Path, mosquitto: Mosquitto, *, gateway_id: str, http_port: int, extra: str = "") -> Path:
    path.write_text(
        f'site = "s1"\ngateway_id = "{gateway_id}"\n'
        f'[storage]\ndata_dir = "{path.parent / gateway_id}"\n'
        f'[pipeline]\nmax_latency_s = 0.05\n'
        f'[http]\nenabled = true\nport = {http_port}\n'
        f'[broker]\nmode = "external"\n[broker.external]\nurl = "{mosquitto.url}"\n{extra}'
    )
    return path


def running(config: Path, http_port: int) -> RunningGateway:
    """``iotgw run``, ready once ``/readyz`` answers 200 (connected and subscribed); its log beside its config."""
    return RunningGateway(config, http_port=http_port, log=config.with_suffix(".log"))


def publisher(port: int, device: str, rate_hz: float) -> Device:
    """A device on the site's broker: QoS 1, sequence numbers and device time."""
    return Device(port, device, rate_hz, unit=None, stamped=True, max_inflight=100).start()


def stored(data_dir: Path) -> dict[str, dict[int, set[str]]]:
    """device -> seq -> the event ids it is stored under (read while the gateway may be writing)."""
    out: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    path = data_dir / "iotgw.sqlite3"
    if not path.exists():
        return out
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        for device, seq, event_id in db.execute(
            "SELECT s.device_id, r.seq, r.event_id FROM readings r JOIN series s USING (series_id)"
        ):
            out[device][seq].add(event_id)
    return out


def test_kill_9_under_load_twice_loses_nothing_the_broker_acknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    http_port = free_port()
    config = write_config(tmp_path / "gw.toml", mosquitto, gateway_id="gw-k", http_port=http_port)
    gateway = running(config, http_port)
    devices = [publisher(mosquitto.port, d, 150) for d in ("k-1", "k-2")]
    try:
        # Killed mid-stream: deliveries in the inbox, in the journal, acknowledged or not; Mosquitto keeps
        # queueing for the persistent session while the gateway is away.
        acked = {name: set(seqs) for name, seqs in kill_9_under_load(
            gateway, devices, kills=2, run_s=2.5, away_s=1.0, settle_s=2, resend_s=0).items()}
        assert sum(map(len, acked.values())) > 800
        wait_for(lambda: all(seqs <= stored(tmp_path / "gw-k")[name].keys() for name, seqs in acked.items()),
                 60, interval=0.5, fail=False)
        assert gateway.stop() == 0
    finally:
        for device in devices:
            device.close()
        gateway.close()
    got = stored(tmp_path / "gw-k")
    for name, seqs in acked.items():
        missing = sorted(seqs - got[name].keys())
        assert not missing, f"{name}: {len(missing)} readings Mosquitto acknowledged were lost: {missing[:10]}"
    twice = {(d, s): ids for d, by_seq in got.items() for s, ids in by_seq.items() if len(ids) > 1}
    assert not twice, f"the same reading under different event ids: {list(twice.items())[:5]}"
    log = config.with_suffix(".log").read_text()
    assert log.count("replaying") >= 1, "a kill should have left messages in the journal to replay"


def test_two_shared_subscription_workers_store_every_message_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    workers = []
    for name in ("w-1", "w-2"):
        http_port = free_port()
        config = write_config(tmp_path / f"{name}.toml", mosquitto, gateway_id=name, http_port=http_port,
                              extra='shared_group = "iotgw"\n')
        workers.append(running(config, http_port))
    devices = [publisher(mosquitto.port, d, 300) for d in ("s-1", "s-2")]
    try:
        time.sleep(4)
        for device in devices:
            device.stop()
        acked = {d.device_id: set(d.acked()) for d in devices}
        sent = {d.device_id: {seq for seq, _ in d.sent} for d in devices}
        wait_for(lambda: sum(len(by_seq) for name in ("w-1", "w-2") for by_seq in stored(tmp_path / name).values())
                 >= sum(map(len, sent.values())), 60,
                 interval=0.5, fail=False)
        assert [w.stop() for w in workers] == [0, 0]
    finally:
        for device in devices:
            device.close()
        for worker in workers:
            worker.close()
    per_worker = [stored(tmp_path / name) for name in ("w-1", "w-2")]
    for name, seqs in sent.items():
        first, second = (set(got[name]) for got in per_worker)
        assert first, f"{name}: the second worker took everything"
        assert second, f"{name}: the first worker took everything"
        assert not first & second, f"{name}: stored by both workers: {sorted(first & second)[:10]}"
        assert acked[name] <= first | second, f"{name}: {sorted(acked[name] - (first | second))[:10]} lost"
        assert first | second == seqs
