"""Retained messages [MQTT-3.3.1-5]: the last message published with RETAIN on each topic, for the
subscriptions made later; bounded and persisted.

Bounds (``[broker]``): ``max_retained_messages`` topics and ``max_retained_bytes`` (topics and
payloads together). A retained message that would pass either is not retained (it is still delivered
to the subscribers of the moment) and is counted; when it would have replaced an older one, the older
one goes too, so a new subscriber never gets a value the publisher has since replaced. A message with
an empty payload removes the topic's retained message [MQTT-3.3.1-10], [MQTT-3.3.1-11].

They live in ``sessions.sqlite3`` beside the persistent sessions, written by the same group commit; a
QoS 1 PUBACK (QoS 2 PUBREC) to the publisher waits for that commit, so an acknowledged retained message
survives a restart or ``kill -9``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.broker.sessions import SessionStore
from gateway.config import BrokerSettings
from pipeline.topics import mqtt_filter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retained:
    payload: bytes
    qos: int


class RetainedStore:
    def __init__(self, settings: BrokerSettings, store: SessionStore) -> None:
        self._max_messages = settings.max_retained_messages
        self._max_bytes = settings.max_retained_bytes
        self._store = store
        self.messages: dict[str, Retained] = {}
        self.bytes = 0
        self.refused = 0
        self._full = False

    def restore(self, rows: dict[str, tuple[bytes, int]]) -> None:
        for topic, (payload, qos) in rows.items():
            self.messages[topic] = Retained(payload, qos)
            self.bytes += len(topic) + len(payload)

    def set(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[None] | None:
        """Retain (or with an empty payload, clear) ``topic``'s message; the future resolves once that
        is on disk."""
        old = self.messages.get(topic)
        freed = len(topic) + len(old.payload) if old is not None else 0
        if not payload:
            if old is None:
                return None
            self._drop(topic, freed)
            return self._store.submit("unretain", text=topic)
        size = len(topic) + len(payload)
        if (old is None and len(self.messages) >= self._max_messages) or self.bytes - freed + size > self._max_bytes:
            self.refused += 1
            if not self._full:
                self._full = True
                log.warning("retained messages: the bound (%d topics, %d bytes) is reached; further retained messages "
                            "are delivered but not retained, and counted", self._max_messages, self._max_bytes)
            if old is None:
                return None
            self._drop(topic, freed)  # never keep a value its publisher has replaced
            return self._store.submit("unretain", text=topic)
        self.messages[topic] = Retained(payload, qos)
        self.bytes += size - freed
        return self._store.submit("retain", text=topic, payload=payload, qos=qos)

    def _drop(self, topic: str, size: int) -> None:
        del self.messages[topic]
        self.bytes -= size
        if self._full and len(self.messages) < self._max_messages and self.bytes < self._max_bytes:
            self._full = False

    def matching(self, topic_filter: str) -> Iterator[tuple[str, Retained]]:
        """The retained messages a new subscription to ``topic_filter`` gets."""
        f = mqtt_filter(topic_filter)
        if f.is_exact:
            found = self.messages.get(topic_filter)
            if found is not None:
                yield topic_filter, found
            return
        for topic, message in list(self.messages.items()):
            if f.matches(topic):
                yield topic, message

    def stats(self) -> dict[str, int]:
        return {"messages": len(self.messages), "bytes": self.bytes}
