"""The composition root: builds the gateway's parts from config, starts them in order and stops them
in reverse. It routes, runs and reports nothing itself; each part does:

- gateway/ingest.py: what the broker calls for every message, and what drivers publish into;
- gateway/flow.py: the pipeline's stages at work, and their periodic work (windows, housekeeping);
- gateway/publish.py: events and rejects back onto the broker;
- gateway/destinations.py: the forward destinations and their outboxes;
- gateway/downlink.py: what comes back from a backbone, and commands to devices;
- gateway/alerts.py: the gateway's own alerts;
- gateway/devices.py: the drivers of the configured devices;
- gateway/status.py: the status model the parts report into, and the health it implies;
- gateway/portal/: the event portal the HTTP API serves (it applies definitions through
  :meth:`Gateway.apply_catalog`).

The path of a message: the broker hands it to ingest; a raw-stage message is written to the journal
and queued for the pipeline; any message a destination forwards is queued in that destination's
outbox. A device's QoS 1 PUBACK waits for those writes. The flow's results (store rows, and events
that land in outboxes once published) are committed before the journal lets the raw messages go, so
a crash at any point replays, and never loses, what was acknowledged.

Start order: journal (replayed first), store, destinations and their outboxes, traffic learner,
pipeline, broker, HTTP API, periodic loops, drivers. Stop is the reverse: drivers and loops stop, the
broker stops reading from clients and hands over what it has read, the pipeline drains into the
store and the outboxes, the last windows and alerts are published, then everything closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from gateway.alerts import GatewayAlerts
from gateway.broker.base import GatewayBroker, build_broker
from gateway.config import GatewayConfig, build_dialects, inactivity_rules, series_rules
from gateway.config.reload import FIXED_FIELDS, ReloadPlan, plan_reload
from gateway.destinations import Destinations, forward_filters
from gateway.devices import Devices
from gateway.downlink import Downlink
from gateway.errors import GatewayError
from gateway.flow import Flow, Windows, store_housekeeping
from gateway.homeassistant import HomeAssistantDiscovery
from gateway.http.views import AlertView, CatalogView, LearnedCatalog, SignalView, StoredAlerts
from gateway.ingest import DriverSink, Ingest
from gateway.journal import Journal
from gateway.liveness import InactivityWatch, watch_known_devices
from gateway.portal import Portal, RecentTopics
from gateway.publish import Publisher
from gateway.status import (
    AnalyzeStatus,
    BrokerStatus,
    GatewayStatus,
    Health,
    LivenessStatus,
    StoreStatus,
    health,
)
from pipeline.analyze import AnalyzeStage
from pipeline.catalog import Catalog
from pipeline.clean import CleanStage, ClockPolicy
from pipeline.collect import CollectStage
from pipeline.define import DefineStage
from pipeline.liveness import InactivityStage
from pipeline.queue import BatchQueue
from pipeline.retry import cancel_and_wait
from pipeline.rules import RuleSet
from pipeline.runner import Pipeline
from pipeline.stage import RawMessage
from pipeline.store import SqliteStore, StoreStage
from pipeline.topics import TopicTemplate
from pipeline.traffic import TrafficLearner

if TYPE_CHECKING:
    from drivers.ble.sources import AdvertisementSource
    from gateway.http.api import HttpApi

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 10.0


class Gateway:
    """``async with Gateway(config) as gw:`` runs everything until the block ends."""

    def __init__(
        self, config: GatewayConfig, *, ble_source: AdvertisementSource | None = None,
        port_option: str = "--mqtt-port", http_port_option: str = "[http] port", http_any_port_if_taken: bool = False,
    ) -> None:
        self.config = config
        self._template = template = TopicTemplate(config.topics.template)
        gateway_id, site, data_dir = config.effective_gateway_id, config.site, config.storage.data_dir
        self.journal = Journal(data_dir, interval_s=config.storage.commit_interval_s)
        self.queue: BatchQueue[RawMessage] = BatchQueue(config.pipeline.queue_size)
        self.store = SqliteStore(data_dir, config.storage.store_limits(reserved=config.broker.disk_share()))
        self.catalog = Catalog(template, config.catalog.all_types, strict=config.catalog.strict)
        self.traffic = TrafficLearner(self.catalog, data_dir, gateway_id=gateway_id,
                                      flush_interval_s=config.catalog.flush_interval_s)

        self.dialects = build_dialects(config.dialects, template, site=site, version=config.topics.version,
                                       own=(config.status_topic,))
        self.collect = CollectStage(template, {d.id: d.transport for d in config.devices}, self.dialects)
        self.clean = CleanStage({})
        self._configure_clean(config)
        self.define = DefineStage(template, catalog=self.catalog)
        self.analyze = AnalyzeStage(
            template, config.topics.version, windows_s=config.pipeline.analyze.windows_s,
            grace_s=config.pipeline.analyze.grace_s, rules=RuleSet(series_rules(config.rules)),
            on_alerts=self.store.record_alerts,
        )
        self.liveness = InactivityStage(inactivity_rules(config.rules), site=site, on_alerts=self.store.record_alerts)
        self.pipeline = Pipeline([self.collect, self.clean, self.define], template, site=site,
                                 version=config.topics.version,
                                 back=[StoreStage(self.store), self.analyze, self.liveness])

        # Messages go both ways: ingest routes broker messages to the destinations; what a backbone sends
        # back (the downlink) and what a full outbox drops (the alerts) go onto the broker again. Those two
        # are built below (they publish on the broker, which needs ingest, which needs the destinations):
        # the destinations reach them late-bound.
        self.destinations = Destinations(
            config, template,
            on_inbound=lambda name, message: self.downlink.inbound(name, message),  # noqa: PLW0108 (late-bound)
            on_drop=lambda name, count: self.alerts.dropped(name, count),  # noqa: PLW0108 (late-bound)
        )
        self.ingest = Ingest(template, self.journal, self.queue, self.destinations, self.dialects)
        self.topics = RecentTopics(self.traffic)  # the portal's live topics: the broker tells both
        raw = template.stage_filter("raw").pattern
        self.broker: GatewayBroker = build_broker(
            config, self.ingest, self.queue.wait_for_room, filters=[raw, *(d.filter for d in self.dialects.dialects)],
            raw_filter=raw, port_option=port_option, traffic=self.topics, data_dir=data_dir,
            commit_soon=self.journal.hurry,
        )
        self.publisher = Publisher(self.broker, self.pipeline.reject_event, wanted=self._consumed)
        self.devices = Devices(config, template, ble_source=ble_source)
        self.downlink = Downlink(self.broker, self.publisher, self.devices.serial_driver, site=site,
                                 gateway_id=gateway_id)
        self.alerts = GatewayAlerts(self.publisher, site=site, gateway_id=gateway_id)
        self.flow = Flow(self.pipeline, self.queue, self.journal, self.publisher, self.destinations,
                         batch_size=config.pipeline.batch_size, max_latency_s=config.pipeline.max_latency_s)
        self.windows = Windows(self.analyze, self.publisher)
        self.inactivity = InactivityWatch(self.liveness, self.publisher)
        self.homeassistant: HomeAssistantDiscovery | None = None
        if config.homeassistant.discovery:
            self.homeassistant = HomeAssistantDiscovery(config, self.broker, template)
            self.broker.when_connected(self.homeassistant.republish)

        # What the HTTP API shows (gateway/http/views.py): replaceable by richer sources before start.
        self.alert_view: AlertView = StoredAlerts(data_dir, self.alerts.log)
        self.catalog_view: CatalogView = LearnedCatalog(data_dir, lambda: self.catalog, site=site,
                                                        host=config.broker.server_host, port=lambda: self.broker.port)
        self.signal: SignalView = self.devices
        self.portal = Portal(settings=lambda: self.config.catalog, catalog=lambda: self.catalog, data_dir=data_dir,
                             topics=self.topics, apply=self.apply_catalog)
        self._http_options = (http_port_option, http_any_port_if_taken)
        self.http: HttpApi | None = None

        self.undrained = 0  # messages left in the broker when the stop gave up draining it
        self._stack = AsyncExitStack()
        self._loops: list[asyncio.Task[None]] = []

    def _consumed(self, topic: str) -> bool:
        """Whether a subscriber of the broker or a forward destination takes events on ``topic``."""
        try:
            subscribed = self.broker.has_subscriber(topic)
        except GatewayError:  # not started yet: no subscriber
            subscribed = False
        return subscribed or self.destinations.wants(topic, None)

    def _configure_clean(self, config: GatewayConfig) -> None:
        clean = config.pipeline.clean
        self.clean.configure(
            clean.metrics, units=clean.units,
            clock=ClockPolicy(clean.max_clock_ahead_s, clean.max_clock_behind_s, clean.clock_policy),
            duplicate_window_s=clean.duplicate_window_s,
        )

    async def _close_unconfigured_alerts(self) -> None:
        """Alerts of rules no longer configured are cleared in the store."""
        await self.store.close_unconfigured_alerts([r.name for r in self.config.rules],
                                                   int(datetime.now(UTC).timestamp() * 1000))

    async def __aenter__(self) -> Self:
        config, stack = self.config, self._stack
        try:
            recovered = await self.journal.open()
            stack.push_async_callback(self.journal.close)
            await stack.enter_async_context(self.store)
            await self._close_unconfigured_alerts()
            active = await self.store.active_alerts()
            self.analyze.rules.seed(active)
            self.liveness.seed(active)
            watch_known_devices(self.liveness, config, config.storage.data_dir)
            await stack.enter_async_context(self.destinations)
            await stack.enter_async_context(self.traffic)
            for consumer, topic_filter in forward_filters(config):  # destinations consume what they forward
                self.traffic.subscribed(consumer, topic_filter)
            self.flow.start()
            await self.ingest.replay(recovered)  # before any new message: per-device order holds across the crash
            await stack.enter_async_context(self.broker)
            if config.http.enabled:
                from gateway.http.api import HttpApi  # aiohttp and prometheus-client load only when serving HTTP

                self.http = await stack.enter_async_context(HttpApi(
                    self.status, config.http, data_dir=config.storage.data_dir, catalog=self.catalog_view,
                    alerts=self.alert_view, signal=self.signal, port_option=self._http_options[0],
                    fallback_to_any_port=self._http_options[1], portal=self.portal,
                ))
        except BaseException:
            await self.flow.cancel()
            await stack.aclose()
            raise
        self._loops = [
            asyncio.create_task(self.alerts.run(), name="outbox alerts"),
            asyncio.create_task(self.windows.run(), name="analyze windows"),
            asyncio.create_task(self.inactivity.run(), name="device inactivity"),
            *([asyncio.create_task(self.homeassistant.run(), name="home assistant discovery")]
              if self.homeassistant is not None else []),
            asyncio.create_task(store_housekeeping(self.store, config.storage.maintenance_interval_s),
                                name="store housekeeping"),
        ]
        self.devices.start(DriverSink(self.broker, self.devices.raw_topic, self.publisher.rejects))
        # What start-up allocated (modules, config, caches) lives as long as the process: move it out of the
        # collector's sight, so each collection scans only what the running pipeline allocates.
        gc.collect()
        gc.freeze()
        log.info("gateway up: %d device(s) configured, data in %s", len(config.devices), config.storage.data_dir)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            loops, self._loops = self._loops, []
            await asyncio.gather(self.devices.stop(), cancel_and_wait(*loops))
            self.undrained = await self.broker.drain(DRAIN_TIMEOUT_S)
            if self.undrained:
                log.error("%d message(s) were still in the broker after %.0f s", self.undrained, DRAIN_TIMEOUT_S)
            await self.journal.flush()  # what was read is durable: its PUBACKs can go out
            if not await self.flow.drain(DRAIN_TIMEOUT_S):
                log.error("the pipeline did not drain within %.0f s; the journal keeps the rest", DRAIN_TIMEOUT_S)
            await self.windows.flush()
            await self.alerts.publish()
            await self.destinations.flush()
        finally:
            try:
                await self.flow.cancel()
            finally:
                await self._stack.aclose()
        log.info("gateway stopped: %d reading(s) stored", self.store.rows_written)

    async def reload(self, new: GatewayConfig) -> ReloadPlan:
        """Apply a new configuration without stopping the broker (SIGHUP): devices, pipeline rules and
        forward destinations. What needs a restart is logged and kept as it was."""
        plan = plan_reload(self.config, new)
        if plan.needs_restart:
            log.warning("reload: %s changed; that takes effect at the next restart", ", ".join(plan.needs_restart))
        old = self.config
        self.config = config = new.model_copy(update={name: getattr(old, name) for name in FIXED_FIELDS})
        # Devices: new transports first, so readings from new drivers are accepted.
        self.collect.configure({d.id: d.transport for d in config.devices})
        await self.devices.reload(config)
        self._configure_clean(config)
        if config.catalog != old.catalog:
            self.catalog = Catalog(self._template, config.catalog.all_types, strict=config.catalog.strict)
            self.define.set_catalog(self.catalog)
            self.traffic.set_catalog(self.catalog)
        if plan.pipeline_changed:
            self.analyze.set_rules(RuleSet(series_rules(config.rules)))
            self.liveness.set_rules(inactivity_rules(config.rules))
            await self._close_unconfigured_alerts()
        await self.destinations.reload(plan, config)
        if self.homeassistant is not None:
            self.homeassistant.configure(config)  # devices removed from the config leave Home Assistant
        log.warning("reloaded: %s", plan.summary())
        return plan

    async def apply_catalog(self) -> None:
        """The catalog files were written (the event portal): read them again and reload the catalog.

        Raises:
            pydantic.ValidationError: when they no longer make a valid catalog (nothing is applied).
        """
        catalog = self.config.catalog.reread()
        await self.reload(self.config.model_copy(update={"catalog": catalog}))

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The parts' background tasks while running: the pipeline, the periodic loops, the drivers."""
        pipeline = [self.flow.task] if self.flow.task is not None else []
        return [*pipeline, *self._loops, *self.devices.tasks]

    def status(self) -> GatewayStatus:
        """What every part reports, as one model (gateway/status.py)."""
        broker = self.broker
        return GatewayStatus(
            time=datetime.now(UTC),
            broker=BrokerStatus.model_validate({
                "port": broker.port, "serving": broker.serving, "clients": broker.clients, "tapped": broker.tapped,
                "security": broker.security.snapshot() if broker.security else None, **broker.stats(),
            }),
            queue=self.ingest.queue_status(),
            drivers=self.devices.status(),
            stages=self.flow.stage_status(),
            pipeline=self.flow.status(),
            published=self.publisher.status(),
            stored=self.store.rows_written,
            journal=self.ingest.journal_status(),
            forward=self.destinations.status(),
            commands=self.downlink.status(),
            store_transactions=self.store.transactions,
            store=StoreStatus.model_validate(self.store.stats()),
            analyze=AnalyzeStatus.model_validate(self.analyze.stats_dict()),
            liveness=LivenessStatus.model_validate(self.liveness.stats_dict()),
            undrained=self.undrained,
        )

    def stats(self) -> dict[str, Any]:
        """:meth:`status` as the JSON object ``/api/v1/stats`` answers."""
        return self.status().model_dump(mode="json", by_alias=True)

    def health(self) -> Health:
        """What the systemd watchdog is fed on (:func:`gateway.status.health`)."""
        return health(self.status(), stall_s=self.config.pipeline.stall_s)
