"""MQTT bridge to a remote broker with paho-mqtt 2.x.

MQTT 5 where the remote supports it (falling back to 3.1.1 when it refuses the protocol level),
TLS with client certificates, a persistent session (so the remote queues our downlink while we are
away), QoS 1 with every event acknowledged by PUBACK, and topic prefix/rewrite rules. Under MQTT 5
each event carries its id and the originating gateway as user properties.
"""

from __future__ import annotations

import asyncio
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
    DestinationUnavailableError,
    InboundMessage,
    OutboundEvent,
    UnsendableEventError,
    acknowledged_prefix,
)
from gateway.forward.mqtt.connect import Presence, announce, set_will, tls_context
from gateway.forward.mqtt.settings import RewriteRule
from pipeline.queue import DropOldestQueue

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on
EVENT_ID = "event-id"
GATEWAY = "iotgw-gateway"
MAX_BATCH = 10_000  # the largest batch_size a [[forward]] may set
CONNACK_TIMEOUT_S = 5.0


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
    ack_timeout_s: float = 10.0
    inbound_queue: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)


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
        self._acks: dict[int, asyncio.Future[None]] = {}
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
        client.max_inflight_messages_set(100)
        # paho counts in-flight messages as queued; the outbox hands over at most one batch at a time,
        # so this bound only stops paho from buffering beyond that (the outbox is the buffer).
        client.max_queued_messages_set(MAX_BATCH)
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
        if self._settings.subscribe:
            client.subscribe([(f, int(self._settings.qos)) for f in self._settings.subscribe])
        announce(client, self._presence, online=True)
        self._call(self._set_connected, True)

    def _reconnect_as_311(self) -> None:
        old = self._client
        if old is not None:
            old.disconnect()
            # loop_stop joins paho's thread: never from that thread itself, and never block the loop on it
            threading.Thread(target=old.loop_stop, daemon=True).start()
        self._connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
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
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(DestinationUnavailableError(f"{self.name}: connection lost"))
            self._acks.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        refused = getattr(reason, "is_failure", False)  # MQTT 5: a PUBACK can say no (0x87, 0x97, ...)
        self._call(self._acked, mid, str(reason) if refused else None)

    def _acked(self, mid: int, refusal: str | None) -> None:
        future = self._acks.pop(mid, None)
        if future is None or future.done():
            return
        if refusal is None:
            future.set_result(None)
        else:  # the event stays in the outbox; a refusal is not a delivery
            self.refused += 1
            future.set_exception(DestinationUnavailableError(f"{self.name}: the broker refused: {refusal}"))

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
        client = self._client
        if client is None or not self._connected:
            raise DestinationUnavailableError(f"{self.name}: not connected")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        v5 = self._version == MQTTProtocolVersion.MQTTv5
        for event in batch:
            properties = None
            if v5:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.UserProperty = [(EVENT_ID, event.event_id), (GATEWAY, self._settings.gateway_id)]
            try:
                info = client.publish(self.map_topic(event.topic), event.payload, qos=self._settings.qos,
                                      properties=properties)
            except ValueError as exc:  # a topic MQTT cannot publish to (wildcards, too long)
                if not futures:
                    raise UnsendableEventError(event, str(exc)) from None
                break
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            future = loop.create_future()
            if info.is_published():
                future.set_result(None)
            else:
                self._acks[info.mid] = future
            futures.append(future)
            self.sent += 1
        acked = await acknowledged_prefix(self.name, futures, self._settings.ack_timeout_s, ())
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
