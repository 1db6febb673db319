"""What the gateway reports about itself: one typed model, and the health the watchdog is fed on.

Each part of the gateway offers its section (:class:`QueueStatus` from ingest, :class:`PipelineStatus`
from the flow, driver counts from the devices, ...) and the composition root (gateway/app.py)
assembles them into one :class:`GatewayStatus`. Everything that shows status reads this model:
``/metrics`` and ``/api/v1/stats`` (its schema is in the OpenAPI document), the CLI's exit summary
and the systemd watchdog (:func:`health`). None of them reads the composition root.

The JSON of ``/api/v1/stats`` is ``GatewayStatus.model_dump(mode="json", by_alias=True)``. The
models refuse keys they do not declare: a counter that a part adds or renames must be added here,
and a test that reads status fails until it is, instead of ``/metrics`` losing it silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field


class _Status(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class StageStatus(_Status):
    """One pipeline stage (pipeline/stage.py ``StageStats``)."""

    in_: int = Field(alias="in", description="items the stage received")
    out: int = Field(description="items it passed on")
    rejected: dict[str, int] = Field(description="items it rejected, by reason")


class DriverStatus(_Status):
    """One driver (drivers/base.py ``DriverStats``)."""

    frames: int
    readings: int
    errors: dict[str, int] = Field(description="frames it could not decode, by reason")
    skipped: dict[str, int] = Field(description="not errors: duplicates, strangers, resyncs")
    anomalies: dict[str, int] = Field(description="kept but suspect: clock_skew")
    disconnects: int
    connected: bool


class BleScannerStatus(DriverStatus):
    """The BLE scanner driver: a driver's counts, its watchdog's restarts and the RSSI it heard."""

    scanner_restarts: int
    rssi: dict[str, int] = Field(description="device id -> RSSI (dBm) of its last advertisement")


class QueueStatus(_Status):
    """The bounded queue between the broker and the pipeline."""

    depth: int
    max: int
    high_water: int
    producer_waits: int = Field(description="times ingestion waited for room: the pipeline was behind")


class JournalStatus(_Status):
    appended: int
    replayed: int = Field(description="messages replayed at start: accepted before the last stop, not done")
    resends_recognised: int
    commits: int


class PublishedStatus(_Status):
    """Events the pipeline published back on the broker."""

    events: int
    rejects: int


class PipelineStatus(_Status):
    running: bool = Field(description="the pipeline's tasks run")
    batches: int = Field(description="batches through every stage")
    busy_s: dict[str, float] = Field(description="half (front, back) -> seconds inside its current batch")


class SecurityStatus(_Status):
    logins_accepted: int
    logins_refused: int
    logins_throttled: int = Field(description="logins refused at once: too many from one address waiting for the "
                                  "password hash (max_logins_per_address)")
    denied: dict[str, int] = Field(description="refusals by the ACL or ownership: publish, subscribe, receive, will, "
                                   "client_id (a session of another user)")


class SessionsStatus(_Status):
    """MQTT sessions of the embedded broker."""

    clients: int
    persistent: int
    connected: int
    queued: int
    bytes: int = Field(description="topics and payloads queued in all sessions (bounded by max_queued_bytes)")
    dropped: dict[str, int] = Field(description="client id -> messages its session dropped (sessions that last)")
    dropped_total: int = Field(description="messages dropped from sessions, ended ones included")
    commits: int


class RetainedStatus(_Status):
    messages: int
    bytes: int = Field(description="topics and payloads (bounded by max_retained_bytes)")


class BrokerLimitsStatus(_Status):
    """Times each bound of ``[broker]`` was hit."""

    connections_refused: int = Field(description="connections closed at once: max_connections open")
    connections_refused_per_address: int = Field(description="... max_connections_per_address open from its address")
    logins_throttled: int = Field(description="CONNECTs refused: max_logins_per_address waiting for the hash")
    filters_refused: int = Field(description="subscriptions refused: max_filters_per_client")
    sessions_refused: int = Field(description="new persistent sessions refused: max_persistent_sessions")
    sessions_expired: int = Field(description="persistent sessions ended after session_expiry_s away")
    queued_bytes_evicted: int = Field(description="queued messages dropped to stay within max_queued_bytes")
    retained_refused: int = Field(description="retained messages not kept: max_retained_messages or _bytes")


class ExternalBrokerStatus(_Status):
    """The site's broker the gateway is a client of (``[broker] mode = "external"``)."""

    url: str
    client_id: str
    connected: bool
    protocol: str = Field(description='"5" or "3.1.1" once connected, "" before')
    subscriptions: list[str]
    received: int = Field(description="messages the broker delivered")
    acknowledged: int = Field(description="of them acknowledged, each once in the journal")
    retained_skipped: int = Field(description="retained messages (old values sent on subscribing): not readings")
    oversized_skipped: int = Field(default=0, description="messages over max_packet_bytes: acknowledged, not read")
    pending: int = Field(description="received, not yet handed to the pipeline")
    published: int
    publish_failures: int = Field(description="events not published for want of a connection, or refused by the "
                                              "broker (an MQTT 5 PUBACK reason code of 0x80 or more; the outboxes "
                                              "keep what a destination forwards)")
    disconnects: int
    subscriptions_refused: int = Field(default=0, description="subscriptions the broker refused (SUBACK failure)"
                                                              ", counted at each connection: those topics are not read")
    subscriptions_at_qos0: int = Field(default=0, description="subscriptions granted QoS 0 for the gateway's QoS 1, "
                                                              "counted at each connection: deliveries there are at "
                                                              "most once")


class BrokerStatus(_Status):
    mode: str = "embedded"
    external: ExternalBrokerStatus | None = None
    port: int
    serving: bool = Field(description="taking clients on every listener")
    clients: int = Field(description="connected clients")
    connections: int = Field(description="open connections, clients before their CONNECT included")
    tapped: int
    security: SecurityStatus | None = Field(description="null before the broker started")
    sessions: SessionsStatus
    retained: RetainedStatus
    limits: BrokerLimitsStatus
    offences: dict[str, int] = Field(description="connections closed for bad input, by reason")


class DestinationStatus(_Status):
    """One forward destination and its outbox."""

    connected: bool
    send_failures: int
    depth: int
    bytes: int
    enqueued: int
    delivered: int
    dropped: int
    refused_waits: int
    oldest_age_s: float
    delivery_lag_s: float | None
    error: str | None = None  # a configuration problem the far side reported, until a send succeeds


class ForwardStatus(_Status):
    destinations: dict[str, DestinationStatus] = Field(default_factory=dict)
    echoes_dropped: int = 0


class StoreStatus(_Status):
    rows_written: int
    duplicates: int
    transactions: int
    retention_deleted: dict[str, int]
    budget_deleted: dict[str, int]
    over_budget: bool
    used_bytes: int
    file_bytes: int
    max_bytes: int
    maintenance_passes: int
    pages_released: int


class AnalyzeStatus(_Status):
    agg_published: int
    late: int
    open_series: int
    alerts: dict[str, int]


class LivenessStatus(_Status):
    watched: int = Field(description="devices watched by an inactivity rule (one per rule)")
    silent: int = Field(description="of them, silent for longer than their rule allows: an alert is active")
    alerts: dict[str, int] = Field(description="inactivity alerts raised and cleared, and failures to record one")


class GatewayStatus(_Status):
    """Counts per driver and stage, queue, outboxes (per destination), journal, broker."""

    time: datetime
    broker: BrokerStatus
    queue: QueueStatus
    drivers: dict[str, BleScannerStatus | DriverStatus]
    stages: dict[str, StageStatus]
    pipeline: PipelineStatus
    published: PublishedStatus
    stored: int = Field(description="readings written to the store")
    journal: JournalStatus
    forward: ForwardStatus
    commands: dict[str, int] = Field(description="downlink commands, by outcome")
    store_transactions: int
    store: StoreStatus
    analyze: AnalyzeStatus
    liveness: LivenessStatus
    undrained: int = Field(description="messages still in the broker when the last stop gave up draining")


StatusSource = Callable[[], GatewayStatus]
"""What the HTTP API and the watchdog are given to read status (``Gateway.status``)."""


@dataclass(frozen=True, slots=True)
class Health:
    problems: tuple[str, ...]
    status: str  # one line of key counters for STATUS=

    @property
    def ok(self) -> bool:
        return not self.problems


def broker_readiness(broker: BrokerStatus) -> str:
    """``/readyz``'s broker check: "up", or why not. The external broker away is said as such (the
    gateway keeps reconnecting), not as the gateway starting or stopping."""
    if broker.serving:
        return "up"
    external = broker.external
    if broker.mode == "external" and external is not None:
        if not external.connected:
            url = urlparse(external.url)  # host and port only: no credentials a URL may carry
            where = f"{url.hostname}:{url.port}" if url.port else url.hostname
            return f"the external MQTT broker {where} is unreachable (reconnecting)"
        return "the gateway is stopping (no longer reading from the external MQTT broker)"
    return "the MQTT broker is not serving (starting or stopping)"


def health(status: GatewayStatus, *, stall_s: float) -> Health:
    """What the systemd watchdog is fed on: the pipeline runs and is not stuck inside a batch for
    more than ``stall_s`` (a store write retrying on a failing disk, a stage that hangs), and the broker
    listens. Waiting for room (backpressure from a refusing outbox) is not a fault."""
    problems = []
    if not status.pipeline.running:
        problems.append("the pipeline task is not running")
    for busy in status.pipeline.busy_s.values():
        if busy > stall_s:
            problems.append(f"the pipeline has been inside one batch for {busy:.0f} s")
    if not status.broker.serving and status.broker.mode == "embedded":
        # An external broker that is away is not the gateway's fault: it reconnects (and /readyz says so).
        problems.append("the broker is not serving")
    collect = status.stages.get("collect")
    up = sum(d.connected for d in status.drivers.values())
    line = (
        f"in={collect.in_ if collect else 0} stored={status.stored} rejected={status.published.rejects}"
        f" queue={status.queue.depth} clients={status.broker.clients} drivers_up={up}/{len(status.drivers)}"
    )
    line += "".join(f" {name}:{'up' if f.connected else 'down'}/{f.depth}"
                    for name, f in status.forward.destinations.items())
    return Health(tuple(problems), line)
