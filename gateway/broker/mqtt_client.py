"""MQTT (3.1.1 and 5) as a client speaks it, on the event loop: how the external broker
(gateway/broker/external.py) attaches to the site's broker.

No thread and no hand-off. The socket's bytes arrive in bursts; :class:`PacketReader` (pure: bytes in,
whole packets out, a packet may span any number of reads) splits each burst, and every PUBLISH goes to the
:class:`ClientHandler` at once, tagged with the connection it came on. What the client writes (PUBACKs,
PUBLISHes, pings) is gathered and written once per loop turn. A PUBACK is written only on the connection its
message came on: after a reconnection the broker sends the message again, and that copy is acknowledged.

A peer that breaks the protocol (a packet a broker never sends, a malformed or truncated one, a remaining
length of more than four bytes) has its connection closed; the client reconnects as after any loss, with a
random, exponential, capped wait. A PUBLISH larger than ``max_packet_bytes`` is never buffered: its head (topic,
packet id) is read, the rest skipped, and it goes to the handler with ``oversized`` set (an MQTT 3.1.1 client
cannot tell the broker its limit; refusing the message would have the broker send it again forever).

The session is persistent (clean session 0; under MQTT 5 clean start 0 and a session expiry): QoS 1 messages
the gateway publishes and the broker has not yet acknowledged are sent again, with DUP, after a reconnection
[MQTT-4.4.0-1]. Under MQTT 5 the client tells the broker its Receive Maximum (how many QoS 1 deliveries may
await a PUBACK: a broker sends no more ahead, which is what keeps a gateway that acknowledges only after its
journal commit from being held to the broker's own default, 20 for Mosquitto), keeps to the broker's, and
asks not to be sent retained messages on subscribing. Properties the broker sends are skipped but for the
CONNACK's Receive Maximum and Server Keep Alive. ``auto`` tries MQTT 5 and falls back to 3.1.1 when the broker
refuses the protocol version (CONNACK code 1 or 0x84; not when it closes the connection: it may be restarting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol

from gateway.broker import wire

log = logging.getLogger(__name__)

CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP, SERVER_DISCONNECT = 2, 3, 4, 9, 11, 13, 14
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
CONNECT_TIMEOUT_S = 10.0  # TCP, TLS handshake and CONNACK together
MAX_BACKOFF_S = 30.0
STABLE_S = 30.0  # a connection up this long (or one keep-alive) resets the wait before reconnecting
MAX_UNACKED = 1000  # QoS 1 publishes of ours the broker has not acknowledged; beyond, publish() says no
MAX_WRITE_BUFFER = 8 << 20  # a broker that stops reading: QoS 0 publishes are refused beyond this
_CONNACK_REASONS = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                    4: "bad user name or password", 5: "not authorized", 0x80: "unspecified error",
                    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
                    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
                    0x89: "server busy", 0x8A: "banned", 0x8C: "bad authentication method",
                    0x9A: "retain not supported", 0x9B: "QoS not supported"}
_PROTOCOL_REFUSED = (1, 0x84)  # 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"
RETAIN_NOT_SENT = 0x20  # MQTT 5 subscription option: retain handling 2, no retained messages on subscribing
# MQTT 5 property identifiers -> the size of their value (0: a variable byte integer; -2: a string or binary
# data; -4: a string pair), to walk the CONNACK's properties.
_PROPERTY_SIZES = {0x01: 1, 0x02: 4, 0x03: -2, 0x08: -2, 0x09: -2, 0x0B: 0, 0x11: 4, 0x12: -2, 0x13: 2, 0x15: -2,
                   0x16: -2, 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: -2, 0x1C: -2, 0x1F: -2, 0x21: 2, 0x22: 2, 0x23: 2,
                   0x24: 1, 0x25: 1, 0x26: -4, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}
RECEIVE_MAXIMUM, SERVER_KEEP_ALIVE = 0x21, 0x13

# (first byte, body, oversized): ``body`` is the whole packet after its fixed header, or for an oversized
# PUBLISH only its head (topic and packet id).
Packet = tuple[int, bytes, bool]


class ProtocolError(Exception):
    """The broker sent what a broker must not: the connection is closed."""


class PacketReader:
    """Whole MQTT packets out of a byte stream, however it is split; pure (no I/O)."""

    def __init__(self, max_packet_bytes: int) -> None:
        self.max_packet_bytes = max_packet_bytes
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversized PUBLISH still to come, thrown away as they arrive

    def feed(self, data: bytes) -> list[Packet]:
        """The packets ``data`` completes (in order); raises :class:`ProtocolError`."""
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        buf = self._buffer
        buf += data
        end = len(buf)
        packets: list[Packet] = []
        pos = 0
        while end - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            i = pos + 2
            if length & 0x80:  # a remaining length of more than one byte
                length &= 0x7F
                shift, complete = 7, False
                while i < end:
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("a remaining length of more than four bytes")
                if not complete:
                    break
            if length > self.max_packet_bytes:
                head = self._oversized_head(buf, first, i, end, length)
                if head is None:
                    break
                packets.append((first, head, True))
                if end - i >= length:
                    pos = i + length
                    continue
                self._skip = length - (end - i)
                pos = end
                break
            if end - i < length:
                break
            packets.append((first, bytes(buf[i:i + length]), False))
            pos = i + length
        if pos:
            del buf[:pos]
        return packets

    def _oversized_head(self, buf: bytearray, first: int, i: int, end: int, length: int) -> bytes | None:
        """The topic and packet id of a PUBLISH too large to keep, once they have arrived (else None)."""
        if first >> 4 != PUBLISH:
            raise ProtocolError(f"a packet of {length} bytes, more than max_packet_bytes")
        if end - i < 2:
            return None
        head = 2 + int.from_bytes(buf[i:i + 2], "big") + (2 if first & 0x06 else 0)
        if head > length:  # a head over max_packet_bytes is still kept (64 kB at most): its packet id is needed
            raise ProtocolError(f"a PUBLISH of {length} bytes with a topic of {head} bytes")
        return bytes(buf[i:i + head]) if end - i >= head else None


@dataclass(slots=True)  # not frozen: one per message, and frozen slots classes init slowly
class Publish:
    """A PUBLISH the broker sent (``oversized``: its payload was not kept), on connection number ``generation``
    (a PUBACK is only valid on that one)."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int
    dup: bool
    retain: bool
    oversized: bool = False
    generation: int = 0


def _varint_at(body: bytes, pos: int) -> tuple[int, int]:
    """A variable byte integer at ``pos``: (value, the position after it)."""
    value, shift = 0, 0
    while True:
        if pos >= len(body) or shift > 21:
            raise ProtocolError("a malformed variable byte integer")
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def read_properties(body: bytes, pos: int) -> tuple[dict[int, int], int]:
    """MQTT 5 properties at ``pos``: the numeric ones by identifier, and the position after them."""
    length, pos = _varint_at(body, pos)
    end = pos + length
    if end > len(body):
        raise ProtocolError("properties longer than their packet")
    found: dict[int, int] = {}
    while pos < end:
        ident = body[pos]
        size = _PROPERTY_SIZES.get(ident)
        if size is None:
            raise ProtocolError(f"an unknown property 0x{ident:02x}")
        pos += 1
        if size == 0:
            found[ident], pos = _varint_at(body, pos)
        elif size > 0:
            found[ident] = int.from_bytes(body[pos:pos + size], "big")
            pos += size
        else:
            for _ in range(-size // 2):
                if pos + 2 > end:
                    raise ProtocolError("a malformed property")
                pos += 2 + ((body[pos] << 8) | body[pos + 1])
        if pos > end:
            raise ProtocolError("a malformed property")
    return found, end


def decode_publish(first: int, body: bytes, oversized: bool = False, generation: int = 0, *,
                   v5: bool = False) -> Publish:
    """A PUBLISH's fields; raises :class:`ProtocolError` for one a broker must not send to a QoS 1 subscriber."""
    qos = (first >> 1) & 0x03
    if qos > 1:
        raise ProtocolError(f"a PUBLISH at QoS {qos} (subscribed at QoS 1)")
    if len(body) < 2:
        raise ProtocolError("a PUBLISH without a topic")
    end = 2 + ((body[0] << 8) | body[1])
    if len(body) < end + 2 * qos:
        raise ProtocolError("a PUBLISH shorter than its topic")
    try:
        topic = body[2:end].decode()
    except UnicodeDecodeError:
        raise ProtocolError("a topic that is not UTF-8") from None
    if not topic or "\0" in topic or "+" in topic or "#" in topic:
        raise ProtocolError(f"a PUBLISH on {topic!r}")
    packet_id = 0
    if qos:
        packet_id = (body[end] << 8) | body[end + 1]
        if not packet_id:
            raise ProtocolError("a QoS 1 PUBLISH with packet id 0")
        end += 2
    if v5 and not oversized:  # its properties (none the gateway uses: no topic alias was allowed)
        length, end = _varint_at(body, end)
        end += length
        if end > len(body):
            raise ProtocolError("PUBLISH properties longer than the packet")
    return Publish(topic, b"" if oversized else body[end:], qos, packet_id, bool(first & 0x08), bool(first & 0x01),
                   oversized, generation)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _binary(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect_packet(client_id: str, keepalive_s: int, *, clean: bool = False, username: str | None = None,
                   password: str | None = None, will: Will | None = None, v5: bool = False,
                   session_expiry_s: int = 0, receive_maximum: int = 65_535) -> bytes:
    flags = 0x02 if clean else 0
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += (b"\x00" if v5 else b"") + _string(will.topic) + _binary(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:  # [MQTT-3.1.2-22]: no password without a user name
            flags |= 0x40
            payload += _binary(password.encode())
    head = b"\x00\x04MQTT" + bytes((5 if v5 else 4, flags)) + keepalive_s.to_bytes(2, "big")
    if v5:
        properties = (bytes((0x11,)) + session_expiry_s.to_bytes(4, "big")
                      + bytes((RECEIVE_MAXIMUM,)) + receive_maximum.to_bytes(2, "big"))
        head += wire.remaining_length(len(properties)) + properties
    body = head + payload
    return b"\x10" + wire.remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int = 1, *, v5: bool = False) -> bytes:
    options = bytes((qos | RETAIN_NOT_SENT if v5 else qos,))
    body = packet_id.to_bytes(2, "big") + (b"\x00" if v5 else b"") + b"".join(_string(f) + options for f in filters)
    return b"\x82" + wire.remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int | None, *, retain: bool = False,
                   v5: bool = False) -> bytes:
    """A PUBLISH (the broker's own encoder, gateway/broker/wire.py, for 3.1.1; MQTT 5 adds empty properties)."""
    if not v5:
        return wire.publish(topic, payload, qos, packet_id, retain=retain)
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + (packet_id.to_bytes(2, "big") if qos and packet_id else b"")
    body += b"\x00" + payload
    return bytes((0x30 | (qos << 1) | (0x01 if retain else 0),)) + wire.remaining_length(len(body)) + body


def publish_packets(topic: str, payloads: Sequence[bytes], *, v5: bool = False) -> bytes:
    """QoS 0 PUBLISHes of ``payloads`` on one topic, one after the other: the same bytes as :func:`publish_packet`
    makes for each, with the topic encoded once."""
    name = topic.encode()
    head = len(name).to_bytes(2, "big") + name + (b"\x00" if v5 else b"")  # MQTT 5: no properties
    fixed = len(head)
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        size = fixed + len(payload)
        if size < 16384:  # one or two bytes of remaining length, as wire.remaining_length writes them
            append(b"\x30" + (bytes((size,)) if size < 128 else bytes((size & 0x7F | 0x80, size >> 7))) + head)
        else:
            append(b"\x30" + wire.remaining_length(size) + head)
        append(payload)
    return b"".join(parts)


class ClientHandler(Protocol):
    """What the client tells its owner (on the event loop)."""

    def message(self, message: Publish) -> None:
        """A PUBLISH; acknowledge it with :meth:`MqttClient.ack`."""

    def connected(self, session_present: bool) -> None: ...

    def lost(self, why: str) -> None: ...

    def refused(self, why: str) -> None:
        """A connection attempt failed (``why`` stays the same while the cause does)."""


class Refused(Exception):
    """The broker answered the CONNECT with a refusal, or not at all."""

    def __init__(self, why: str, code: int | None = None) -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class _Accepted:
    session_present: bool
    receive_maximum: int
    keepalive_s: int | None


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: reads packets as they come, writes once per loop turn."""

    def __init__(self, client: MqttClient, generation: int, v5: bool) -> None:
        self._client = client
        self.generation = generation
        self.v5 = v5
        self._loop = asyncio.get_running_loop()
        self._reader = PacketReader(client.max_packet_bytes)
        self.transport: asyncio.Transport | None = None
        # (return code, what was granted); None when the connection ended before a CONNACK
        self.connack: asyncio.Future[tuple[int, _Accepted] | None] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._out: list[bytes] = []
        self.last_read = self.last_write = self._loop.time()
        self.ping_sent: float | None = None  # when a PINGREQ went out that nothing was read after yet

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # create_connection makes a stream transport
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        self.ping_sent = None  # the broker is there
        client, v5, generation = self._client, self.v5, self.generation
        try:
            for first, body, oversized in self._reader.feed(data):
                kind = first >> 4
                if kind == PUBLISH:
                    if not self.connack.done():
                        raise ProtocolError("a PUBLISH before CONNACK")
                    client.handler.message(decode_publish(first, body, oversized, generation, v5=v5))
                elif kind == CONNACK:
                    self._connack(body)
                elif not self.connack.done():
                    raise ProtocolError(f"a packet of type {kind} before CONNACK")
                elif kind == PUBACK:
                    if len(body) < 2 or (not v5 and len(body) != 2):
                        raise ProtocolError("a malformed PUBACK")
                    client.acknowledged((body[0] << 8) | body[1], refused=len(body) > 2 and body[2] >= 0x80)
                elif kind == SUBACK:
                    client.subscribed(body, v5=v5)
                elif kind == SERVER_DISCONNECT and v5:
                    code = body[0] if body else 0
                    self.fail(f"disconnected by the broker ({_CONNACK_REASONS.get(code, f'reason 0x{code:02x}')})")
                    return
                elif kind not in (PINGRESP, UNSUBACK):
                    raise ProtocolError(f"a packet of type {kind}, which a broker does not send a client")
        except ProtocolError as exc:
            self.fail(f"protocol error: {exc}")

    def _connack(self, body: bytes) -> None:
        if self.connack.done() or len(body) < 2 or (not self.v5 and len(body) != 2):
            raise ProtocolError("a malformed or second CONNACK")
        properties: dict[int, int] = {}
        if self.v5 and body[1] == 0:  # a refusal's properties are not read (nor a 3.1.1 broker's two bytes)
            properties, _ = read_properties(body, 2)
            if properties.get(RECEIVE_MAXIMUM) == 0:
                raise ProtocolError("a Receive Maximum of 0")
        self.connack.set_result((body[1], _Accepted(bool(body[0] & 0x01), properties.get(RECEIVE_MAXIMUM) or 65_535,
                                                    properties.get(SERVER_KEEP_ALIVE))))
        if body[1] == 0:  # current at once: a message in the same read may be acknowledged straight away
            self._client._current(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(f"connection lost: {exc}" if exc else "connection closed by the broker")
        if not self.connack.done():
            self.connack.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close

    # writing

    def write(self, data: bytes) -> None:
        out = self._out
        out.append(data)
        if len(out) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.last_write = self._loop.time()

    @property
    def backed_up(self) -> bool:
        transport = self.transport
        return transport is None or transport.get_write_buffer_size() > MAX_WRITE_BUFFER

    def fail(self, why: str) -> None:
        if not self.closed.done():
            self.closed.set_result(why)
        if not self.connack.done():
            self.connack.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()


class MqttClient:
    """A persistent MQTT session with one broker, connected (and reconnected) by :meth:`run`."""

    def __init__(
        self, handler: ClientHandler, host: str, port: int, *, client_id: str, subscriptions: Sequence[str],
        protocol: Literal["3.1.1", "5", "auto"] = "3.1.1", keepalive_s: int = 30, username: str | None = None,
        password: str | None = None, will: Will | None = None, tls: ssl.SSLContext | None = None,
        session_expiry_s: int = 0, receive_maximum: int = 65_535, max_packet_bytes: int = 262_144,
    ) -> None:
        self.handler = handler
        self.host, self.port = host, port
        self.max_packet_bytes = max_packet_bytes
        self._protocol = protocol
        self._v5 = protocol != "3.1.1"
        self._connect_packet = partial(connect_packet, client_id, keepalive_s, username=username, password=password,
                                       will=will, session_expiry_s=session_expiry_s, receive_maximum=receive_maximum)
        self._subscriptions = list(subscriptions)
        self._keepalive_s = keepalive_s
        self._tls = tls
        self.generation = 0
        self.protocol_in_use = ""
        self._connection: _Connection | None = None
        self._ready = False  # CONNACK accepted
        self._stopping = False
        self._paused = False
        self._next_id = 0
        self._unacked: dict[int, bytes] = {}  # our QoS 1 PUBLISHes the broker has not acknowledged, in order
        self._sent: set[int] = set()  # of them, those written on a connection (sent again with DUP)
        self._send_maximum = 65_535  # the broker's Receive Maximum (MQTT 5)
        self._waiters: dict[int, asyncio.Future[bool]] = {}
        self.subscribe_failures = 0  # subscriptions the broker refused (SUBACK 0x80 or more)
        self.subscriptions_at_qos0 = 0  # granted QoS 0 for our QoS 1: deliveries then are never acknowledged
        self.publishes_refused = 0  # our QoS 1 PUBLISHes an MQTT 5 broker answered with a failure reason code

    @property
    def connected(self) -> bool:
        return self._ready

    # --- connecting -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and again after every loss, until cancelled."""
        attempt = 0
        while not self._stopping:
            try:
                connection, accepted = await self._open()
            except (OSError, TimeoutError):
                self.handler.refused("cannot connect")
            except Refused as exc:
                if self._v5 and self._protocol == "auto" and exc.code in _PROTOCOL_REFUSED:
                    log.warning("external broker %s:%d does not speak MQTT 5; using 3.1.1", self.host, self.port)
                    self._v5 = False
                    continue
                self.handler.refused(str(exc))
            else:
                keepalive_s = accepted.keepalive_s or self._keepalive_s
                up_since = asyncio.get_running_loop().time()
                try:
                    self._established(connection, accepted)
                    why = await self._watch(connection, keepalive_s)
                finally:
                    self._ready = False
                    self._connection = None
                    connection.fail("closed")
                # the wait starts over only after a connection that lasted (two clients with one id kick
                # each other out at once, again and again)
                if asyncio.get_running_loop().time() - up_since >= (keepalive_s or STABLE_S):
                    attempt = 0
                self.handler.lost(why)
                if self._stopping:
                    return
            attempt += 1
            await asyncio.sleep(min(MAX_BACKOFF_S, random.uniform(0.2, 1.5 ** min(10, attempt))))

    async def _open(self) -> tuple[_Connection, _Accepted]:
        loop = asyncio.get_running_loop()
        generation, v5 = self.generation + 1, self._v5
        packet = self._connect_packet(v5=v5)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, connection = await loop.create_connection(
                lambda: _Connection(self, generation, v5), self.host, self.port, ssl=self._tls,
                server_hostname=self.host if self._tls is not None else None)
            try:
                connection.write(packet)
                answer = await connection.connack
            except BaseException:
                connection.fail("connecting")
                self._not_current(connection)
                raise
        if answer is None:
            raise Refused(connection.closed.result() if connection.closed.done() else "closed before a CONNACK")
        code, accepted = answer
        if code:
            self._not_current(connection)
            connection.fail("refused")
            raise Refused(f"refused: {_CONNACK_REASONS.get(code, f'code {code}')}", code)
        return connection, accepted

    def _current(self, connection: _Connection) -> None:
        """The CONNACK accepted ``connection``: PUBACKs go on it from now on (:meth:`ack`)."""
        self.generation = connection.generation
        self._connection = connection

    def _not_current(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    def _established(self, connection: _Connection, accepted: _Accepted) -> None:
        self._current(connection)
        self.protocol_in_use = "5" if connection.v5 else "3.1.1"
        self._ready = True
        self._send_maximum = accepted.receive_maximum if connection.v5 else 65_535
        if self._paused and connection.transport is not None:
            connection.transport.pause_reading()
        if self._subscriptions:
            connection.write(subscribe_packet(self._packet_id(), self._subscriptions, v5=connection.v5))
        sent, self._sent = self._sent, set()
        for packet_id, packet in self._unacked.items():  # [MQTT-4.4.0-1], with DUP if written before
            if len(self._sent) >= self._send_maximum:
                break
            connection.write(bytes((packet[0] | 0x08,)) + packet[1:] if packet_id in sent else packet)
            self._sent.add(packet_id)
        self.handler.connected(accepted.session_present)

    async def _watch(self, connection: _Connection, keepalive_s: int) -> str:
        """Ping when nothing was written or nothing was read for half the keep-alive; the connection is dead
        once a ping had no answer (nothing read) within the keep-alive. While reading is paused nothing can be
        read: pings still go out (the broker wants them), but are not judged (:meth:`resume_reading` re-arms)."""
        loop = asyncio.get_running_loop()
        period = keepalive_s / 2 if keepalive_s else 3600.0
        while True:
            done, _ = await asyncio.wait([connection.closed], timeout=period)
            if done:
                return connection.closed.result()
            if not keepalive_s:
                continue
            now = loop.time()
            ping_sent = connection.ping_sent
            if ping_sent is not None and not self._paused and now - ping_sent >= keepalive_s:
                connection.fail("no answer within the keep-alive")
            elif now - connection.last_write >= period or (ping_sent is None and now - connection.last_read >= period):
                connection.write(PINGREQ)
                if ping_sent is None:
                    connection.ping_sent = now

    # --- what the owner does ----------------------------------------------------------------------------

    def ack(self, packet_id: int, generation: int) -> bool:
        """PUBACK ``packet_id`` if the connection it came on (``generation``) is still the one."""
        connection = self._connection
        if connection is None or connection.generation != generation:
            return False
        connection.write(wire.puback(packet_id))
        return True

    def drop(self, generation: int, why: str) -> None:
        """Close the connection if it is still ``generation``; :meth:`run` reconnects as after any loss."""
        connection = self._connection
        if connection is not None and connection.generation == generation:
            connection.fail(why)

    def publish(self, topic: str, payload: bytes, qos: int = 0, *, retain: bool = False) -> int | None:
        """Queue a PUBLISH; its packet id (0 for QoS 0), or None when not connected or backed up. A QoS 1
        one beyond the broker's Receive Maximum waits for a PUBACK to make room."""
        connection = self._connection
        if connection is None or not self._ready:
            return None
        if qos == 0:
            if connection.backed_up:
                return None
            connection.write(publish_packet(topic, payload, 0, None, retain=retain, v5=connection.v5))
            return 0
        if len(self._unacked) >= MAX_UNACKED:
            return None
        packet_id = self._packet_id()
        packet = publish_packet(topic, payload, 1, packet_id, retain=retain, v5=connection.v5)
        self._unacked[packet_id] = packet
        if len(self._sent) < self._send_maximum:
            self._sent.add(packet_id)
            connection.write(packet)
        return packet_id

    def publish_many(self, topic: str, payloads: Sequence[bytes], qos: int = 0) -> int:
        """Several PUBLISHes on one topic; how many were queued. QoS 0 ones are encoded and written at once
        (all or none); QoS 1 ones go as :meth:`publish` sends each."""
        if qos:
            return sum(self.publish(topic, payload, qos) is not None for payload in payloads)
        connection = self._connection
        if connection is None or not self._ready or connection.backed_up:
            return 0
        connection.write(publish_packets(topic, payloads, v5=connection.v5))
        return len(payloads)

    async def published(self, packet_id: int, timeout_s: float) -> bool:
        """Wait until the broker acknowledged our QoS 1 PUBLISH ``packet_id`` (False at the deadline, or when
        the broker refused it)."""
        if packet_id not in self._unacked:
            return True
        waiter = self._waiters.setdefault(packet_id, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(waiter)
        except TimeoutError:
            return False

    def pause_reading(self) -> None:
        self._paused = True
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.ping_sent = None  # judged again from the next ping on: what waited is read now
            connection.transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    async def disconnect(self) -> None:
        """DISCONNECT (the broker then discards the will) and close; :meth:`run` then returns."""
        connection = self._connection
        self._stopping = True
        self._ready = False
        if connection is not None:
            connection.write(DISCONNECT)
            connection.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(connection.closed)

    # --- what the connection tells the client ---------------------------------------------------------

    def acknowledged(self, packet_id: int, *, refused: bool = False) -> None:
        """A PUBACK for our QoS 1 PUBLISH ``packet_id``; ``refused``: an MQTT 5 reason code of 0x80 or more (the
        broker did not take it: counted, not sent again)."""
        if self._unacked.pop(packet_id, None) is None:
            return
        self._sent.discard(packet_id)
        if refused:
            self.publishes_refused += 1
        waiter = self._waiters.pop(packet_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(not refused)
        connection = self._connection
        if connection is not None and self._ready and len(self._unacked) > len(self._sent):  # one held back may go now
            for held, packet in self._unacked.items():
                if len(self._sent) >= self._send_maximum:
                    break
                if held not in self._sent:
                    self._sent.add(held)
                    connection.write(packet)

    def subscribed(self, body: bytes, *, v5: bool) -> None:
        if len(body) < 3:
            raise ProtocolError("a malformed SUBACK")
        codes = body[2:]
        if v5:
            _, end = read_properties(body, 2)
            codes = body[end:]
        refused = sum(code >= wire.SUBACK_FAILURE for code in codes)
        if refused:
            self.subscribe_failures += refused
            log.warning("external broker %s:%d refused %d of the gateway's subscriptions", self.host, self.port,
                        refused)
        if at_qos0 := codes.count(0):  # every subscription asks for QoS 1
            self.subscriptions_at_qos0 += at_qos0
            log.warning("external broker %s:%d granted QoS 0 to %d of the gateway's QoS 1 subscriptions: what it"
                        " delivers on them is not acknowledged, and a crash can lose it",
                        self.host, self.port, at_qos0)

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._unacked:
                return self._next_id
        raise RuntimeError("no packet id free")  # pragma: no cover  (MAX_UNACKED is far below)
