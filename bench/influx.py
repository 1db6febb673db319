"""Points per second from the gateway's durable outbox to an InfluxDB v2 write API (VictoriaMetrics on
loopback), beside a bare influxdb-client writing the same points in the same batches, in the same run.

    .venv/bin/python bench/influx.py [--events 50000] [--rounds 3] [--batch 5000]

Gateway: a backlog of reading CloudEvents in the outbox (as after an outage) drained by the forwarder
to an ``influxdb`` destination: read from SQLite, decode JSON, map to a point, line protocol, gzip,
``POST /api/v2/write``, delete durably. Bare client: influxdb-client's synchronous write API (gzip)
given the same points as ``Point`` objects in the same batches. Both wait for each write's answer.
Also printed: building the line protocol with influxdb-client's ``Point`` against
:func:`gateway.forward.influxdb.line_protocol` (the same bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peers import VictoriaMetrics

from gateway.forward.base import InboundMessage
from gateway.forward.forwarder import Forwarder, Route
from gateway.forward.influxdb.destination import (
    InfluxDestination,
    InfluxMapping,
    InfluxSettings,
    PointSpec,
    client_point,
    event_point,
    line_protocol,
)
from gateway.forward.outbox import Limits, Outbox
from pipeline.model import Reading, new_event_id, utc_from_ms
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate, compile_filter

TOPIC = "telemetry/valid/1.0/bench/environment/t-{d}/temperature"
TEMPLATE = TopicTemplate(DEFAULT_TEMPLATE)
MAPPING = InfluxMapping(gateway="bench")
Event = tuple[str, str, str, bytes]  # event id, topic, device, CloudEvent payload


def make_events(count: int, start_ms: int) -> list[Event]:
    """Reading CloudEvents as the define stage publishes them (~560 bytes), 8 devices, 1 ms apart."""
    events = []
    for i in range(count):
        device = f"t-{i % 8}"
        reading = Reading(
            id=new_event_id(), site="bench", device_id=device, device_class="environment", transport="mqtt",
            metric="temperature", value=20 + (i % 1000) / 100, unit="C", device_ts=utc_from_ms(start_ms + i),
            received_at=utc_from_ms(start_ms + i + 3), seq=i,
        )
        topic = TOPIC.format(d=i % 8)
        events.append((reading.id, topic, device, json.dumps(reading.to_cloudevent(topic)).encode()))
    return events


def specs(events: list[Event]) -> list[PointSpec]:
    return [event_point(payload, topic, TEMPLATE, MAPPING, aggregates=False) for _, topic, _, payload in events]


def bare_client(url: str, points: list[Point], batch: int) -> float:
    token = "t"  # noqa: S105  (VictoriaMetrics checks no token)
    with InfluxDBClient(url=url, token=token, org="o", enable_gzip=True) as client:
        api = client.write_api(write_options=SYNCHRONOUS)
        start = time.perf_counter()
        for i in range(0, len(points), batch):
            api.write("b", "o", points[i: i + batch], write_precision="ms")
        return len(points) / (time.perf_counter() - start)


async def _noop_inbound(name: str, message: InboundMessage) -> None:
    return None


async def gateway_forward(url: str, events: list[Event], batch: int) -> float:
    destination = InfluxDestination("tsdb", InfluxSettings(
        url=url, bucket="b", org="o", token="t", mapping=MAPPING, template=TEMPLATE,  # noqa: S106 (no auth here)
    ))
    with tempfile.TemporaryDirectory() as tmp:
        limits = {destination.name: Limits(1 << 30, "refuse")}
        outbox = Outbox(Path(tmp), limits)
        await outbox.open()
        for event_id, topic, device, payload in events:
            await outbox.enqueue(destination.name, event_id, topic, device, payload)
        await outbox.close()
        route = Route(destination, (compile_filter("telemetry/#"),), limits[destination.name], batch_size=batch)
        forwarder = Forwarder(Path(tmp), [route], gateway_id="bench", on_inbound=_noop_inbound,
                              on_drop=lambda *_: None)
        async with forwarder:
            while not destination.connected:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            while forwarder.outbox.stats[destination.name].depth:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - start
        if destination.stats.points_written != len(events):
            raise SystemExit(f"gateway wrote {destination.stats.points_written} of {len(events)} points")
        return len(events) / elapsed


def encode_rates(events: list[Event]) -> tuple[float, float]:
    points = specs(events)
    start = time.perf_counter()
    for spec in points:
        client_point(spec).to_line_protocol()  # type: ignore[no-untyped-call]
    client_rate = len(points) / (time.perf_counter() - start)
    start = time.perf_counter()
    for spec in points:
        line_protocol(spec, "ms")
    return client_rate, len(points) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"client": [], "gateway": []}
    base_ms = (int(time.time()) - 86_400) * 1000  # a day ago: every round writes its own timestamps
    with tempfile.TemporaryDirectory() as tmp, VictoriaMetrics(Path(tmp) / "vm") as server:
        for round_no in range(args.rounds):
            offset = base_ms + 2 * round_no * args.events
            points = [client_point(s) for s in specs(make_events(args.events, offset))]
            results["client"].append(bare_client(server.url, points, args.batch))
            events = make_events(args.events, offset + args.events)
            results["gateway"].append(asyncio.run(gateway_forward(server.url, events, args.batch)))
            print(f"round {round_no + 1}: " + "  ".join(f"{k} {v[-1]:8.0f} points/s" for k, v in results.items()),
                  flush=True)
        exported = sum(len(s.values) for s in server.export('{__name__="environment_temperature"}'))
        if exported != 2 * args.rounds * args.events:
            raise SystemExit(f"VictoriaMetrics holds {exported} points, expected {2 * args.rounds * args.events}")
        client_enc, ours_enc = encode_rates(make_events(args.events, base_ms))
    med = {k: statistics.median(v) for k, v in results.items()}
    size = len(make_events(1, base_ms)[0][3])
    print(f"median over {args.rounds} rounds, {args.events} points (CloudEvents of ~{size} bytes), "
          f"batches of {args.batch}, gzip, every write answered:")
    print(f"  bare influxdb-client (Point objects, synchronous write): {med['client']:8.0f} points/s")
    rounds = [g / c for g, c in zip(results["gateway"], results["client"], strict=True)]
    print(f"  gateway outbox -> influxdb destination:                 {med['gateway']:8.0f} points/s  "
          f"ratio {med['gateway'] / med['client']:.2f} (each round's: {' '.join(f'{r:.2f}' for r in rounds)}; "
          f"their median {statistics.median(rounds):.2f})")
    print(f"  line protocol: influxdb-client Point {client_enc:8.0f}/s, iotgw line_protocol {ours_enc:8.0f}/s "
          f"(ratio {ours_enc / client_enc:.2f})")
    print(f"  VictoriaMetrics holds all {exported} points written")


if __name__ == "__main__":
    main()
