"""The packets a client sends after its CONNECT, read by the gateway: :func:`deliver` turns one whole
packet (checked by the packet firewall, gateway/broker/firewall.py) into a call on the connection's
:class:`~gateway.broker.core.PacketSink`; :class:`PacketChannel` takes a connection's packets off its
firewall, in order, and delivers each.

amqtt reads only the CONNECT (gateway/broker/amqtt_adapter.py). Its reader of the later packets cost
about a fifth of the broker's time under load (bench/broker_ingest.py): a timed task and a task per
packet, and a dozen awaits to parse one. Here a packet costs a function call: the firewall has already
checked every field this reads, so decoding cannot fail on what a client sends.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.broker.core import PacketSink
from gateway.broker.firewall import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    PacketFirewall,
)
from pipeline.retry import stop_task

log = logging.getLogger(__name__)


def _strings(packet: bytes, pos: int, *, with_qos: bool) -> tuple[list[str], list[int]]:
    names: list[str] = []
    qos: list[int] = []
    while pos < len(packet):
        end = pos + 2 + int.from_bytes(packet[pos:pos + 2], "big")
        names.append(packet[pos + 2:end].decode("utf-8"))
        pos = end
        if with_qos:
            qos.append(packet[pos])
            pos += 1
    return names, qos


def deliver(packet: bytes, sink: PacketSink) -> None:
    """Hand one whole, checked packet (fixed header included) to ``sink``."""
    first = packet[0]
    pos = 1
    while packet[pos] & 0x80:  # the remaining length (checked: at most four bytes)
        pos += 1
    pos += 1
    kind = first >> 4
    if kind == PUBLISH:
        qos = (first >> 1) & 0x03
        end = pos + 2 + ((packet[pos] << 8) | packet[pos + 1])
        topic = packet[pos + 2:end].decode("utf-8")
        packet_id = None
        if qos:
            packet_id = (packet[end] << 8) | packet[end + 1]
            end += 2
        sink.publish(topic, packet[end:], qos=qos, retain=bool(first & 0x01), packet_id=packet_id,
                     dup=bool(first & 0x08))
        return
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        packet_id = (packet[pos] << 8) | packet[pos + 1]
        if kind == PUBREL:
            sink.pubrel(packet_id)
        else:
            sink.acknowledged("puback" if kind == PUBACK else "pubrec" if kind == PUBREC else "pubcomp", packet_id)
    elif kind in (SUBSCRIBE, UNSUBSCRIBE):
        packet_id = (packet[pos] << 8) | packet[pos + 1]
        names, qos_list = _strings(packet, pos + 2, with_qos=kind == SUBSCRIBE)
        if kind == SUBSCRIBE:
            sink.subscribe(packet_id, list(zip(names, qos_list, strict=True)))
        else:
            sink.unsubscribe(packet_id, names)
    elif kind == PINGREQ:
        sink.ping()
    elif kind == DISCONNECT:
        sink.disconnect()
    elif kind == CONNECT:  # a second one (the firewall closes the connection before this)
        sink.closed()


class PacketChannel:
    """One connection after its CONNECT (gateway/broker/core.py ``Channel``): a task takes its packets
    off the firewall, in order, into the sink, yielding to the loop after each; the end of the
    connection (or a packet the firewall refused) is told as ``closed``, a DISCONNECT ends the reading."""

    def __init__(self, reader: PacketFirewall) -> None:
        self._reader = reader
        self._task: asyncio.Task[None] | None = None

    async def start(self, sink: PacketSink) -> None:
        self._task = asyncio.create_task(self._run(sink), name="mqtt packet reader")

    async def stop(self) -> None:
        self._reader.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            await stop_task(task)

    async def _run(self, sink: PacketSink) -> None:
        reader = self._reader
        try:
            while (packet := await reader.next_packet()) is not None:
                deliver(packet, sink)
                if packet[0] >> 4 == DISCONNECT:
                    return
                # The connection handles the packet before the next one is handed over (and, at the
                # gate, before the pipeline's room is asked again): a client is at most a packet ahead.
                await asyncio.sleep(0)
        except Exception:
            log.exception("reading an MQTT client's packets failed")
        sink.closed()
