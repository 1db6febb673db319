"""The broker's listeners: the plain TCP one on ``[broker] host``/``port``, and each
``[[broker.listeners]]`` (tcp, tls, ws, wss). Every connection, whatever its listener, is handed to
the same callback (``BrokerCore.accept``) with a byte source and a transport (gateway/broker/wire.py),
so the packet firewall, the connection bounds and the deadlines apply to WebSocket clients as to TCP
ones. TLS and WebSocket handshakes must finish within ``connect_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve

from gateway.broker.auth import listener_ssl_context
from gateway.broker.firewall import Source
from gateway.broker.wire import StreamTransport, Transport, WebSocketSource, WebSocketTransport
from gateway.config import BrokerSettings

log = logging.getLogger(__name__)
Accept = Callable[[Source, Transport], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Listener:
    kind: str  # tcp | tls | ws | wss
    host: str
    port: int
    ssl: ssl.SSLContext | None

    @property
    def name(self) -> str:
        return f"{self.kind} {self.host}:{self.port}"


class _QuietHandshakes(logging.Filter):
    """websockets logs each failed opening handshake (a port scan, a client that gave up); the broker's
    counters say what matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "opening handshake failed" not in record.getMessage()


class Listeners:
    def __init__(self, settings: BrokerSettings) -> None:
        """Checks what can be checked before binding: a TLS certificate that cannot be loaded is a
        ConfigError naming the setting."""
        self._settings = settings
        plan = [_Listener("tcp", settings.host, settings.port, None)]
        for i, listener in enumerate(settings.listeners):
            context = None
            if listener.type in ("tls", "wss"):
                tls = listener.tls or settings.tls
                assert tls is not None  # BrokerSettings checks this
                context = listener_ssl_context(tls, f"broker.listeners[{i}].tls" if listener.tls else "broker.tls")
            plan.append(_Listener(listener.type, listener.host or settings.host, listener.port, context))
        self._plan = plan
        self._servers: list[asyncio.Server | WebSocketServer] = []
        self._stopped = False
        self._quiet = _QuietHandshakes()

    @property
    def names(self) -> list[str]:
        return [listener.name for listener in self._plan]

    async def start(self, accept: Accept) -> None:
        """Bind every listener (an OSError when one cannot be bound)."""
        timeout = self._settings.connect_timeout_s
        logging.getLogger("websockets.server").addFilter(self._quiet)
        for listener in self._plan:
            if listener.kind in ("tcp", "tls"):
                async def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    await accept(reader, StreamTransport(writer))

                self._servers.append(await asyncio.start_server(
                    on_stream, listener.host, listener.port, ssl=listener.ssl, reuse_address=True,
                    ssl_handshake_timeout=timeout if listener.ssl else None))
            else:
                async def on_websocket(ws: ServerConnection) -> None:
                    await accept(WebSocketSource(ws), WebSocketTransport(ws))

                self._servers.append(await serve(
                    on_websocket, listener.host, listener.port, ssl=listener.ssl, subprotocols=["mqtt"],  # type: ignore[list-item]
                    max_size=self._settings.max_packet_bytes, open_timeout=timeout, ping_interval=None,
                    compression=None))

    def bound_port(self) -> int:
        """The port the plain TCP listener got (the configured one, or the system's pick for port 0)."""
        sockets: Any = self._servers[0].sockets if self._servers else ()
        return int(sockets[0].getsockname()[1]) if sockets else 0

    @property
    def serving(self) -> bool:
        return not self._stopped and len(self._servers) == len(self._plan) and all(
            s.is_serving() for s in self._servers)

    def stop_listening(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in self._servers:
            if isinstance(server, WebSocketServer):
                server.close(close_connections=False)  # the broker ends its connections itself
            else:
                server.close()

    async def close(self) -> None:
        self.stop_listening()
        for server in self._servers:
            if isinstance(server, WebSocketServer):
                await server.wait_closed()
        self._servers = []
        logging.getLogger("websockets.server").removeFilter(self._quiet)
