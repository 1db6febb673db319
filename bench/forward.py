"""Events per second forwarded from the gateway's durable outbox to Mosquitto, NATS JetStream, RabbitMQ
and Redis Streams, each acknowledged (PUBACK, PubAck, publisher confirm, the XADD's answer), beside a
plain client (paho, nats-py, aiormq, redis-py) publishing the same events with the same
acknowledgements, in the same run.

    .venv/bin/python bench/forward.py [--events 20000] [--rounds 3] [--only mqtt,nats,rabbitmq,redis]

The outbox is filled first (a backlog, as after an outage); the figure is how fast the forwarder
drains it: read from SQLite, send, wait for acknowledgements, delete durably. Each round measures the
plain client and then the gateway; the ratio of each round (the two measured close together, so under
about the same load from whatever else the machine runs) is printed beside the ratio of the medians. The servers are
Debian's mosquitto, nats-server, rabbitmq-server and redis-server on loopback (./scripts/test
installs them). RabbitMQ: persistent messages into a durable queue bound to the topic exchange; the
plain client publishes to that exchange with the event id as message_id, pipelined, each confirmed;
the gateway also copies each message to its ledger queue (no event id twice). Redis: the plain client
pipelines XADD (MAXLEN ~) in batches of the destination's size; the gateway runs its add-once script
(the id set). Each destination drains in batches of its type's default batch_size. `--no-ledger`
adds a RabbitMQ run with dedupe_window = 0 (at least once, no ledger).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import cast

import aiormq
import nats
import paho.mqtt.client as mqtt
import redis.asyncio as aioredis
from paho.mqtt.enums import CallbackAPIVersion
from pamqp.commands import Basic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peers import Mosquitto, NatsServer, RabbitMq, RedisServer

from gateway.forward.base import InboundMessage
from gateway.forward.forwarder import Forwarder, Route
from gateway.forward.mqtt.destination import MqttDestination, MqttSettings
from gateway.forward.nats.destination import NatsDestination, NatsSettings
from gateway.forward.outbox import Limits, Outbox
from gateway.forward.rabbitmq import RabbitForward
from gateway.forward.rabbitmq.destination import RabbitDestination, RabbitSettings
from gateway.forward.rabbitmq.routing import topic_to_routing_key
from gateway.forward.redis import RedisForward
from gateway.forward.redis.destination import RedisDestination, RedisSettings
from gateway.forward.redis.streams import StreamNames
from pipeline.model import new_event_id
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate, compile_filter, topic_to_subject

Destination = MqttDestination | NatsDestination | RabbitDestination | RedisDestination
REDIS_BATCH: int = RedisForward.model_fields["batch_size"].default  # each destination's default batch_size
RABBITMQ_BATCH: int = RabbitForward.model_fields["batch_size"].default

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


async def prepare_rabbitmq(url: str) -> None:
    """A durable topic exchange and a durable queue bound to every topic: what consumers would have."""
    async with aiormq.connect(url) as connection:
        channel = await connection.channel()
        await channel.exchange_declare("iotgw", exchange_type="topic", durable=True)
        await channel.queue_declare("bench", durable=True)
        await channel.queue_bind("bench", "iotgw", routing_key="#")


async def purge_rabbitmq(url: str) -> None:
    async with aiormq.connect(url) as connection:
        channel = await connection.channel()
        await channel.queue_purge("bench")


async def plain_amqp(url: str, events: list[tuple[str, str, str, bytes]]) -> float:
    async with aiormq.connect(url) as connection:
        channel = cast(aiormq.Channel, await connection.channel(publisher_confirms=True))  # basic_publish(wait=)
        start = time.perf_counter()
        await asyncio.gather(*[
            channel.basic_publish(payload, exchange="iotgw", routing_key=topic_to_routing_key(topic), wait=False,
                                  properties=Basic.Properties(delivery_mode=2, message_id=event_id,
                                                              content_type="application/cloudevents+json"))
            for event_id, topic, _, payload in events
        ])
        elapsed = time.perf_counter() - start
    await purge_rabbitmq(url)
    return len(events) / elapsed


async def plain_redis(port: int, events: list[tuple[str, str, str, bytes]]) -> float:
    client = aioredis.Redis(port=port)
    start = time.perf_counter()
    for i in range(0, len(events), REDIS_BATCH):
        pipe = client.pipeline(transaction=False)
        for event_id, topic, _, payload in events[i:i + REDIS_BATCH]:
            pipe.xadd("plain:valid", {"event_id": event_id, "topic": topic, "gateway": "bench", "payload": payload},
                      maxlen=1_000_000, approximate=True)
        await pipe.execute()
    elapsed = time.perf_counter() - start
    await client.aclose()
    return len(events) / elapsed


async def _noop_inbound(name: str, message: InboundMessage) -> None:
    return None


async def gateway_forward(destination: Destination, events: list[tuple[str, str, str, bytes]],
                          batch_size: int = 500) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        limits = {destination.name: Limits(1 << 30, "refuse")}
        outbox = Outbox(Path(tmp), limits)
        await outbox.open()
        for event_id, topic, device, payload in events:
            await outbox.enqueue(destination.name, event_id, topic, device, payload)
        await outbox.close()
        route = Route(destination, (compile_filter("telemetry/#"),), limits[destination.name], batch_size)
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
    parser.add_argument("--only", default="mqtt,nats,rabbitmq,redis", help="backbones, comma-separated")
    parser.add_argument("--no-ledger", action="store_true", help="also RabbitMQ with dedupe_window = 0")
    args = parser.parse_args()
    only = set(args.only.split(","))
    events = make_events(args.events)
    pairs = {"mqtt": ("paho", "gw-mqtt"), "nats": ("nats-py", "gw-nats"), "rabbitmq": ("aiormq", "gw-rabbitmq"),
             "redis": ("redis-py", "gw-redis")}
    results: dict[str, list[float]] = {k: [] for b in pairs if b in only for k in pairs[b]}
    if args.no_ledger and "rabbitmq" in only:
        results["gw-rabbitmq-no-ledger"] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        mosquitto = stack.enter_context(Mosquitto(tmp / "mq")) if "mqtt" in only else None
        nats_server = stack.enter_context(NatsServer(tmp / "nats")) if "nats" in only else None
        rabbitmq = stack.enter_context(RabbitMq(tmp / "rabbitmq")) if "rabbitmq" in only else None
        redis_server = stack.enter_context(RedisServer(tmp / "redis")) if "redis" in only else None
        if nats_server:
            asyncio.run(ensure_stream(nats_server.url))
        if rabbitmq:
            asyncio.run(prepare_rabbitmq(rabbitmq.url))
        for round_no in range(1, args.rounds + 1):
            if mosquitto:
                results["paho"].append(plain_paho(mosquitto.port, make_events(args.events)))
                results["gw-mqtt"].append(asyncio.run(gateway_forward(MqttDestination("central", MqttSettings(
                    url=mosquitto.url, gateway_id="bench", client_id=f"bench-gw-{round_no}")),
                    make_events(args.events))))
            if nats_server:  # new ids each time: JetStream's duplicate window must not help
                results["nats-py"].append(asyncio.run(plain_nats(nats_server.url, make_events(args.events))))
                results["gw-nats"].append(asyncio.run(gateway_forward(NatsDestination("js", NatsSettings(
                    url=nats_server.url, gateway_id="bench", stream="BENCH")), make_events(args.events))))
            if rabbitmq:
                results["aiormq"].append(asyncio.run(plain_amqp(rabbitmq.url, make_events(args.events))))
                results["gw-rabbitmq"].append(asyncio.run(gateway_forward(RabbitDestination("amq", RabbitSettings(
                    url=rabbitmq.url, gateway_id="bench", own_prefix="iotgw.bench.amq")), make_events(args.events),
                    RABBITMQ_BATCH)))
                asyncio.run(purge_rabbitmq(rabbitmq.url))
                if args.no_ledger:
                    results["gw-rabbitmq-no-ledger"].append(asyncio.run(gateway_forward(RabbitDestination(
                        "amq", RabbitSettings(url=rabbitmq.url, gateway_id="bench", own_prefix="iotgw.bench.amq0",
                                              dedupe_window=0)), make_events(args.events), RABBITMQ_BATCH)))
                    asyncio.run(purge_rabbitmq(rabbitmq.url))
            if redis_server:
                results["redis-py"].append(asyncio.run(plain_redis(redis_server.port, make_events(args.events))))
                results["gw-redis"].append(asyncio.run(gateway_forward(RedisDestination("rs", RedisSettings(
                    url=f"redis://127.0.0.1:{redis_server.port}/0", gateway_id="bench",
                    streams=StreamNames("iotgw:{stage}", TopicTemplate(DEFAULT_TEMPLATE)))), make_events(args.events),
                    REDIS_BATCH)))
            print(f"round {round_no}: " + "  ".join(f"{k} {v[-1]:7.0f}/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"median over {args.rounds} rounds, {args.events} events of ~{len(events[0][3])} bytes, all acknowledged:")
    lines = {
        "mqtt": ("Mosquitto (MQTT 5, QoS 1)", "plain paho", "outbox->bridge"),
        "nats": ("NATS JetStream (PubAck)", "plain nats-py", "outbox->JetStream"),
        "rabbitmq": ("RabbitMQ (confirms, persistent)", "plain aiormq", "outbox->exchange"),
        "redis": ("Redis Streams (XADD)", "plain redis-py", "outbox->streams"),
    }
    for backbone, (plain, gw) in pairs.items():
        if backbone in only:
            title, plain_name, gw_name = lines[backbone]
            rounds = [g / p for g, p in zip(results[gw], results[plain], strict=True)]
            print(f"  {title}: {plain_name} {med[plain]:.0f}/s, gateway {gw_name} {med[gw]:.0f}/s, "
                  f"ratio {med[gw] / med[plain]:.2f} (each round's: {' '.join(f'{r:.2f}' for r in rounds)}; "
                  f"their median {statistics.median(rounds):.2f})")
    if "gw-rabbitmq-no-ledger" in med:
        print(f"  RabbitMQ without the ledger (dedupe_window = 0): {med['gw-rabbitmq-no-ledger']:.0f}/s, "
              f"ratio {med['gw-rabbitmq-no-ledger'] / med['aiormq']:.2f}")


if __name__ == "__main__":
    main()
