"""A packet firewall in front of the packet readers (amqtt's for the CONNECT, gateway/broker/packets.py
after it): it reads whole MQTT packets off a client's socket, checks them, and hands on only packets
that can be parsed. An offending connection is closed and the offence counted by reason; nothing a
client sends can crash the broker or stall other clients.

amqtt 0.12.1's reader falls short of MQTT 3.1.1 here (each check names the section it enforces):

- a remaining length of more than four bytes is logged and *discarded* ("Message discarded"),
  and the reader then parses the middle of a packet as a header [MQTT-2.2.3], [MQTT-1.5.3];
- invalid UTF-8 in a topic or client id is accepted as ``str(bytes)`` instead of closing the
  connection [MQTT-1.5.3-1], and U+0000 is accepted [MQTT-1.5.3-2];
- a packet before CONNECT that is not CONNECT crashes the connection handler without closing the
  socket [MQTT-3.1.0-1]; a second CONNECT is handled but not counted [MQTT-3.1.0-2];
- wrong fixed-header flags [MQTT-2.2.2-2], QoS 3 [MQTT-3.3.1-4], DUP on QoS 0 [MQTT-3.3.1-2],
  wildcards in a PUBLISH topic [MQTT-3.3.2-2], packet id 0 [MQTT-2.3.1-1], a SUBSCRIBE without a
  topic filter [MQTT-3.8.3-3] or with a requested QoS above 2 [MQTT-3.8.3-4];
- there is no packet size limit (``[broker] max_packet_bytes`` here);
- a client that sends nothing for one and a half times its keep-alive is not disconnected, so its
  will is never published [MQTT-3.1.2-24]; the firewall closes it, and the broker then publishes the
  will as for any connection that ends without DISCONNECT [MQTT-3.1.2-8];
- a connection that never sends its whole CONNECT is held open forever ([broker] connect_timeout_s
  here: the deadline covers the whole packet, not its first byte, so one byte, or most of a large
  CONNECT, does not hold a connection either); likewise each later packet must arrive whole within
  one and a half keep-alive periods.

WebSocket clients go through the same firewall (:class:`gateway.broker.wire.WebSocketSource`): a
message in a text frame [MQTT-6.0.0-1] or larger than the largest packet closes the connection too.

:func:`check_packet` is a pure function (bytes in, a frozen :class:`PacketCheck` out);
:class:`PacketFirewall` does the reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

from gateway.broker.wire import OversizedMessage, TextFrame

log = logging.getLogger(__name__)

CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 8, 10, 12, 14
_SERVER_TO_CLIENT = {2: "CONNACK", 9: "SUBACK", 11: "UNSUBACK", 13: "PINGRESP"}
_FLAGS_TWO = {PUBREL, SUBSCRIBE, UNSUBSCRIBE}
KEEPALIVE_FACTOR = 1.5  # [MQTT-3.1.2-24]


@dataclass(frozen=True, slots=True)
class PacketCheck:
    """What :func:`check_packet` found: ``reason`` is None for an acceptable packet."""

    packet_type: int
    reason: str | None = None
    keep_alive: int | None = None  # from a CONNECT


class _Bad(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Cursor:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise _Bad("bad_length")
        chunk = self.body[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            text = self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("invalid_utf8") from None
        if "\0" in text:
            raise _Bad("invalid_utf8")
        return text

    def end(self) -> None:
        if self.pos != len(self.body):
            raise _Bad("bad_length")

    @property
    def left(self) -> int:
        return len(self.body) - self.pos


def _packet_id(cur: _Cursor) -> None:
    if cur.u16() == 0:
        raise _Bad("bad_packet_id")


def _check_connect(cur: _Cursor) -> int:
    cur.string()  # protocol name: amqtt refuses a wrong one with its CONNACK
    cur.take(1)  # protocol level: likewise
    flags = cur.take(1)[0]
    keep_alive = cur.u16()
    if flags & 0x01:
        raise _Bad("bad_flags")  # [MQTT-3.1.2-3]
    cur.string()  # client id
    if flags & 0x04:
        if (flags >> 3) & 0x03 == 3:
            raise _Bad("bad_qos")  # [MQTT-3.1.2-14]
        will_topic = cur.string()
        if "+" in will_topic or "#" in will_topic:
            raise _Bad("wildcard_topic")  # [MQTT-3.1.3-10] with [MQTT-3.3.2-2]
        cur.binary()
    elif flags & 0x38:
        raise _Bad("bad_flags")  # will QoS / retain without a will [MQTT-3.1.2-13], [MQTT-3.1.2-15]
    if flags & 0x80:
        cur.string()
    if flags & 0x40:
        cur.binary()
    cur.end()
    return keep_alive


def _check_publish(cur: _Cursor, flags: int) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise _Bad("bad_qos")
    if qos == 0 and flags & 0x08:
        raise _Bad("bad_flags")
    topic = cur.string()
    if not topic:
        raise _Bad("empty_topic")  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        raise _Bad("wildcard_topic")
    if qos:
        _packet_id(cur)


def _check_subscribe(cur: _Cursor, *, with_qos: bool) -> None:
    _packet_id(cur)
    if not cur.left:
        raise _Bad("bad_length")  # [MQTT-3.8.3-3], [MQTT-3.10.3-2]
    while cur.left:
        if not cur.string():
            raise _Bad("empty_topic")
        if with_qos and cur.take(1)[0] > 2:
            raise _Bad("bad_qos")


_FINE = tuple(PacketCheck(ptype) for ptype in range(16))  # every acceptable packet but a CONNECT: made once


def check_packet(first: int, body: bytes, *, connected: bool) -> PacketCheck:
    """Check one whole packet (its first byte and everything after the remaining length)."""
    ptype, flags = first >> 4, first & 0x0F
    keep_alive = None
    try:
        if ptype in (0, 15):
            raise _Bad("reserved_type")
        if not connected and ptype != CONNECT:
            raise _Bad("before_connect")
        if connected and ptype == CONNECT:
            raise _Bad("second_connect")
        if ptype in _SERVER_TO_CLIENT:
            raise _Bad("unexpected_type")
        if ptype != PUBLISH and flags != (2 if ptype in _FLAGS_TWO else 0):
            raise _Bad("bad_flags")
        cur = _Cursor(body)
        if ptype == CONNECT:
            keep_alive = _check_connect(cur)
        elif ptype == PUBLISH:
            _check_publish(cur, flags)
        elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            _packet_id(cur)
            cur.end()
        elif ptype in (SUBSCRIBE, UNSUBSCRIBE):
            _check_subscribe(cur, with_qos=ptype == SUBSCRIBE)
        else:  # PINGREQ, DISCONNECT
            cur.end()
    except _Bad as bad:
        return PacketCheck(ptype, bad.reason)
    return _FINE[ptype] if keep_alive is None else PacketCheck(ptype, None, keep_alive)


class _Closed(Exception):
    pass


class Source(Protocol):
    """Where a connection's bytes come from (``asyncio.StreamReader``, or a WebSocket's messages)."""

    async def read(self, n: int) -> bytes:
        """What has arrived, at most ``n`` bytes (at least one: waits for it); b"" at the end."""
        ...


CHUNK_BYTES = 65_536  # taken off a socket at a time (plus at most one partial packet kept between reads)


class PacketFirewall:
    """A client connection's reader: whole, checked packets only.

    What the socket has is read at once (up to :data:`CHUNK_BYTES`) and kept as it came; packets are
    split off it and checked one at a time, as they are handed over. A client that sends many packets
    together costs one read, not one a packet, and what is held is bounded by bytes, not by packets:
    one chunk, plus at most one partial packet (no larger than the largest allowed) — never an object
    a packet for a burst of small ones. A bad packet closes the connection once the good ones before it
    are handed over.

    amqtt reads the CONNECT through :meth:`read` (a packet is read off the socket by a task of its
    own, so amqtt cancelling a read never loses half a packet); the broker takes the later packets
    one by one from :meth:`next_packet`. ``gate`` is awaited before each packet is handed over (the
    pipeline's backpressure, and room in the connection's own queue); the deadlines do not count the
    time spent there.
    """

    def __init__(
        self, source: Source, abort: Callable[[], None], *, max_packet_bytes: int,
        connect_timeout_s: float, gate: Callable[[], Awaitable[None]], offence: Callable[[str], None],
    ) -> None:
        self._source = source
        self._abort = abort
        self._max = max_packet_bytes
        self._gate = gate
        self._offence = offence
        self._connected = False
        self._loop = asyncio.get_running_loop()
        self._deadline: float | None = self._loop.time() + connect_timeout_s
        self._keep_alive_s: float | None = None
        self._buffer = b""  # what amqtt has not read yet of the packets handed to it
        self._pos = 0
        self._raw = b""  # off the socket: packets are split off from _start on, as they are handed over
        self._start = 0
        self._pending: asyncio.Task[bytes | None] | None = None
        self._gated = False
        self._eof = False

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of whole checked packets (amqtt's reader interface, for the CONNECT)."""
        while not self._eof and (n < 0 or len(self._buffer) - self._pos < n):
            if n < 0 and self._pos < len(self._buffer):
                break
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._gated_packet())
            try:
                packet = await asyncio.shield(self._pending)
            except asyncio.CancelledError:
                if self._gated:  # nothing read off the socket yet: safe to stop altogether
                    self._pending.cancel()
                    self._pending = None
                raise
            self._pending = None
            if packet is None:
                self._eof = True
            else:
                self._buffer = self._buffer[self._pos:] + packet
                self._pos = 0
        end = len(self._buffer) if n < 0 else min(len(self._buffer), self._pos + n)
        data = self._buffer[self._pos:end]
        self._pos = end
        return data

    async def next_packet(self) -> bytes | None:
        """The next whole checked packet, after the gate; None once the connection is over."""
        started = self._loop.time()
        await self._gate()
        if self._deadline is not None:  # time spent held back by the gate is not the client's silence
            self._deadline += self._loop.time() - started
        if self._pos < len(self._buffer):  # left by the CONNECT's reader (not with amqtt's exact reads)
            rest, self._buffer, self._pos = self._buffer[self._pos:], b"", 0
            return rest
        if self._eof:
            return None
        packet = await self._packet()
        if packet is None:
            self._eof = True
        return packet

    def feed_eof(self) -> None:
        self._eof = True

    def close(self) -> None:
        """Stop reading (the connection is ending)."""
        self._eof = True
        if self._pending is not None:
            self._pending.cancel()

    def _refuse(self, reason: str) -> NoReturn:
        self._offence(reason)
        self._abort()
        raise _Closed(reason)

    async def _gated_packet(self) -> bytes | None:
        started = self._loop.time()
        self._gated = True
        try:
            await self._gate()
        finally:
            self._gated = False
        if self._deadline is not None:
            self._deadline += self._loop.time() - started
        return await self._packet()

    async def _packet(self) -> bytes | None:
        """The next whole checked packet, read off the socket if need be; None once the connection is over."""
        try:
            while True:
                try:
                    packet = self._split_one()
                except _Bad as bad:
                    self._refuse(bad.reason)  # every good packet before it has been handed over
                if packet is not None:
                    return packet
                if not await self._read_more():
                    return None
        except (_Closed, ConnectionError, OSError):
            return None

    async def _read_more(self) -> bool:
        """Read what the socket has onto the raw bytes; False once the connection is closed."""
        try:
            async with asyncio.timeout_at(self._deadline):  # the whole packet, not only its first byte
                chunk = await self._source.read(CHUNK_BYTES)
        except TimeoutError:
            self._refuse("keepalive_expired" if self._connected else "connect_timeout")
        except OversizedMessage:
            self._refuse("oversized")
        except TextFrame:
            self._refuse("text_frame")
        if not chunk:
            if self._start < len(self._raw):
                self._refuse("truncated")
            return False  # closed between packets
        self._raw = self._raw[self._start:] + chunk  # what is kept: at most one partial packet
        self._start = 0
        return True

    def _split_one(self) -> bytes | None:
        """The next whole packet of the raw bytes, checked (None until it has all arrived; raises
        :class:`_Bad` for a bad one)."""
        raw, start = self._raw, self._start
        size = len(raw)
        if start >= size:
            return None
        length, multiplier, i = 0, 1, start + 1
        while True:
            if i > start + 4:
                raise _Bad("bad_remaining_length")
            if i >= size:
                return None
            byte = raw[i]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not byte & 0x80:
                break
        if i - start + length > self._max:
            raise _Bad("oversized")
        end = i + length
        if size < end:
            return None
        packet = raw[start:end]
        check = check_packet(packet[0], packet[i - start:], connected=self._connected)
        if check.reason is not None:
            raise _Bad(check.reason)
        self._start = end
        if check.packet_type == CONNECT:
            self._connected = True
            self._keep_alive_s = check.keep_alive * KEEPALIVE_FACTOR if check.keep_alive else None
        self._deadline = self._loop.time() + self._keep_alive_s if self._keep_alive_s else None
        return packet
