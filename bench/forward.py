"""Events per second forwarded from the gateway's durable outbox to Mosquitto and to NATS JetStream,
each acknowledged (PUBACK, PubAck), beside a plain client (paho, nats-py) publishing the same events
with the same acknowledgements, in the same run.

    .venv/bin/python bench/forward.py [--events 20000] [--rounds 3]

The outbox is filled first (a backlog, as after an outage); the figure is how fast the forwarder
drains it: read from SQLite, send, wait for acknowledgements, delete durably. The servers are
Debian's mosquitto and nats-server on loopback (./scripts/test installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peers import Mosquitto, NatsServer

from gateway.forward.base import InboundMessage
from gateway.forward.forwarder import Forwarder, Route
from gateway.forward.mqtt.destination import MqttDestination, MqttSettings
from gateway.forward.nats.destination import NatsDestination, NatsSettings
from gateway.forward.outbox import Limits, Outbox
from pipeline.model import new_event_id
from pipeline.topics import compile_filter, topic_to_subject

TOPIC = "telemetry/valid/1.0/bench/meter/m-{d}/power"


def make_events(count: int) -> list[tuple[str, str, str, bytes]]:
    """(event id, topic, device, CloudEvent payload) like the define stage publishes (~450 bytes)."""
    events = []
    for i in range(count):
        device = f"m-{i % 8}"
        event_id = new_event_id()
        body = {
            "specversion": "1.0", "id": event_id, "source": f"/iotgw/bench/{device}",
            "type": "io.iotgw.telemetry.reading.v1", "subject": TOPIC.format(d=i % 8), "time": "2026-11-28T07:00:00Z",
            "datacontenttype": "application/json",
            "data": {"id": event_id, "site": "bench", "device_id": device, "device_class": "meter",
                     "transport": "mqtt", "metric": "power", "value": float(i), "unit": "W", "device_ts": None,
                     "received_at": "2026-11-28T07:00:00Z", "seq": i, "quality": ["device_time_missing"]},
        }
        events.append((event_id, TOPIC.format(d=i % 8), device, json.dumps(body).encode()))
    return events


def plain_paho(url_port: int, events: list[tuple[str, str, str, bytes]]) -> float:
    done = threading.Event()
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(events):
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-plain", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    start = time.perf_counter()
    for _, topic, _, payload in events:
        client.publish(topic, payload, qos=1)
    done.wait(300)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return len(events) / elapsed


async def plain_nats(url: str, events: list[tuple[str, str, str, bytes]]) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    start = time.perf_counter()
    futures = [await js.publish_async(topic_to_subject(topic), payload, headers={"Nats-Msg-Id": "p" + event_id})
               for event_id, topic, _, payload in events]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - start
    await nc.close()
    return len(events) / elapsed


async def _noop_inbound(name: str, message: InboundMessage) -> None:
    return None


async def gateway_forward(destination: MqttDestination | NatsDestination,
                          events: list[tuple[str, str, str, bytes]]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        limits = {destination.name: Limits(1 << 30, "refuse")}
        outbox = Outbox(Path(tmp), limits)
        await outbox.open()
        for event_id, topic, device, payload in events:
            await outbox.enqueue(destination.name, event_id, topic, device, payload)
        await outbox.close()
        route = Route(destination, (compile_filter("telemetry/#"),), limits[destination.name])
        forwarder = Forwarder(Path(tmp), [route], gateway_id="bench", on_inbound=_noop_inbound,
                              on_drop=lambda *_: None)
        async with forwarder:
            while not destination.connected:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            while forwarder.outbox.stats[destination.name].depth:
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - start
        return len(events) / elapsed


async def ensure_stream(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["telemetry.>"], duplicate_window=120)
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    events = make_events(args.events)
    results: dict[str, list[float]] = {k: [] for k in ("paho", "gw-mqtt", "nats-py", "gw-nats")}
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "mq") as mosquitto, \
            NatsServer(Path(tmp) / "nats") as nats_server:
        asyncio.run(ensure_stream(nats_server.url))
        for round_no in range(1, args.rounds + 1):
            fresh = make_events(args.events)  # new ids: JetStream's duplicate window must not help
            results["paho"].append(plain_paho(mosquitto.port, fresh))
            results["gw-mqtt"].append(asyncio.run(gateway_forward(MqttDestination("central", MqttSettings(
                url=mosquitto.url, gateway_id="bench", client_id=f"bench-gw-{round_no}")), make_events(args.events))))
            results["nats-py"].append(asyncio.run(plain_nats(nats_server.url, make_events(args.events))))
            results["gw-nats"].append(asyncio.run(gateway_forward(NatsDestination("js", NatsSettings(
                url=nats_server.url, gateway_id="bench", stream="BENCH")), make_events(args.events))))
            print(f"round {round_no}: " + "  ".join(f"{k} {v[-1]:7.0f}/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"median over {args.rounds} rounds, {args.events} events of ~{len(events[0][3])} bytes, all acknowledged:")
    print(f"  Mosquitto (MQTT 5, QoS 1): plain paho {med['paho']:.0f}/s, gateway outbox->bridge {med['gw-mqtt']:.0f}/s,"
          f" ratio {med['gw-mqtt'] / med['paho']:.2f}")
    print(f"  NATS JetStream (PubAck):   plain nats-py {med['nats-py']:.0f}/s, gateway outbox->JetStream "
          f"{med['gw-nats']:.0f}/s, ratio {med['gw-nats'] / med['nats-py']:.2f}")


if __name__ == "__main__":
    main()
