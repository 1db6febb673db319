"""The embedded broker: its tap feeds the pipeline's bounded queue, a full queue stops it reading
from clients (memory stays bounded, nothing is lost), and a taken port is a one-line error."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Watcher, iotgw
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker.embedded import EmbeddedBroker, Ingest, Resend
from gateway.config import BrokerSettings
from pipeline.queue import BatchQueue
from pipeline.stage import RawMessage
from pipeline.topics import TopicTemplate

RAW = "telemetry/raw/1.0/s1/meter/m-{n}/power"


def _publish(port: int, count: int, qos: int, client_id: str, topic: str) -> None:
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_connect = lambda *_: done.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert done.wait(10)
    try:
        infos = [client.publish(topic, json.dumps({"value": i, "seq": i}), qos=qos) for i in range(1, count + 1)]
        deadline = time.monotonic() + 60
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    finally:
        client.disconnect()
        client.loop_stop()


def _raw_ingest(queue: BatchQueue[RawMessage]) -> Ingest:
    """The gateway's ingest, reduced to its raw-stage queue (no journal, no outboxes)."""
    tap = TopicTemplate().stage_filter("raw")

    async def ingest(topic: str, payload: bytes, origin: str | None, event_id: str | None, resend: Resend | None
                     ) -> list[asyncio.Future[None]]:
        if tap.matches(topic):
            await queue.put(RawMessage(topic, payload, origin, datetime.now(UTC)))
        return []

    return ingest


async def test_full_pipeline_queue_pauses_clients_and_loses_nothing(port: int) -> None:
    queue: BatchQueue[RawMessage] = BatchQueue(50)
    settings = BrokerSettings(port=port, allow_anonymous=True)
    async with EmbeddedBroker(settings, _raw_ingest(queue), queue.wait_for_room, port_option="--mqtt-port") as broker:
        publishers = [
            asyncio.create_task(asyncio.to_thread(_publish, port, 2000, qos, f"pub-{qos}", RAW.format(n=qos)))
            for qos in (0, 1)
        ]
        async with asyncio.timeout(30):  # nobody consumes: the queue fills and the broker stops reading
            while len(queue) < 50:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # publishers keep sending; the broker must not keep reading
        assert len(queue) == 50
        assert broker.pending_deliveries() <= 4  # one packet a client at most, not thousands
        assert queue.put_waits >= 1
        received: list[RawMessage] = []
        while len(received) < 4000:
            received += await asyncio.wait_for(queue.get_batch(500), 20)
        await asyncio.gather(*publishers)
    assert queue.high_water == 50
    for qos in (0, 1):
        seqs = [json.loads(m.payload)["seq"] for m in received if m.topic == RAW.format(n=qos)]
        assert seqs == list(range(1, 2001)), f"QoS {qos}: lost or reordered"
    assert {m.origin for m in received} == {"mqtt:pub-0", "mqtt:pub-1"}


async def test_in_process_publishes_reach_tap_and_subscribers(port: int) -> None:
    queue: BatchQueue[RawMessage] = BatchQueue(10)
    settings = BrokerSettings(port=port, allow_anonymous=True)
    async with EmbeddedBroker(settings, _raw_ingest(queue), queue.wait_for_room, port_option="--mqtt-port") as broker:
        watcher = await asyncio.to_thread(Watcher, port, ["telemetry/#"])
        await broker.publish(RAW.format(n=1), b'{"value": 1}')
        await broker.publish("telemetry/valid/1.0/s1/meter/m-1/power", b"{}")
        batch = await asyncio.wait_for(queue.get_batch(10), 5)
        for _ in range(100):
            if len(watcher.topics()) == 2:
                break
            await asyncio.sleep(0.05)
        watcher.close()
    assert [(m.topic, m.origin) for m in batch] == [(RAW.format(n=1), None)]  # only the raw stage is tapped
    assert sorted(watcher.topics()) == [RAW.format(n=1), "telemetry/valid/1.0/s1/meter/m-1/power"]


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = iotgw("demo", "--seconds", "1", "--data-dir", str(tmp_path), "--mqtt-port", str(taken))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"iotgw: error: MQTT port {taken} on 127.0.0.1 is already in use: stop what holds it or choose another "
        "port with --mqtt-port"
    ]


async def test_publish_retained_reports_its_own_message_not_one_refused_meanwhile(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_retained compared the refused count after awaiting durability: another retained message
    refused in that gap (a client's, at the bound) made it report False for a message that was kept."""
    queue: BatchQueue[RawMessage] = BatchQueue(10)
    settings = BrokerSettings(port=port, allow_anonymous=True, max_retained_messages=1)
    async with EmbeddedBroker(settings, _raw_ingest(queue), queue.wait_for_room, port_option="--mqtt-port") as broker:
        core = broker._running
        retain = core.retain

        def then_one_refused(topic: str, payload: bytes, qos: int) -> list[asyncio.Future[None]]:
            futures = retain(topic, payload, qos)
            asyncio.get_running_loop().call_soon(retain, "client/other", b"x", 1)  # at the bound: refused
            return futures

        monkeypatch.setattr(core, "retain", then_one_refused)
        assert await broker.publish_retained("gw/status", b"online") is True
        assert core.retained.refused == 1
        assert await broker.publish_retained("gw/more", b"x") is False  # its own refusal still tells
