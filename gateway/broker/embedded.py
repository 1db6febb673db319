"""The embedded MQTT broker, as the rest of the gateway sees it: ``async with EmbeddedBroker(...)``.

It listens (TCP, TLS, WebSocket, secure WebSocket; gateway/broker/listeners.py), and every message
published to it, by a client or in-process, goes through :class:`gateway.broker.core.BrokerCore`:
to the subscribed sessions, and to the gateway's ingest (journal, pipeline queue, outboxes). When the
pipeline's queue is full the ingest waits, and every client's reads wait too, so a slow pipeline slows
ingestion instead of growing memory.

How it falls short of nothing in MQTT 3.1.1 that the gateway needs, and where each part lives:
sessions, offline queues and redelivery (gateway/broker/sessions.py), retained messages (gateway/
broker/retained.py), malformed packets and deadlines (gateway/broker/firewall.py), passwords and ACLs
(gateway/broker/auth.py), the decisions and bounds (gateway/broker/core.py), reading packets (gateway/
broker/packets.py). amqtt reads only the CONNECT, behind gateway/broker/amqtt_adapter.py.

Retained messages of the gateway's own (Home Assistant's discovery, gateway/homeassistant.py) go in
through :meth:`EmbeddedBroker.publish_retained`, without a client. Given a ``presence``, the broker keeps
the gateway's status there too: ``online`` once it listens, ``offline`` when the gateway stops cleanly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gateway.broker.amqtt_adapter import AmqttProtocol
from gateway.broker.auth import BrokerSecurity
from gateway.broker.core import LIMITS, BrokerCore, Ingest, Resend, Traffic
from gateway.broker.listeners import Listeners
from gateway.broker.sessions import Sessions
from gateway.config import BrokerSettings
from gateway.errors import GatewayError, PortInUseError
from gateway.forward.mqtt.connect import Presence
from pipeline.retry import cancel_and_wait

__all__ = ["EmbeddedBroker", "Ingest", "Resend", "Traffic"]

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.02


class EmbeddedBroker:
    """``async with EmbeddedBroker(...) as broker``: listening on exit of ``__aenter__``."""

    def __init__(
        self, settings: BrokerSettings, ingest: Ingest, room: Callable[[], Awaitable[None]], *, port_option: str,
        traffic: Traffic | None = None,
        data_dir: Path | None = None,
        presence: Presence | None = None,
    ) -> None:
        """``data_dir`` holds the persistent MQTT sessions and retained messages (None: in memory, for
        this process only); ``presence``: where the gateway's retained status goes (None: nowhere)."""
        self._settings = settings
        self._traffic = traffic
        self._port_option = port_option
        self._ingest = ingest
        self._room = room
        self._core: BrokerCore | None = None
        self._listeners: Listeners | None = None
        self.sessions = Sessions(settings, data_dir)
        self.port = settings.port
        self.security: BrokerSecurity | None = None
        self._presence = presence
        self._on_started: list[Callable[[], Awaitable[None]]] = []
        self._callbacks: set[asyncio.Future[None]] = set()
        self._offline = False

    async def __aenter__(self) -> Self:
        self.security = BrokerSecurity(self._settings)  # a ConfigError when [broker] is unusable
        listeners = Listeners(self._settings)  # a ConfigError when a certificate cannot be loaded
        restored = await self.sessions.open()
        core = BrokerCore(self._settings, self.security, self.sessions, reader=AmqttProtocol(), ingest=self._ingest,
                          room=self._room, traffic=self._traffic)
        core.restore(restored)
        try:
            await listeners.start(core.accept)
        except OSError as exc:
            await listeners.close()
            await self.sessions.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(self._settings.host, self._settings.port, self._port_option) from None
            raise GatewayError(f"the MQTT broker did not start: {exc}") from exc
        core.start()
        self._core, self._listeners = core, listeners
        self.port = listeners.bound_port() or self._settings.port
        log.info("MQTT broker listening on %s:%d", self._settings.host, self.port)
        for where in listeners.names[1:]:
            log.info("MQTT broker listening (%s)", where)
        if self._presence is not None:
            await self.publish_retained(self._presence.topic, self._presence.online.encode())
        for callback in self._on_started:
            task = asyncio.ensure_future(callback())  # each logs its own failure
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await cancel_and_wait(*self._callbacks)
            if self._listeners is not None:
                self._listeners.stop_listening()
            if self._core is not None:
                await self._say_offline()
                await self._core.close()
            if self._listeners is not None:
                await self._listeners.close()
        finally:
            await self.sessions.close()

    @property
    def _running(self) -> BrokerCore:
        if self._core is None:
            raise GatewayError("the broker is not running")
        return self._core

    def stats(self) -> dict[str, Any]:
        """Connections, sessions (queued, dropped per client), retained messages, bounds hit, and
        connections closed for bad input, by reason."""
        core = self._core
        return {
            "connections": core.limits.open if core else 0,
            "sessions": self.sessions.stats(),
            "retained": core.retained.stats() if core else {"messages": 0, "bytes": 0},
            "limits": core.limit_counts() if core else dict.fromkeys(LIMITS, 0),
            "offences": dict(core.offences) if core else {},
        }

    async def publish(
        self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None, qos: int = 0
    ) -> None:
        """Publish in-process, as if a client had: subscribers and the ingest see it. ``origin`` names
        where it came from (None: this gateway) and ``event_id`` keeps the id it already has. No write
        check: the gateway's drivers and pipeline publish where they must."""
        await self._running.publish(topic, payload, qos, origin=origin, event_id=event_id)

    async def publish_many(self, topic: str, payloads: Sequence[bytes], event_ids: Sequence[str]) -> None:
        """Events of the gateway's own on one topic, each as :meth:`publish` takes it."""
        for payload, event_id in zip(payloads, event_ids, strict=True):
            await self._running.publish(topic, payload, 0, event_id=event_id)

    async def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Retain a message of the gateway's own (QoS 1; empty: clear the topic) and deliver it to the
        subscribers, without the ingest; True once it is durable, False when the broker is not running or
        its retained messages are at their bound (``max_retained_messages``, ``max_retained_bytes``)."""
        core = self._core
        if core is None:
            return False
        refused = core.retained.refused
        futures = core.retain(topic, payload, 1)
        kept = core.retained.refused == refused  # now: another message refused while this one is written is not it
        if futures:
            await asyncio.gather(*futures)
        return kept

    def when_connected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` once the broker listens (it has no connection to lose and get back)."""
        self._on_started.append(callback)

    async def _say_offline(self) -> None:
        """The gateway stops cleanly: its retained status says so (once; no-op without a ``presence``)."""
        if self._presence is None or self._offline or self._core is None:
            return
        self._offline = True
        try:
            await self.publish_retained(self._presence.topic, self._presence.offline.encode())
        except Exception as exc:  # a failing disk: the stop goes on
            log.warning("the gateway's offline status was not retained: %s", exc)

    def has_subscriber(self, topic: str) -> bool:
        """Whether any session (connected, or persistent and away) has a filter matching ``topic``."""
        return self._running.has_subscriber(topic)

    def pending_deliveries(self) -> int:
        """Messages the broker has read from clients that are not on the pipeline's queue yet."""
        return self._core.pending_deliveries() if self._core else 0

    @property
    def serving(self) -> bool:
        """Started and taking clients on every listener (false before start, while draining for a stop,
        or if a listener closed): what ``/readyz`` and the systemd watchdog check."""
        core, listeners = self._core, self._listeners
        if core is None or listeners is None or core.draining.is_set():
            return False
        return listeners.serving

    @property
    def tapped(self) -> int:
        return self._core.tapped if self._core else 0

    @property
    def clients(self) -> int:
        """Connected clients."""
        return len(self._core.connections) if self._core else 0

    async def drain(self, timeout_s: float) -> int:
        """Stop reading from clients, then wait until what was read has reached the queue.

        Returns how many messages were still pending at the deadline (0 when fully drained).
        """
        core = self._running
        await self._say_offline()  # while the clients are still connected to read it
        core.draining.set()
        if self._listeners is not None:
            self._listeners.stop_listening()
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(_DRAIN_POLL_S)  # let packets already read finish their handling
        while (pending := core.pending_deliveries()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_S)
        return pending
