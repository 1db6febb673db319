"""Test helpers for the embedded broker's MQTT 3.1.1 behaviour: MQTT packets built by hand (for raw
sockets: a silent client, a client that never acknowledges, malformed input), a recording paho
client (MQTTv311), and the gateway run in-process on a thread of its own so that synchronous
tests (paho, raw sockets, hypothesis) can read its stats."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Literal, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app import Gateway
from gateway.config import GatewayConfig


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(client_id: str, *, clean: bool = True, keepalive: int = 60,
            will: tuple[str, bytes, int] | None = None, will_retain: bool = False,
            username: str | None = None, password: str | None = None) -> bytes:
    flags = (0x02 if clean else 0) | ((0x04 | will[2] << 3 | (0x20 if will_retain else 0)) if will else 0)
    flags |= (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    payload = string(client_id) + (string(will[0]) + string(will[1]) if will else b"")
    payload += (string(username) if username is not None else b"") + (string(password) if password is not None else b"")
    return packet(0x10, string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload)


def publish(topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    return packet(0x30 | qos << 1, string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload)


def subscribe(topic_filter: str, qos: int, packet_id: int = 1) -> bytes:
    return packet(0x82, packet_id.to_bytes(2, "big") + string(topic_filter) + bytes([qos]))


def puback(packet_id: int) -> bytes:
    return packet(0x40, packet_id.to_bytes(2, "big"))


def pubrel(packet_id: int) -> bytes:
    return packet(0x62, packet_id.to_bytes(2, "big"))


class RawPacket(NamedTuple):
    first: int
    body: bytes

    @property
    def type(self) -> int:
        return self.first >> 4


class RawClient:
    """A bare TCP connection speaking MQTT bytes, packet by packet."""

    def __init__(self, port: int, *, source: str | None = None, timeout: float = 20) -> None:
        """``source``: the local address to connect from (any of 127.0.0.0/8 reaches the broker)."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def read(self) -> RawPacket | None:
        """The next packet, or None when the server closed the connection."""
        if not self._fill(2):
            return None
        length, shift, i = 0, 0, 1
        while True:
            if not self._fill(i + 1):
                return None
            byte = self._buf[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        if not self._fill(i + length):
            return None
        first, body = self._buf[0], self._buf[i:i + length]
        self._buf = self._buf[i + length:]
        return RawPacket(first, body)

    def closed_by_server(self) -> bool:
        """Reads until the server closes (True) or the socket's timeout passes without that (False)."""
        try:
            while self.read() is not None:
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


class Received(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    dup: bool
    retain: bool


class Paho:
    """A paho client (MQTT 3.1.1) that records what it receives."""

    def __init__(self, port: int, client_id: str, *, clean: bool = True, manual_ack: bool = False,
                 subscribe: list[tuple[str, int]] | None = None) -> None:
        self.messages: list[Received] = []
        self.granted: list[int] = []
        self.session_present: bool | None = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                  protocol=mqtt.MQTTv311, manual_ack=manual_ack)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.wait(20), f"{client_id} could not connect"
        if subscribe:
            self.subscribe(subscribe)

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        self._subscribed.clear()
        self.client.subscribe(filters)
        assert self._subscribed.wait(20), "could not subscribe"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.granted = [int(c.value) for c in codes]
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.dup), bool(msg.retain)))

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1 and 2)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(20)
        assert info.is_published(), f"no acknowledgement for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class GatewayThread:
    """``with GatewayThread(config) as gw:`` runs :class:`Gateway` on its own event loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._gateway: Gateway | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gateway")

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        assert self._ready.wait(60), "gateway did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Gateway(self.config) as gateway:
            self._gateway = gateway
            self._ready.set()
            await self._stop.wait()

    def stats(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            assert self._gateway is not None
            return self._gateway.stats()

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(20)

    @property
    def port(self) -> int:
        return self.config.broker.port

    @property
    def thread_id(self) -> int | None:
        """The gateway thread's identifier (``threading.get_ident()`` on it)."""
        return self._thread.ident


class PacketRecorder:
    """The connection's calls a packet reader makes (gateway/broker/packets.py's interface), recorded in order."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, ...]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int | None, dup: bool) -> None:
        self.got.append(("publish", topic, payload, qos, retain, packet_id, dup))

    def pubrel(self, packet_id: int) -> None:
        self.got.append(("pubrel", packet_id))

    def subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> None:
        self.got.append(("subscribe", packet_id, filters))

    def unsubscribe(self, packet_id: int, filters: list[str]) -> None:
        self.got.append(("unsubscribe", packet_id, filters))

    def acknowledged(self, kind: Literal["puback", "pubrec", "pubcomp"], packet_id: int) -> None:
        self.got.append((kind, packet_id))

    def ping(self) -> None:
        self.got.append(("ping",))

    def disconnect(self) -> None:
        self.got.append(("disconnect",))

    def closed(self) -> None:
        self.got.append(("closed",))
