"""What every paho client of the gateway shares: TLS, the persistent session's CONNECT, and the
retained online/offline status (a birth message on connect, a last will for when the gateway vanishes).

Used by the MQTT bridge (:mod:`.destination`) and the external broker (gateway/broker/external.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True, slots=True)
class Presence:
    """The gateway's retained status on a broker: ``online`` once connected, ``offline`` as its last will
    (and published before a clean disconnect, where no will is sent)."""

    topic: str
    online: str = "online"
    offline: str = "offline"


@runtime_checkable
class Announces(Protocol):
    """A client of an MQTT broker that keeps the gateway's retained status there (the MQTT bridge)."""

    def announce_as(self, presence: Presence) -> None:
        """Use ``presence`` from the next connection on: birth message and last will."""


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """Verify the server against ``ca_file`` (default: the system's CAs); a client certificate if given."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def session_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Properties:
    """MQTT 5 CONNECT properties of a persistent session (and how many deliveries may await our PUBACK)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return properties


def set_will(client: mqtt.Client, presence: Presence | None) -> None:
    if presence is not None:
        client.will_set(presence.topic, presence.offline, qos=1, retain=True)


def announce(client: mqtt.Client, presence: Presence | None, *, online: bool) -> mqtt.MQTTMessageInfo | None:
    """Publish the retained status (from paho's thread on connect, or before a clean disconnect)."""
    if presence is None:
        return None
    return client.publish(presence.topic, presence.online if online else presence.offline, qos=1, retain=True)


def protocol_name(version: MQTTProtocolVersion) -> str:
    return "5" if version == MQTTProtocolVersion.MQTTv5 else "3.1.1"
