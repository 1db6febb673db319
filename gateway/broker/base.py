"""What the composition root asks of a broker, whichever it is: the embedded one (gateway/broker/embedded.py,
the default) or the site's own, attached to as a client (gateway/broker/external.py, ``[broker] mode =
"external"``). :func:`build_broker` picks one by mode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from gateway.broker.auth import BrokerSecurity
from gateway.broker.embedded import EmbeddedBroker, Ingest, Traffic
from gateway.broker.external import ExternalBroker
from gateway.config import GatewayConfig
from gateway.forward.mqtt.connect import Presence


class RetainedBroker(Protocol):
    """A broker the gateway leaves retained messages of its own on (Home Assistant's discovery): both modes.
    The embedded broker keeps them with its retained messages; the external one sends them to the site's
    broker, and calls ``when_connected``'s callbacks again after each reconnection."""

    async def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Retain ``payload`` on ``topic`` (empty: clear it); False when the broker cannot take it now
        (not connected, not running): publish it again from a :meth:`when_connected` callback."""
        ...

    def when_connected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` (on the event loop) once the broker is up, and after every reconnection."""
        ...


class GatewayBroker(RetainedBroker, Protocol):
    """Where devices' messages come from and the gateway's events go (gateway/publish.py ``Broker``)."""

    @property
    def port(self) -> int: ...

    @property
    def serving(self) -> bool: ...

    @property
    def clients(self) -> int: ...

    @property
    def tapped(self) -> int: ...

    @property
    def security(self) -> BrokerSecurity | None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def publish(
        self, topic: str, payload: bytes, *, event_id: str | None = None, origin: str | None = None, qos: int = 0
    ) -> None: ...

    async def publish_many(self, topic: str, payloads: Sequence[bytes], event_ids: Sequence[str]) -> None:
        """Events of the gateway's own on one topic, each with its event id (as ``publish`` takes each)."""
        ...

    def has_subscriber(self, topic: str) -> bool: ...

    async def drain(self, timeout_s: float) -> int:
        """Stop taking messages; wait until those taken reached the pipeline; return how many had not."""
        ...

    def stats(self) -> dict[str, Any]: ...


def build_broker(
    config: GatewayConfig, ingest: Ingest, room: Callable[[], Awaitable[None]], *, filters: Sequence[str],
    raw_filter: str, port_option: str, traffic: Traffic | None, data_dir: Path,
    commit_soon: Callable[[], None] | None = None,
) -> GatewayBroker:
    """The broker ``config.broker.mode`` names; ``filters``: what the pipeline reads (an external broker
    subscribes to them); ``commit_soon``: commit the journal without waiting for more (an external broker
    calls it once what it received is ingested and waits for its PUBACKs)."""
    settings, liveness = config.broker, config.liveness
    presence = Presence(config.status_topic, liveness.online, liveness.offline)
    if settings.mode == "embedded" or settings.external is None:
        # The gateway's status on its own broker is what Home Assistant's discovery ties availability to:
        # kept there only with discovery on (the broker's retained messages are the clients' otherwise).
        return EmbeddedBroker(settings, ingest, room, port_option=port_option, traffic=traffic, data_dir=data_dir,
                              presence=presence if config.homeassistant.discovery else None)
    external = settings.external
    return ExternalBroker(
        external, ingest, client_id=external.client_id or f"iotgw-{config.effective_gateway_id}", filters=filters,
        raw_filter=raw_filter, presence=presence, traffic=traffic, commit_soon=commit_soon,
    )
