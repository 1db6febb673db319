"""MQTT bridge to a remote broker with paho-mqtt 2.x.

MQTT 5 where the remote supports it (falling back to 3.1.1 when it refuses the protocol level),
TLS with client certificates, a persistent session (so the remote queues our downlink while we are
away), QoS 1 with every event acknowledged by PUBACK, and topic prefix/rewrite rules. Under MQTT 5
each event carries its id and the originating gateway as user properties.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import GatewayError
from gateway.forward.base import (
    PIPELINE_DEPTH,
    DestinationUnavailableError,
    InboundMessage,
    OutboundEvent,
    UnsendableEventError,
)
from gateway.forward.mqtt.connect import Presence, announce, set_will, tls_context
from gateway.forward.mqtt.settings import RewriteRule
from pipeline.queue import DropOldestQueue

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on
EVENT_ID = "event-id"
GATEWAY = "iotgw-gateway"
MAX_BATCH = 10_000  # the largest batch_size a [[forward]] may set
CONNACK_TIMEOUT_S = 5.0
_USER_PROPERTY = 38  # MQTT 5's property identifier of a user property (a UTF-8 string pair)
_PUBLISH_TABLES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def utf8_pair(key: str, value: str) -> bytes:
    """One user property as MQTT 5 writes it: the identifier, then two length-prefixed UTF-8 strings."""
    return bytes((_USER_PROPERTY,)) + _utf8(key) + _utf8(value)


def _variable_byte_integer(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class UserProperties(Properties):
    """PUBLISH properties holding user properties only, packed once when made.

    paho's :class:`Properties` builds its name tables in every object and packs by looking each of its
    27 property names up; with two user properties on every event that was most of the bridge's own
    time. paho reads a PUBLISH's properties through ``pack()`` (tests/test_forward_mqtt_wire.py checks
    the bytes against paho's own packing); the tables are shared, so printing one still works.
    """

    names = _PUBLISH_TABLES.names
    properties = _PUBLISH_TABLES.properties
    types = _PUBLISH_TABLES.types
    _packed: bytes
    UserProperty: list[tuple[str, str]]

    def __init__(self, pairs: list[tuple[str, str]], *, packed: bytes | None = None) -> None:
        """``packed``: the pairs packed already (:func:`utf8_pair` of each, joined), when the caller has them."""
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "UserProperty", pairs)
        body = b"".join(utf8_pair(k, v) for k, v in pairs) if packed is None else packed
        object.__setattr__(self, "_packed", _variable_byte_integer(len(body)) + body)

    def pack(self) -> bytes:
        return self._packed


@dataclass(frozen=True, slots=True)
class MqttSettings:
    url: str
    gateway_id: str
    client_id: str
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    qos: Literal[1] = 1
    keepalive_s: int = 30
    session_expiry_s: int = 86_400
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr or a log
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    topic_prefix: str = ""
    rewrite: tuple[RewriteRule, ...] = ()
    subscribe: tuple[str, ...] = ()
    # QoS 1 messages on the way before paho queues the rest; 0: no limit of paho's, the forwarder's window
    # bounds them (PIPELINE_DEPTH batches). With a limit paho scans its messages at every PUBACK for the
    # next to send: about a quarter of the bridge's CPU a message with 100.
    max_inflight: int = 0
    ack_timeout_s: float = 10.0
    inbound_queue: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Outstanding:
    """One batch's publishes waiting for their PUBACKs: ``done`` when none is left (or the connection
    went). Acknowledgements are counted, not awaited one by one."""

    done: asyncio.Future[None]
    mids: list[int] = field(default_factory=list)
    left: int = 0
    acked: set[int] = field(default_factory=set)


class MqttDestination:
    def __init__(self, name: str, settings: MqttSettings) -> None:
        url = urlparse(settings.url)
        if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not url.hostname:
            raise GatewayError(f"forward {name}: url must look like mqtt://host:1883 or mqtts://host:8883")
        self.name = name
        self._settings = settings
        self._host = url.hostname
        self._tls = url.scheme in ("mqtts", "ssl") or settings.ca_file is not None
        self._port = url.port or (8883 if self._tls else 1883)
        self._version = MQTTProtocolVersion.MQTTv311 if settings.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._outstanding: dict[int, _Outstanding] = {}  # mid -> the batch waiting for its PUBACK
        self._acked_mids: collections.deque[tuple[int, str | None]] = collections.deque()  # from paho's thread
        self._wake_on: set[int] = set()  # mids whose PUBACK wakes the loop (each batch's last)
        self._gateway_pair = (GATEWAY, settings.gateway_id)
        self._gateway_packed = utf8_pair(GATEWAY, settings.gateway_id)
        self._inbound: DropOldestQueue[InboundMessage] = DropOldestQueue(settings.inbound_queue)
        self._connected = False
        self._closing = False
        self._presence: Presence | None = None
        self.protocol_in_use: str = ""
        self.sent = 0
        self.acked = 0
        self.refused = 0

    @property
    def connected(self) -> bool:
        return self._connected

    def announce_as(self, presence: Presence) -> None:
        """The gateway's retained online/offline status on this broker, under the destination's topic
        mapping (prefix, rewrites): a birth message on each connect, a last will, and offline at a close."""
        self._presence = Presence(self.map_topic(presence.topic), presence.online, presence.offline)

    def _make_client(self) -> mqtt.Client:
        s = self._settings
        v5 = self._version == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=self._version,
            clean_session=None if v5 else False,  # a persistent session: the remote keeps our subscriptions
        )
        if s.username:
            client.username_pw_set(s.username, s.password)
        if self._tls:
            client.tls_set_context(tls_context(s.ca_file, s.cert_file, s.key_file))
        set_will(client, self._presence)
        client.max_inflight_messages_set(s.max_inflight)
        # paho counts in-flight messages as queued; the outbox hands over at most PIPELINE_DEPTH batches
        # at a time, so this bound only stops paho from buffering beyond that (the outbox is the buffer).
        client.max_queued_messages_set(PIPELINE_DEPTH * MAX_BATCH)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        return client

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(self._arm_connack_timer)

    def _arm_connack_timer(self) -> None:
        """Some 3.1.1-only brokers answer an MQTT 5 CONNECT in a form paho cannot read, and the
        connection hangs; in ``auto`` mode, no CONNACK within the timeout means: try 3.1.1."""
        if self._loop is None or self._settings.protocol != "auto" or self._version != MQTTProtocolVersion.MQTTv5:
            return
        self._loop.call_later(CONNACK_TIMEOUT_S, self._connack_overdue)

    def _connack_overdue(self) -> None:
        if self.protocol_in_use or self._closing or self._version != MQTTProtocolVersion.MQTTv5:
            return
        log.warning("forward %s: no answer from %s to MQTT 5; trying 3.1.1", self.name, self._host)
        self._version = MQTTProtocolVersion.MQTTv311
        self._reconnect_as_311()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connect()

    def _connect(self) -> None:
        self._client = client = self._make_client()
        if self._version == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry_s
            client.connect_async(self._host, self._port, keepalive=self._settings.keepalive_s, clean_start=False,
                                 properties=properties)
        else:  # 3.1.1: the persistent session is clean_session=False, set on the client
            client.connect_async(self._host, self._port, keepalive=self._settings.keepalive_s)
        client.loop_start()

    def _call(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if client is not self._client:
            return  # a client given up (see _on_disconnect)
        if reason.is_failure:
            unsupported = reason.value in (1, 0x84)  # 3.1.1 "unacceptable protocol version" / 5 "unsupported"
            if unsupported and self._settings.protocol == "auto" and self._version == MQTTProtocolVersion.MQTTv5:
                log.warning("forward %s: %s does not speak MQTT 5; using 3.1.1", self.name, self._host)
                self._version = MQTTProtocolVersion.MQTTv311
                self._call(self._reconnect_as_311)
                return
            else:
                log.warning("forward %s: connection refused: %s", self.name, reason)
            return
        self.protocol_in_use = "5" if self._version == MQTTProtocolVersion.MQTTv5 else "3.1.1"
        # paho's setter refuses an open connection; its own bound is read at each publish and PUBACK, so
        # setting it here, in the CONNACK's callback and before paho sends what waited, takes effect at once
        bound = self._inflight_bound(props)
        if bound == 0 and client._max_inflight_messages:  # none now, one before: what paho queued must still go
            bound = 65_535
        client._max_inflight_messages = bound
        if self._settings.subscribe:
            client.subscribe([(f, int(self._settings.qos)) for f in self._settings.subscribe])
        announce(client, self._presence, online=True)
        self._call(self._set_connected, True)

    def _inflight_bound(self, props: Any) -> int:
        """paho's in-flight bound (0: none): ``max_inflight``, or the broker's MQTT 5 Receive Maximum from
        its CONNACK when that is lower (paho does not heed it itself) [MQTT-3.3.4-7]."""
        window = self._settings.max_inflight
        receive_maximum = getattr(props, "ReceiveMaximum", None) if props is not None else None
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            return min(window, receive_maximum) if window else receive_maximum
        return window

    def _reconnect_as_311(self) -> None:
        old = self._client
        if old is not None:
            old.disconnect()
            # loop_stop joins paho's thread: never from that thread itself, and never block the loop on it
            threading.Thread(target=old.loop_stop, daemon=True).start()
        self._connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if client is not self._client:
            return  # the MQTT 5 client given up for 3.1.1, closing late: the new one may be connected already
        if (not self.protocol_in_use and self._settings.protocol == "auto"
                and self._version == MQTTProtocolVersion.MQTTv5):
            # Closed before any CONNACK we could read: a 3.1.1-only broker answers an MQTT 5 CONNECT
            # with a 3.1.1 refusal (or just closes). Try 3.1.1.
            log.warning("forward %s: %s closed an MQTT 5 connection before accepting it; trying 3.1.1",
                        self.name, self._host)
            self._version = MQTTProtocolVersion.MQTTv311
            self._call(self._reconnect_as_311)
        self._call(self._set_connected, False)

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected and not self._closing:
            log.warning("forward %s: %s %s:%d", self.name, "connected to" if connected else "lost", self._host,
                        self._port)
        self._connected = connected
        if not connected:
            self._take_acks()  # what was acknowledged before the connection went counts
            self._wake_on.clear()
            for batch in set(self._outstanding.values()):
                if not batch.done.done():
                    batch.done.set_exception(DestinationUnavailableError(f"{self.name}: connection lost"))
            self._outstanding.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        """On paho's thread: note the PUBACK; only the last of a batch wakes the loop, which then takes
        all that came before it (a wake-up is a write to the loop's self-pipe and a turn of the loop, and
        it was a tenth of paho's thread when made for every PUBACK)."""
        refused = getattr(reason, "is_failure", False)  # MQTT 5: a PUBACK can say no (0x87, 0x97, ...)
        self._acked_mids.append((mid, str(reason) if refused else None))
        if mid in self._wake_on:  # checked after the append: see submit
            self._call(self._take_acks)

    def _take_acks(self) -> None:
        acked = self._acked_mids
        while acked:
            self._acked(*acked.popleft())

    def _acked(self, mid: int, refusal: str | None) -> None:
        self._wake_on.discard(mid)
        batch = self._outstanding.pop(mid, None)
        if batch is None:
            return
        if refusal is None:
            batch.acked.add(mid)
        else:  # the event stays in the outbox; a refusal is not a delivery
            self.refused += 1
            log.debug("forward %s: the broker refused message %d: %s", self.name, mid, refusal)
        batch.left -= 1
        if batch.left <= 0:
            if not batch.done.done():
                batch.done.set_result(None)
        elif mid == batch.mids[-1]:  # the last came before others (a broker out of order): each wakes now
            self._wake_on.update(m for m in batch.mids if self._outstanding.get(m) is batch)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props: dict[str, str] = {}
        user = getattr(msg.properties, "UserProperty", None) if msg.properties is not None else None
        for key, value in user or ():
            props[key] = value
        topic = self._unmap(msg.topic)
        message = InboundMessage(topic, bytes(msg.payload), props.get(EVENT_ID), props.get(GATEWAY), props)
        self._call(self._inbound.offer, message)

    def map_topic(self, topic: str) -> str:
        for rule in self._settings.rewrite:
            if topic.startswith(rule.from_):
                topic = rule.to + topic[len(rule.from_):]
                break
        return self._settings.topic_prefix + topic

    def _unmap(self, topic: str) -> str:
        prefix = self._settings.topic_prefix
        if prefix and topic.startswith(prefix):
            topic = topic[len(prefix):]
        for rule in self._settings.rewrite:
            if topic.startswith(rule.to):
                return rule.from_ + topic[len(rule.to):]
        return topic

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        return await (await self.submit(batch))

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        """Publish ``batch`` now (paho queues beyond its in-flight window); the future counts the PUBACKs
        (see :class:`~gateway.forward.base.Pipelined`)."""
        client = self._client
        if client is None or not self._connected:
            raise DestinationUnavailableError(f"{self.name}: not connected")
        waiting = _Outstanding(asyncio.get_running_loop().create_future())
        mids: list[int] = []
        v5 = self._version == MQTTProtocolVersion.MQTTv5
        mapped = self._settings.topic_prefix or self._settings.rewrite
        for event in batch:
            properties = None
            if v5:
                properties = UserProperties([(EVENT_ID, event.event_id), self._gateway_pair],
                                            packed=utf8_pair(EVENT_ID, event.event_id) + self._gateway_packed)
            try:
                info = client.publish(self.map_topic(event.topic) if mapped else event.topic, event.payload,
                                      qos=self._settings.qos, properties=properties)
            except ValueError as exc:  # a topic MQTT cannot publish to (wildcards, too long)
                if not mids:
                    raise UnsendableEventError(event, str(exc)) from None
                break
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            # PUBACKs reach the loop only after this yields (_take_acks): none is missed
            self._outstanding[info.mid] = waiting
            mids.append(info.mid)
            self.sent += 1
        waiting.left = len(mids)
        waiting.mids = mids
        if mids:
            # The last PUBACK wakes the loop; if it came before this line, paho's thread did not know to
            # wake it, so the loop looks once itself (it appended the PUBACK before looking at _wake_on).
            self._wake_on.add(mids[-1])
            asyncio.get_running_loop().call_soon(self._take_acks)
        return asyncio.ensure_future(self._acknowledged(waiting))

    async def _acknowledged(self, waiting: _Outstanding) -> int:
        mids = waiting.mids
        try:
            if mids:
                with contextlib.suppress(TimeoutError, DestinationUnavailableError):
                    async with asyncio.timeout(self._settings.ack_timeout_s):
                        await waiting.done
        finally:
            self._take_acks()  # PUBACKs that came without waking the loop (the batch's last did not)
            for mid in mids:  # what did not come back is sent again from the outbox
                self._wake_on.discard(mid)
                if self._outstanding.get(mid) is waiting:
                    del self._outstanding[mid]
        acked = 0
        for mid in mids:  # how many from the start of the batch the broker acknowledged
            if mid not in waiting.acked:
                break
            acked += 1
        if acked == 0:
            raise DestinationUnavailableError(f"{self.name}: nothing acknowledged")
        self.acked += acked
        return acked

    async def inbound(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self._inbound.get()

    async def close(self) -> None:
        self._closing = True
        client = self._client
        if client is not None:
            if self._connected and (info := announce(client, self._presence, online=False)) is not None:
                await asyncio.to_thread(info.wait_for_publish, 2.0)  # a clean disconnect sends no will
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        with contextlib.suppress(Exception):
            self._set_connected(False)
