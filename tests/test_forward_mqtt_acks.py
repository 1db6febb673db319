"""The MQTT bridge counts PUBACKs on paho's thread and wakes the event loop once a batch (its last
PUBACK), not once a PUBACK: a batch still completes when PUBACKs come before the loop has registered
their messages, come out of order, or when the connection goes with PUBACKs not yet taken."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.forward.base import OutboundEvent
from gateway.forward.mqtt.destination import MqttDestination, MqttSettings

SUCCESS = ReasonCode(PacketTypes.PUBACK)


@dataclass
class _Info:
    mid: int
    rc: int = mqtt.MQTT_ERR_SUCCESS


class _Client:
    """Stands in for paho's client: hands out mids; ``acks_now`` PUBACKs a message from another thread
    before ``publish`` returns (as paho's network thread can)."""

    def __init__(self, destination: MqttDestination, acks_now: bool = False) -> None:
        self.destination = destination
        self.acks_now = acks_now
        self.mids: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, properties: object = None) -> _Info:
        mid = len(self.mids) + 1
        self.mids.append(mid)
        if self.acks_now:
            self.ack_from_paho_thread([mid])
        return _Info(mid)

    def ack_from_paho_thread(self, mids: list[int]) -> None:
        def run() -> None:
            for mid in mids:
                # as paho calls it, with itself as the client
                self.destination._on_publish(self, None, mid, SUCCESS, None)  # type: ignore[arg-type]

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()


def _batch(count: int) -> list[OutboundEvent]:
    return [OutboundEvent(i + 1, f"id-{i}", "telemetry/valid/1.0/s/c/d/m", "d", b"{}", 0) for i in range(count)]


def _attached(*, acks_now: bool = False) -> tuple[MqttDestination, _Client]:
    """A destination and its fake paho client as a CONNACK leaves them behind, without a broker."""
    destination = MqttDestination("central", MqttSettings(url="mqtt://127.0.0.1:1", gateway_id="gw", client_id="gw",
                                                                  ack_timeout_s=5.0))
    client = _Client(destination, acks_now=acks_now)
    destination._loop = asyncio.get_running_loop()
    destination._client = client  # type: ignore[assignment]
    destination._connected = True
    return destination, client


async def test_pubacks_before_the_loop_registered_the_messages_complete_the_batch() -> None:
    destination, _ = _attached(acks_now=True)
    acks = await destination.submit(_batch(50))
    assert await asyncio.wait_for(acks, 1.0) == 50


async def test_a_batch_completes_at_its_last_puback_even_out_of_order() -> None:
    destination, client = _attached()
    first = await destination.submit(_batch(10))
    second = await destination.submit(_batch(10))
    client.ack_from_paho_thread([10, 1, 2, 3, 4, 5])  # the first batch's last before the others
    await asyncio.sleep(0.05)
    assert not first.done()
    client.ack_from_paho_thread([6, 7, 8, 9, *range(11, 21)])
    assert await asyncio.wait_for(first, 1.0) == 10  # well within the 5 s ack timeout
    assert await asyncio.wait_for(second, 1.0) == 10


async def test_pubacks_not_yet_taken_count_when_the_connection_goes() -> None:
    destination, client = _attached()
    acks = await destination.submit(_batch(10))
    client.ack_from_paho_thread([1, 2, 3])  # no wake-up: the batch's last did not come
    destination._set_connected(False)  # paho's on_disconnect, as the loop runs it
    assert await asyncio.wait_for(acks, 1.0) == 3


async def test_the_brokers_receive_maximum_bounds_the_messages_in_flight() -> None:
    """A broker's MQTT 5 CONNACK with Receive Maximum 2: with max_inflight = 0 (the forwarder's window)
    no more than 2 PUBLISHes await their PUBACK at once, as MQTT 5 requires [MQTT-3.3.4-7]; all 10
    arrive as the PUBACKs come."""
    published: list[int] = []
    unacked: list[int] = []
    most = 0

    acking: list[asyncio.Future[None]] = []

    async def ack_later(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)  # a client over the bound sends more meanwhile
        for m in unacked:
            writer.write(b"\x40\x02" + m.to_bytes(2, "big"))
        unacked.clear()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal most
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = first >> 4
                if kind == 1:  # CONNECT: CONNACK, properties: Receive Maximum 2
                    writer.write(b"\x20\x06\x00\x00\x03\x21\x00\x02")
                elif kind == 3:
                    topic_len = int.from_bytes(body[:2], "big")
                    mid = int.from_bytes(body[2 + topic_len:4 + topic_len], "big")
                    published.append(mid)
                    unacked.append(mid)
                    most = max(most, len(unacked))
                    if len(unacked) == 1:
                        acking.append(asyncio.ensure_future(ack_later(writer)))
                elif kind == 12:
                    writer.write(b"\xd0\x00")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    destination = MqttDestination("central", MqttSettings(url=f"mqtt://127.0.0.1:{port}", gateway_id="gw",
                                                          client_id="gw", protocol="5", ack_timeout_s=10))
    try:
        await destination.start()
        async with asyncio.timeout(10):
            while not destination.connected:
                await asyncio.sleep(0.02)
        assert await destination.send(_batch(10)) == 10
    finally:
        await destination.close()
        server.close()
    assert len(published) == 10
    assert most == 2
