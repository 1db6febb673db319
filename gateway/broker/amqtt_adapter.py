"""Everything the gateway takes from amqtt, in one module: its MQTT 3.1.1 CONNECT reader.

amqtt 0.12.1 is pinned (pyproject.toml). The gateway does not run amqtt's ``Broker``: listeners,
authentication, sessions, routing, retained messages and every decision about a client are the
gateway's own (gateway/broker/core.py). amqtt reads a connection's CONNECT; the gateway reads the later
packets (gateway/broker/packets.py) and writes every packet itself (gateway/broker/wire.py), so amqtt
never writes except to refuse a CONNECT it cannot accept (a protocol level other than 4, an empty
client id with CleanSession 0).

What this module relies on in amqtt is listed in :data:`PINNED`; ``tests/test_amqtt_adapter.py``
fails, naming the class and the name, when an amqtt release renames or removes one of them.
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from gateway.broker.core import ConnectRequest, Will
from gateway.broker.firewall import PacketFirewall
from gateway.broker.packets import PacketChannel
from gateway.broker.wire import Transport

log = logging.getLogger(__name__)

# Every amqtt name the adapter overrides or calls, by the class that defines it. Called:
# init_from_connect. Read: the Session's fields (set by init_from_connect from the CONNECT).
PINNED: dict[type, tuple[str, ...]] = {
    BrokerProtocolHandler: ("init_from_connect",),
}
SESSION_FIELDS = ("client_id", "clean_session", "will_flag", "will_topic", "will_message", "will_qos", "will_retain",
                  "username", "password", "keep_alive")


class _NoPlugins:
    """What the handler tells about every packet it reads; the gateway loads no amqtt plugin."""

    async def fire_event(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_PLUGINS = _NoPlugins()


class _Handler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's reader of a CONNECT. Its loop over the later packets is never started: the gateway reads
    those itself (gateway/broker/packets.py)."""


class AmqttProtocol:
    """How the broker reads MQTT (gateway/broker/core.py ``Protocol``)."""

    async def read_connect(self, reader: PacketFirewall, transport: Transport
                           ) -> tuple[ConnectRequest, PacketChannel] | None:
        """The connection's CONNECT, or None when it sent none that can be accepted (amqtt has then
        answered with a refusing CONNACK where the protocol has one)."""
        try:
            _, session = await _Handler.init_from_connect(reader, transport, _NO_PLUGINS)
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
        return request, PacketChannel(reader)
