"""The forward destinations of the config, as one part: the forwarder that holds their outboxes
(gateway/forward/), built from config, changed by a reload, and absent while none is configured.

Ingest asks :meth:`Destinations.wants` and :meth:`Destinations.route` for every broker message; the
flow calls :meth:`Destinations.flush` before the journal lets a batch go. What comes back from a
backbone goes to ``on_inbound`` (the downlink), and what a full outbox drops to ``on_drop`` (the
gateway's own alerts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

from gateway.config import ForwardSettings, GatewayConfig, forward_topics
from gateway.config.reload import ReloadPlan
from gateway.forward.forwarder import Forwarder, InboundHandler, Route
from gateway.forward.mqtt.connect import Announces, Presence
from gateway.forward.outbox import Limits
from gateway.forward.registry import build_destination
from gateway.status import ForwardStatus
from pipeline.topics import TopicTemplate, compile_filter


def forward_filters(config: GatewayConfig) -> list[tuple[str, str]]:
    """(consumer, filter) for every forward destination: the catalog lists them as consumers."""
    return [(f"forward:{f.name}", topic) for f in config.forward for topic in f.topics]


class Destinations:
    """``async with Destinations(...)``: the configured destinations sending until the block ends."""

    def __init__(
        self, config: GatewayConfig, template: TopicTemplate, *, on_inbound: InboundHandler,
        on_drop: Callable[[str, int], None],
    ) -> None:
        self._data_dir = config.storage.data_dir
        self._commit_interval_s = config.storage.commit_interval_s
        self._gateway_id = config.effective_gateway_id
        self._presence = Presence(config.status_topic, config.liveness.online, config.liveness.offline)
        self._template = template
        self._on_inbound = on_inbound
        self._on_drop = on_drop
        self._stack = AsyncExitStack()
        self.forwarder: Forwarder | None = self._forwarder(config.forward) if config.forward else None

    def _route(self, f: ForwardSettings) -> Route:
        destination = build_destination(f, self._gateway_id, self._template)
        if isinstance(destination, Announces):  # an MQTT broker: the gateway's online/offline status there too
            destination.announce_as(self._presence)
        return Route(destination,
                     tuple(compile_filter(t) for t in forward_topics(f, self._template)),
                     Limits(f.max_bytes, f.when_full), f.batch_size, f.replay == "fresh_first")

    def _forwarder(self, settings: list[ForwardSettings]) -> Forwarder:
        return Forwarder(self._data_dir, [self._route(f) for f in settings], gateway_id=self._gateway_id,
                         on_inbound=self._on_inbound, on_drop=self._on_drop, commit_interval_s=self._commit_interval_s)

    async def __aenter__(self) -> Self:
        if self.forwarder is not None:
            await self._stack.enter_async_context(self.forwarder)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def wants(self, topic: str, origin: str | None) -> bool:
        return self.forwarder is not None and self.forwarder.wants(topic, origin)

    async def route(self, topic: str, payload: bytes, *, event_id: str, key: str, origin: str | None
                    ) -> list[asyncio.Future[None]]:
        """Queue a broker message in the outbox of every destination that forwards its topic."""
        if self.forwarder is None:
            return []
        return await self.forwarder.route(topic, payload, event_id=event_id, key=key, origin=origin)

    async def flush(self) -> None:
        """Commit what was routed to the outboxes, now."""
        if self.forwarder is not None:
            await self.forwarder.flush()

    async def committed(self) -> None:
        """Until what was routed so far is durable in the outboxes (on their commit cadence)."""
        if self.forwarder is not None:
            await self.forwarder.committed()

    async def reload(self, plan: ReloadPlan, config: GatewayConfig) -> None:
        """Stop removed and changed destinations, start changed and added ones."""
        settings = {f.name: f for f in config.forward}
        if self.forwarder is None:
            if not settings:
                return
            self.forwarder = await self._stack.enter_async_context(self._forwarder([]))
        for name in (*plan.destinations_removed, *plan.destinations_changed):
            await self.forwarder.remove(name)
        for name in (*plan.destinations_changed, *plan.destinations_added):
            await self.forwarder.add(self._route(settings[name]))

    def status(self) -> ForwardStatus:
        if self.forwarder is None:
            return ForwardStatus()
        return ForwardStatus.model_validate(self.forwarder.stats())
