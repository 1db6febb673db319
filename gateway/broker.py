"""The embedded MQTT broker (amqtt) and the tap that feeds the pipeline in-process.

Every message published to the broker, by a TCP client or by an in-process driver, passes
through :meth:`_TappedBroker._broadcast_message`. Messages whose topic matches the tap filter
(the ``raw`` stage) are put on the pipeline's bounded queue there. When that queue is full the put
waits, and every client's socket reader waits too, so a slow pipeline slows ingestion instead of
growing memory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.session import Session

from gateway.config import BrokerSettings
from gateway.errors import GatewayError, PortInUseError
from pipeline.queue import BatchQueue
from pipeline.stage import RawMessage
from pipeline.topics import TopicFilter

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.02


class _GatedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A client socket reader that pauses while the pipeline is full or the broker is draining."""

    def __init__(self, inner: ReaderAdapter, broker: _TappedBroker) -> None:
        self._inner = inner
        self._broker = broker

    async def read(self, n: int = -1) -> bytes:
        await self._broker.wait_read_allowed()
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _TappedBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    def __init__(self, config: dict[str, Any], tap: TopicFilter, queue: BatchQueue[RawMessage]) -> None:
        super().__init__(config)
        self._tap = tap
        self._queue = queue
        self.in_tap = 0
        self.draining = asyncio.Event()
        self.tapped = 0

    async def wait_read_allowed(self) -> None:
        if self.draining.is_set():
            await asyncio.Future()  # read nothing more; the connection ends with the broker
        await self._queue.wait_for_room()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        await self._client_connected(listener_name, _GatedReader(StreamReaderAdapter(reader), self),
                                     StreamWriterAdapter(writer))

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        await super()._broadcast_message(session, topic, data, force_qos)
        if topic is None or data is None or not self._tap.matches(topic):
            return
        message = RawMessage(topic, bytes(data), session.client_id if session else None, datetime.now(UTC))
        self.in_tap += 1
        try:
            await self._queue.put(message)
            self.tapped += 1
        finally:
            self.in_tap -= 1

    def pending_deliveries(self) -> int:
        """Messages read from clients (and maybe acknowledged) that have not reached the queue yet."""
        queued = sum(int(session.delivered_message_queue.qsize()) for session, _ in self._sessions.values())
        return self.in_tap + queued

    def bound_port(self) -> int:
        server = self._servers["default"].instance
        sockets = getattr(server, "sockets", None) or ()
        if not sockets:
            return 0
        port: int = sockets[0].getsockname()[1]
        return port

    def stop_listening(self) -> None:
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()


class _HideStartupTraceback(logging.Filter):
    """amqtt logs a traceback when a listener cannot bind; we report that ourselves, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "startup failed" not in record.getMessage()


class EmbeddedBroker:
    """``async with EmbeddedBroker(...) as broker``: listening on exit of ``__aenter__``."""

    def __init__(
        self, settings: BrokerSettings, tap: TopicFilter, queue: BatchQueue[RawMessage], *, port_option: str
    ) -> None:
        self._settings = settings
        self._port_option = port_option
        self._tap = tap
        self._queue = queue
        self._broker: _TappedBroker | None = None
        self.port = settings.port

    async def __aenter__(self) -> Self:
        self._broker = _TappedBroker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self._settings.host}:{self._settings.port}"}},
                # Name the plugins: amqtt's defaults (packet logger, $SYS...) cost a third of throughput.
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            },
            self._tap,
            self._queue,
        )
        quiet = _HideStartupTraceback()
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(quiet)
        try:
            await self._broker.start()
        except BrokerError as exc:
            if _is_addr_in_use(exc):
                raise PortInUseError(self._settings.host, self._settings.port, self._port_option) from None
            raise GatewayError(f"the MQTT broker did not start: {exc}") from exc
        finally:
            amqtt_log.removeFilter(quiet)
        self.port = self._broker.bound_port() or self._settings.port
        log.info("MQTT broker listening on %s:%d", self._settings.host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._running.shutdown()

    @property
    def _running(self) -> _TappedBroker:
        if self._broker is None:
            raise GatewayError("the broker is not running")
        return self._broker

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish in-process, as if a client had: subscribers and the tap see it."""
        await self._running.internal_message_broadcast(topic, payload, qos)

    def pending_deliveries(self) -> int:
        """Messages the broker has read from clients that are not on the pipeline's queue yet."""
        return self._broker.pending_deliveries() if self._broker else 0

    @property
    def tapped(self) -> int:
        return self._broker.tapped if self._broker else 0

    async def drain(self, timeout_s: float) -> int:
        """Stop reading from clients, then wait until what was read has reached the queue.

        Returns how many messages were still pending at the deadline (0 when fully drained).
        """
        broker = self._running
        broker.draining.set()
        broker.stop_listening()
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(_DRAIN_POLL_S)  # let packets already read finish their handling
        # amqtt's session queues signal nothing when they empty: poll them.
        while (pending := broker.pending_deliveries()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_S)
        return pending


def _is_addr_in_use(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
