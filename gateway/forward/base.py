"""What every destination is. Small on purpose: the outbox does the bookkeeping (durability,
bounds, order, retries); a destination only connects, sends a batch and says how much of it the
far side acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.errors import GatewayError


class DestinationUnavailableError(GatewayError):
    """The destination cannot take events now (down, refusing, timing out): retry later."""


class DestinationConfigError(DestinationUnavailableError):
    """The far side refuses for a reason only a configuration change cures (no JetStream stream
    captures the subject, say); the message says what is wrong and how to fix it. Retried like any
    unavailability (the fix may be made on the far side), logged once and reported in the stats and
    ``/readyz`` until a send succeeds."""


class UnsendableEventError(GatewayError):
    """This event can never be sent to this destination (its topic has no form there, say). The
    forwarder removes it from the outbox as a counted, alerted drop instead of retrying forever."""

    def __init__(self, event: OutboundEvent, reason: str) -> None:
        super().__init__(f"event {event.event_id} on {event.topic!r}: {reason}")
        self.event = event


@dataclass(frozen=True, slots=True)
class OutboundEvent:
    """One event waiting in an outbox."""

    seq: int  # position in the outbox: the send order
    event_id: str  # ULID; sent along so the far side can deduplicate
    topic: str  # the local (embedded broker) topic
    key: str  # the device id: the unit of ordering ("" when unknown)
    payload: bytes
    created_ms: int


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message a destination received from the backbone (downlink commands, mesh events)."""

    topic: str  # already mapped back to a local topic
    payload: bytes
    event_id: str | None = None
    origin_gateway: str | None = None  # the gateway that first published it, when the backbone says
    properties: dict[str, str] = field(default_factory=dict)


class Destination(Protocol):
    name: str

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None:
        """Begin connecting (in the background; never raises for a peer that is down)."""

    async def close(self) -> None: ...

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        """Send in order; return how many from the start of ``batch`` the far side acknowledged.

        Raises :class:`DestinationUnavailableError` when nothing could be sent.
        """
        ...

    def inbound(self) -> AsyncIterator[InboundMessage]:
        """Messages from the backbone on the destination's subscriptions, until closed."""
        ...


PIPELINE_DEPTH = 3  # batches a Pipelined destination has on the way at most


@runtime_checkable
class Pipelined(Protocol):
    """An optional ability: a destination that can have more than one batch on the way. The forwarder
    hands it the next batch while the far side is still acknowledging the one before, so the link never
    runs dry between batches (an idle link also waits for delayed TCP acknowledgements: ~40 ms a batch
    with a peer that has Nagle's algorithm on, as Mosquitto has by default)."""

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        """Hand ``batch`` to the client, in order, before returning (what is submitted next goes out after
        it, unless the far side does not care for order, as a time-series database); the future gives how
        many from the start of ``batch`` the far side acknowledged, or raises
        :class:`DestinationUnavailableError` when nothing was (or :class:`UnsendableEventError` for the
        batch's first event, when that shows only once it was sent). Cancelling the future gives up waiting.

        Raises :class:`UnsendableEventError` (for the first event) and :class:`DestinationUnavailableError`
        like ``send``.
        """
        ...


async def acknowledged_prefix(
    name: str, futures: Sequence[asyncio.Future[Any]], timeout_s: float, failures: tuple[type[BaseException], ...]
) -> int:
    """How many acknowledgements, from the first, arrived in time; the rest are cancelled (those
    events stay in the outbox and are sent again). Nothing at all is :class:`DestinationUnavailableError`."""
    acked = 0
    stop: tuple[type[BaseException], ...] = (TimeoutError, DestinationUnavailableError, *failures)
    try:
        async with asyncio.timeout(timeout_s):
            for future in futures:
                await future
                acked += 1
    except stop:
        pass
    finally:
        for future in futures[acked:]:
            future.cancel()
    if acked == 0:
        raise DestinationUnavailableError(f"{name}: nothing acknowledged")
    return acked
