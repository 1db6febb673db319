"""Everything the gateway takes from amqtt, in one module: its MQTT 3.1.1 CONNECT reader and the
per-connection protocol handler that parses a client's packets (``BrokerProtocolHandler``).

amqtt 0.12.1 is pinned (pyproject.toml). The gateway does not run amqtt's ``Broker``: listeners,
authentication, sessions, routing, retained messages and every decision about a client are the
gateway's own (gateway/broker/core.py). amqtt reads a connection's CONNECT, then its later packets;
each packet goes to the gateway's :class:`~gateway.broker.core.PacketSink` and nowhere else. The
gateway writes every packet itself (gateway/broker/wire.py), through the same transport amqtt was
given, so amqtt never writes except to refuse a CONNECT it cannot accept (a protocol level other than
4, an empty client id with CleanSession 0).

What this module relies on in amqtt is listed in :data:`PINNED`; ``tests/test_amqtt_adapter.py``
fails, naming the class and the name, when an amqtt release renames or removes one of them.
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import Session

from gateway.broker.core import ConnectRequest, PacketSink, Will
from gateway.broker.firewall import PacketFirewall
from gateway.broker.wire import Transport

log = logging.getLogger(__name__)

# Every amqtt name the adapter overrides or calls, by the class that defines it. Overridden: the
# handle_* methods of _Handler. Called: init_from_connect, attach, start, stop. Read: the packets'
# fields and the Session's (set by init_from_connect from the CONNECT).
PINNED: dict[type, tuple[str, ...]] = {
    BrokerProtocolHandler: ("init_from_connect", "handle_subscribe", "handle_unsubscribe", "handle_disconnect",
                            "handle_connection_closed", "handle_connect", "handle_pingreq"),
    ProtocolHandler: ("attach", "start", "stop", "_reader_loop", "handle_publish", "handle_puback", "handle_pubrec",
                      "handle_pubrel", "handle_pubcomp"),
}
SESSION_FIELDS = ("client_id", "clean_session", "will_flag", "will_topic", "will_message", "will_qos", "will_retain",
                  "username", "password", "keep_alive")


class _NoPlugins:
    """What the handler tells about every packet it reads; the gateway loads no amqtt plugin."""

    async def fire_event(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_PLUGINS = _NoPlugins()


class _Handler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's reader of one connection's packets, handing each one to the gateway's sink."""

    sink: PacketSink | None = None

    async def handle_publish(self, publish_packet: Any) -> None:
        if self.sink is not None:
            self.sink.publish(publish_packet.topic_name or "", bytes(publish_packet.data or b""),
                              qos=publish_packet.qos or 0, retain=bool(publish_packet.retain_flag),
                              packet_id=publish_packet.packet_id, dup=bool(publish_packet.dup_flag))

    async def handle_pubrel(self, pubrel: Any) -> None:
        if self.sink is not None:
            self.sink.pubrel(pubrel.packet_id)

    async def handle_puback(self, puback: Any) -> None:
        if self.sink is not None:
            self.sink.acknowledged("puback", puback.packet_id)

    async def handle_pubrec(self, pubrec: Any) -> None:
        if self.sink is not None:
            self.sink.acknowledged("pubrec", pubrec.packet_id)

    async def handle_pubcomp(self, pubcomp: Any) -> None:
        if self.sink is not None:
            self.sink.acknowledged("pubcomp", pubcomp.packet_id)

    async def handle_subscribe(self, subscribe: Any) -> None:
        if self.sink is not None:
            self.sink.subscribe(subscribe.variable_header.packet_id, list(subscribe.payload.topics))

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        if self.sink is not None:
            self.sink.unsubscribe(unsubscribe.variable_header.packet_id, list(unsubscribe.payload.topics))

    async def handle_pingreq(self, pingreq: Any) -> None:
        if self.sink is not None:
            self.sink.ping()

    async def handle_disconnect(self, disconnect: Any) -> None:
        if self.sink is not None:
            self.sink.disconnect()

    async def handle_connect(self, connect: Any) -> None:
        if self.sink is not None:  # a second CONNECT (the firewall closes the connection before this)
            self.sink.closed()

    async def handle_connection_closed(self) -> None:
        if self.sink is not None:
            self.sink.closed()


class AmqttChannel:
    """One connection after its CONNECT: amqtt's handler reads its packets into a sink."""

    def __init__(self, handler: _Handler, session: Session, reader: PacketFirewall, transport: Transport) -> None:
        self._handler = handler
        self._session = session
        self._reader = reader
        self._transport = transport

    async def start(self, sink: PacketSink) -> None:
        self._handler.sink = sink
        self._session.keep_alive = 0  # the firewall keeps the time (1.5 x the client's keep-alive)
        self._handler.attach(self._session, self._reader, self._transport)
        await self._handler.start()

    async def stop(self) -> None:
        self._handler.sink = None
        self._reader.close()
        try:
            await self._handler.stop()
        except (AMQTTError, MQTTError, OSError) as exc:
            log.debug("stopping a client's reader: %s", exc)


class AmqttProtocol:
    """How the broker reads MQTT (gateway/broker/core.py ``Protocol``)."""

    async def read_connect(self, reader: PacketFirewall, transport: Transport
                           ) -> tuple[ConnectRequest, AmqttChannel] | None:
        """The connection's CONNECT, or None when it sent none that can be accepted (amqtt has then
        answered with a refusing CONNACK where the protocol has one)."""
        try:
            handler, session = await _Handler.init_from_connect(reader, transport, _NO_PLUGINS)
        except (AMQTTError, MQTTError, NoDataError, ValueError) as exc:  # ValueError: a password amqtt cannot decode
            log.debug("no usable CONNECT: %s", exc)
            return None
        will = None
        if session.will_flag:
            will = Will(session.will_topic or "", bytes(session.will_message or b""), session.will_qos or 0,
                        bool(session.will_retain))
        request = ConnectRequest(
            client_id=session.client_id, clean=bool(session.clean_session), username=session.username,
            password=session.password, keep_alive=session.keep_alive or 0, will=will,
        )
        return request, AmqttChannel(handler, session, reader, transport)
