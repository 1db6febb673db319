"""MQTT 3.1.1 on the wire, as the broker sends it: the packets it writes (pure functions, bytes out),
and the two transports a client reaches it over, TCP (TLS or not) and WebSocket (binary frames).

A transport is written whole packets at a time (:meth:`Transport.write` buffers, :meth:`Transport.drain`
waits for room), and read through :class:`gateway.broker.firewall.PacketFirewall`, which takes what its
source has and splits it into packets. Closing never waits for a peer that does not read: a connection the
broker ends is aborted.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

ACCEPTED, UNACCEPTABLE_PROTOCOL, IDENTIFIER_REJECTED, SERVER_UNAVAILABLE, BAD_CREDENTIALS, NOT_AUTHORIZED = range(6)
SUBACK_FAILURE = 0x80
FLUSH_BYTES = 65_536  # written and not sent yet: sent at once from this much, not at the end of the loop's turn


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


remaining_length = _varint  # a packet's remaining length, as MQTT encodes it (used by the client's packets too)


def connack(session_present: bool, code: int) -> bytes:
    """[MQTT-3.2.2-4]: a refusal never says a session is present."""
    return bytes((0x20, 2, 1 if session_present and code == ACCEPTED else 0, code))


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def pubrec(packet_id: int) -> bytes:
    return b"\x50\x02" + packet_id.to_bytes(2, "big")


def pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


def pubcomp(packet_id: int) -> bytes:
    return b"\x70\x02" + packet_id.to_bytes(2, "big")


def unsuback(packet_id: int) -> bytes:
    return b"\xb0\x02" + packet_id.to_bytes(2, "big")


PINGRESP = b"\xd0\x00"


def suback(packet_id: int, codes: list[int]) -> bytes:
    return b"\x90" + _varint(2 + len(codes)) + packet_id.to_bytes(2, "big") + bytes(codes)


def publish(topic: str, payload: bytes, qos: int, packet_id: int | None, *, dup: bool = False,
            retain: bool = False) -> bytes:
    name = topic.encode()
    body_len = 2 + len(name) + (2 if qos else 0) + len(payload)
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    head = bytes((first,)) + _varint(body_len) + len(name).to_bytes(2, "big") + name
    if qos:
        if packet_id is None:
            raise ValueError(f"a QoS {qos} PUBLISH needs a packet id")
        head += packet_id.to_bytes(2, "big")
    return head + payload


class Transport(Protocol):
    """One client connection, as the broker writes to it. The method names are also those of amqtt's
    ``WriterAdapter``, so the protocol handler that reads packets writes through the same object."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def buffered(self) -> int:
        """Bytes written and not yet taken by the peer's socket (the kernel's own buffer aside)."""
        ...

    def get_peer_info(self) -> tuple[str, int] | None: ...

    def get_ssl_info(self) -> ssl.SSLObject | None: ...

    async def close(self) -> None: ...

    def abort(self) -> None: ...


class StreamTransport:
    """A TCP (or TLS) connection. What is written in one turn of the event loop goes out in one send at
    its end (a journal commit releases the PUBACKs of many messages at once: a send each, a system call
    and a release of the GIL, was a fifth of the broker's time under load), or at once when
    :data:`FLUSH_BYTES` wait; :meth:`drain` sends first, then waits for room."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed or self._writer.transport.is_closing():
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending and not self.closed and not self._writer.transport.is_closing():
            self._writer.write(self._pending[0] if len(self._pending) == 1 else b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0

    async def drain(self) -> None:
        if not self.closed:
            self._flush()
            await self._writer.drain()

    def buffered(self) -> int:
        return self._pending_bytes + self._writer.transport.get_write_buffer_size()

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._writer.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if peer and len(peer) >= 2 else None

    def get_ssl_info(self) -> ssl.SSLObject | None:
        info: ssl.SSLObject | None = self._writer.get_extra_info("ssl_object")
        return info

    async def close(self) -> None:
        """Flush what is buffered if the peer takes it at once, else drop it: never wait on a peer."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        transport = self._writer.transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        self.closed = True
        self._pending.clear()
        self._pending_bytes = 0
        self._writer.transport.abort()


class WebSocketTransport:
    """MQTT over WebSocket: each drain sends what was written as one binary message [MQTT-6.0.0-1]."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._buffer = bytearray()
        self._lock = asyncio.Lock()
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._buffer += data

    async def drain(self) -> None:
        async with self._lock:
            while self._buffer and not self.closed:  # what is written meanwhile goes too
                data, self._buffer = bytes(self._buffer), bytearray()
                try:
                    await self._ws.send(data)
                except ConnectionClosed:
                    self.closed = True

    def buffered(self) -> int:
        return len(self._buffer) + self._ws.transport.get_write_buffer_size()

    def get_peer_info(self) -> tuple[str, int] | None:
        peer: Any = self._ws.remote_address
        return (str(peer[0]), int(peer[1])) if peer and len(peer) >= 2 else None

    def get_ssl_info(self) -> ssl.SSLObject | None:
        info: ssl.SSLObject | None = self._ws.transport.get_extra_info("ssl_object")
        return info

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ws.transport.abort()

    def abort(self) -> None:
        self.closed = True
        self._ws.transport.abort()


class WebSocketSource:
    """The bytes of a WebSocket connection's binary messages, as a stream (for the firewall)."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._buffer = bytearray()

    async def read(self, n: int) -> bytes:
        """What is buffered, else the next message, at most ``n`` bytes; b"" once the connection closed."""
        while not self._buffer:  # an empty message is no end
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                if exc.sent is not None and exc.sent.code == 1009:  # a message above max_size
                    raise OversizedMessage from None
                return b""
            if isinstance(message, str):
                raise TextFrame
            self._buffer += message
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


class OversizedMessage(Exception):
    """A WebSocket message larger than the largest packet allowed."""


class TextFrame(Exception):
    """MQTT in a text frame [MQTT-6.0.0-1]."""
