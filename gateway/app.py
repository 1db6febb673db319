"""The composition root: builds broker, drivers, pipeline and forwarding from config and runs them.

The path of a message: the broker hands it to :meth:`Gateway._ingest`; a raw-stage message is
written to the journal and queued for the pipeline; any message a destination forwards is queued in
that destination's outbox. A device's QoS 1 PUBACK waits for those writes. The pipeline's results
(store rows, and events that land in outboxes) are committed before the journal lets the raw
messages go, so a crash at any point replays, and never loses, what was acknowledged.

Start order: journal (replayed first), store, outboxes and destinations, broker, pipeline, drivers.
Stop is the reverse: drivers stop, the broker stops reading from clients and hands over what it has
read, the pipeline drains into the store and the outboxes, then everything closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from drivers.base import Driver, DriverReading
from drivers.errors import DecodeError
from drivers.serial.driver import SerialDriver
from drivers.serial.modbus import RegisterSpec
from drivers.serial.modbus_driver import ModbusDriver
from drivers.serial.protocols import COMMANDS
from gateway.broker.embedded import EmbeddedBroker, Resend
from gateway.config import BleDevice, ForwardSettings, GatewayConfig, SerialDevice, forward_topics
from gateway.config.reload import FIXED_FIELDS, ReloadPlan, plan_reload
from gateway.forward.base import InboundMessage
from gateway.forward.forwarder import ORIGIN_PREFIX, Forwarder, Route
from gateway.forward.outbox import Limits
from gateway.forward.registry import build_destination
from gateway.http.views import AlertLog, AlertView, CatalogView, DriverSignal, LearnedCatalog, SignalView, StoredAlerts
from gateway.journal import Journal
from gateway.ops.systemd import Health
from pipeline.analyze import AnalyzeStage
from pipeline.catalog import Catalog
from pipeline.clean import CleanStage, ClockPolicy
from pipeline.collect import CollectStage
from pipeline.define import DefineStage
from pipeline.model import ALERT_TYPE, COMMAND_ACK_TYPE, cloudevent, new_event_id
from pipeline.queue import BatchQueue
from pipeline.rules import RuleSet
from pipeline.runner import Pipeline
from pipeline.stage import Emitter, RawMessage, Reject
from pipeline.store import SqliteStore, StoreStage
from pipeline.topics import TopicFields, TopicTemplate, compile_filter
from pipeline.traffic import TrafficLearner

if TYPE_CHECKING:
    from drivers.ble.sources import AdvertisementSource
    from gateway.http.api import HttpApi

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 10.0
ALERT_INTERVAL_S = 10.0
PIPELINE_HANDOFF = 2  # batches between define and store
WINDOW_TICK_S = 1.0
FRAME_METRIC = "_frame"  # the metric level under which undecodable frames are rejected


async def _until_done(commit: Callable[[], Awaitable[None]], what: str) -> None:
    """Retry a commit until it succeeds (the data stays queued meanwhile): ingestion waits behind a
    failing disk instead of losing what was acknowledged."""
    attempt = 0
    while True:
        try:
            await commit()
        except Exception as exc:
            attempt += 1
            if attempt == 1:
                log.error("%s commit failed, retrying: %s", what, exc)
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(attempt, 6)))
            continue
        if attempt:
            log.warning("%s commit recovered after %d failed attempt(s)", what, attempt)
        return


def config_forward_filters(config: GatewayConfig) -> list[tuple[str, str]]:
    """(consumer, filter) for every forward destination: the catalog lists them as consumers."""
    return [(f"forward:{f.name}", topic) for f in config.forward for topic in f.topics]


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _serial_driver(device: SerialDevice) -> Driver:
    if device.protocol == "modbus":
        return ModbusDriver(
            device.id, device.port, device.baudrate, unit_id=device.unit_id, poll_interval_s=device.poll_interval_s,
            timeout_s=device.timeout_s, registers=[RegisterSpec(**r.model_dump()) for r in device.registers],
        )
    return SerialDriver(device.id, device.port, device.protocol, device.baudrate,
                        max_clock_skew_s=device.max_clock_skew_s)


class _DriverSink:
    """What drivers publish into: the raw stage of the broker, in-process."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def reading(self, reading: DriverReading) -> None:
        body: dict[str, Any] = {"value": reading.value, "unit": reading.unit}
        if reading.device_ts is not None:
            body["ts"] = reading.device_ts.timestamp()
        if reading.seq is not None:
            body["seq"] = reading.seq
        await self._gw.broker.publish(self._gw.raw_topic(reading.device_id, reading.metric), _dumps(body))

    async def error(self, device_id: str, reason: str, detail: str, raw: bytes) -> None:
        reject = Reject("driver", reason, detail, self._gw.raw_topic(device_id, FRAME_METRIC), raw)
        await self._gw.publish_rejects([reject])


def _gatt_driver(device: BleDevice, adapter: str | None) -> Driver:
    from drivers.ble.gatt import GattDriver, GattSpec, GattValueDecoder

    if device.characteristic is None or device.metric is None:  # the config refuses this already
        raise ValueError(f"device {device.id}: protocol gatt needs characteristic and metric")
    decoder = GattValueDecoder(device.metric, device.unit, device.value_format, device.scale, device.offset)
    return GattDriver(GattSpec(device.id, device.address, device.characteristic, decoder, device.mode,
                               device.poll_interval_s, adapter))


class Gateway:
    """``async with Gateway(config) as gw:`` runs everything until the block ends."""

    def __init__(
        self, config: GatewayConfig, *, ble_source: AdvertisementSource | None = None,
        port_option: str = "--mqtt-port", http_port_option: str = "[http] port", http_any_port_if_taken: bool = False,
    ) -> None:
        self.config = config
        self.template = TopicTemplate(config.topics.template)
        self._device_class = {d.id: config.device_class(d) for d in config.devices}
        self.gateway_id = config.effective_gateway_id
        self._raw = self.template.stage_filter("raw")
        self.queue: BatchQueue[RawMessage] = BatchQueue(config.pipeline.queue_size)
        self.journal = Journal(config.storage.data_dir)
        self.store = SqliteStore(config.storage.data_dir, config.storage.store_limits())
        self.catalog = Catalog(self.template, config.catalog.all_types, strict=config.catalog.strict)
        self.traffic = TrafficLearner(self.catalog, config.storage.data_dir, gateway_id=self.gateway_id,
                                      flush_interval_s=config.catalog.flush_interval_s)
        self.broker = EmbeddedBroker(config.broker, self._ingest, self.queue.wait_for_room, port_option=port_option,
                                     traffic=self.traffic, data_dir=config.storage.data_dir)
        self.forwarder: Forwarder | None = None
        if config.forward:
            self.forwarder = self._new_forwarder([self._route(f) for f in config.forward])
        self._drops: dict[str, int] = {}
        self.commands: dict[str, int] = {}
        self.analyze = AnalyzeStage(
            self.template, config.topics.version, windows_s=config.pipeline.analyze.windows_s,
            grace_s=config.pipeline.analyze.grace_s, rules=RuleSet([r.to_rule() for r in config.rules]),
            on_alerts=self.store.record_alerts,
        )
        self.define = DefineStage(self.template, catalog=self.catalog)
        self.collect = CollectStage(self.template, {d.id: d.transport for d in config.devices})
        self.clean = CleanStage({})
        self._configure_clean(config)
        self.pipeline = Pipeline([self.collect, self.clean, self.define], self.template, site=config.site,
                                 version=config.topics.version, back=[StoreStage(self.store), self.analyze])
        self._ble_source = ble_source
        self.drivers: list[Driver] = self._build_drivers(config)
        self._driver_tasks: dict[str, asyncio.Task[None]] = {}
        self.published: dict[str, int] = {"events": 0, "rejects": 0}
        self._busy: dict[str, float] = {}  # pipeline task -> monotonic time its batch entered its stages
        self.batches = 0
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._pipeline_task: asyncio.Task[None] | None = None
        self.undrained = 0
        # What the HTTP API shows (gateway/views.py): replaceable by richer sources before start.
        self.alert_log = AlertLog()
        # What the HTTP API shows (gateway/views.py): the learned catalog, the rules' and the gateway's
        # alerts, and the RSSI the BLE driver heard.
        self.alerts: AlertView = StoredAlerts(config.storage.data_dir, self.alert_log)
        self.catalog_view: CatalogView = LearnedCatalog(self)
        self.signal: SignalView = DriverSignal(lambda: self.drivers)
        self._http_options = (http_port_option, http_any_port_if_taken)
        self.http: HttpApi | None = None

    def _route(self, f: ForwardSettings) -> Route:
        return Route(build_destination(f, self.gateway_id, self.template),
                     tuple(compile_filter(t) for t in forward_topics(f, self.template)),
                     Limits(f.max_bytes, f.when_full), f.batch_size, f.replay == "fresh_first")

    def _new_forwarder(self, routes: list[Route]) -> Forwarder:
        return Forwarder(self.config.storage.data_dir, routes, gateway_id=self.gateway_id,
                         on_inbound=self._inbound, on_drop=self._outbox_dropped)

    def _configure_clean(self, config: GatewayConfig) -> None:
        clean = config.pipeline.clean
        self.clean.configure(
            clean.metrics, units=clean.units,
            clock=ClockPolicy(clean.max_clock_ahead_s, clean.max_clock_behind_s, clean.clock_policy),
            duplicate_window_s=clean.duplicate_window_s,
        )

    @staticmethod
    def _driver_devices(config: GatewayConfig) -> dict[str, tuple[object, ...]]:
        """Driver name -> the device settings it runs on (a reload restarts a driver when they change)."""
        groups: dict[str, tuple[object, ...]] = {}
        for d in config.devices:
            if isinstance(d, SerialDevice):
                groups[f"{'modbus' if d.protocol == 'modbus' else 'serial'}:{d.id}"] = (d,)
            elif isinstance(d, BleDevice) and d.protocol == "gatt":
                groups[f"ble-gatt:{d.id}"] = (d, config.ble)
            elif isinstance(d, BleDevice):  # one scanner for every advertising device
                groups["ble"] = (*groups.get("ble", (config.ble,)), d)
        return groups

    def _build_drivers(self, config: GatewayConfig) -> list[Driver]:
        ble_source = self._ble_source
        devices = config.devices
        drivers: list[Driver] = [
            _serial_driver(d) for d in devices if isinstance(d, SerialDevice)
        ]
        ble_devices = [d for d in devices if isinstance(d, BleDevice)]
        if ble_devices:  # the BLE stack (bleak, bthome-ble) loads only when a BLE device is configured
            from drivers.ble.driver import BleDeviceSpec, BleDriver
            from drivers.ble.protocols import or_patterns
            from drivers.ble.sources import BleakSource

            ble = config.ble
            advertisers = [d for d in ble_devices if d.protocol != "gatt"]
            if advertisers:
                specs = {
                    d.address: BleDeviceSpec(d.id, d.address, d.protocol,
                                             bytes.fromhex(d.bindkey) if d.bindkey else None)
                    for d in advertisers
                }
                source = ble_source or BleakSource(
                    passive=ble.scanning == "passive", or_patterns=or_patterns({d.protocol for d in advertisers}),
                    adapter=ble.adapter,
                )
                drivers.append(BleDriver(specs, source, watchdog_s=ble.watchdog_s))
            drivers += [_gatt_driver(d, ble.adapter) for d in ble_devices if d.protocol == "gatt"]
        return drivers

    def raw_topic(self, device_id: str, metric: str) -> str:
        return self.template.format(TopicFields(
            stage="raw", version=self.config.topics.version, site=self.config.site,
            device_class=self._device_class.get(device_id, "generic"), device_id=device_id, metric=metric,
        ))

    async def __aenter__(self) -> Self:
        try:
            recovered = await self.journal.open()
            self._stack.push_async_callback(self.journal.close)
            await self._stack.enter_async_context(self.store)
            await self.store.close_unconfigured_alerts([r.name for r in self.config.rules],
                                                       int(datetime.now(UTC).timestamp() * 1000))
            self.analyze.rules.seed(await self.store.active_alerts())
            if self.forwarder is not None:
                await self._stack.enter_async_context(self.forwarder)
            await self._stack.enter_async_context(self.traffic)
            for f in config_forward_filters(self.config):  # forward destinations consume what they forward
                self.traffic.subscribed(*f)
            self._pipeline_task = asyncio.create_task(self._pipeline_loop(), name="pipeline")
            if recovered:  # before any new message: per-device order holds across the crash
                log.warning("replaying %d message(s) accepted before the last stop", len(recovered))
                for message in recovered:
                    await self.queue.put(message)
            await self._stack.enter_async_context(self.broker)
            if self.config.http.enabled:
                from gateway.http.api import HttpApi  # aiohttp and prometheus-client load only when serving HTTP

                self.http = await self._stack.enter_async_context(HttpApi(
                    self, self.config.http, catalog=self.catalog_view, alerts=self.alerts, signal=self.signal,
                    port_option=self._http_options[0], fallback_to_any_port=self._http_options[1],
                ))
        except BaseException:
            if self._pipeline_task is not None:
                self._pipeline_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pipeline_task
            await self._stack.aclose()
            raise
        self._tasks.append(asyncio.create_task(self._alert_loop(), name="outbox alerts"))
        self._tasks.append(asyncio.create_task(self._windows_loop(), name="analyze windows"))
        self._tasks.append(asyncio.create_task(self._store_housekeeping_loop(), name="store housekeeping"))
        for driver in self.drivers:
            self._start_driver(driver)
        # What start-up allocated (modules, config, caches) lives as long as the process: move it out of the
        # collector's sight, so each collection scans only what the running pipeline allocates.
        gc.collect()
        gc.freeze()
        log.info("gateway up: %d device(s) configured, data in %s", len(self.config.devices),
                 self.config.storage.data_dir)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            tasks = [*self._tasks, *self._driver_tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.undrained = await self.broker.drain(DRAIN_TIMEOUT_S)
            if self.undrained:
                log.error("%d message(s) were still in the broker after %.0f s", self.undrained, DRAIN_TIMEOUT_S)
            await self.journal.flush()  # what was read is durable: its PUBACKs can go out
            self.queue.close()
            if self._pipeline_task is not None:
                # A pipeline held up (a refusing, unreachable backbone) is left behind: what it had
                # not finished is still in the journal and is replayed at the next start.
                done, _ = await asyncio.wait([self._pipeline_task], timeout=DRAIN_TIMEOUT_S)
                if not done:
                    log.error("the pipeline did not drain within %.0f s; the journal keeps the rest",
                              DRAIN_TIMEOUT_S)
            emit = Emitter()
            self.analyze.flush(emit)
            await self._publish(emit)
            await self._publish_drop_alerts()
            if self.forwarder is not None:
                await self.forwarder.flush()
        finally:
            if self._pipeline_task is not None and not self._pipeline_task.done():
                self._pipeline_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pipeline_task
            await self._stack.aclose()
        log.info("gateway stopped: %d reading(s) stored", self.store.rows_written)

    def _start_driver(self, driver: Driver) -> None:
        task = asyncio.create_task(driver.run(_DriverSink(self)), name=f"driver {driver.name}")
        self._driver_tasks[driver.name] = task

    async def _stop_driver(self, name: str) -> None:
        task = self._driver_tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reload(self, new: GatewayConfig) -> ReloadPlan:
        """Apply a new configuration without stopping the broker (SIGHUP): devices, pipeline rules and
        forward destinations. What needs a restart is logged and kept as it was."""
        plan = plan_reload(self.config, new)
        if plan.needs_restart:
            log.warning("reload: %s changed; that takes effect at the next restart", ", ".join(plan.needs_restart))
        old = self.config
        self.config = new.model_copy(update={name: getattr(old, name) for name in FIXED_FIELDS})
        config = self.config
        # Devices: new transports and classes first, so readings from new drivers are accepted.
        self._device_class = {d.id: config.device_class(d) for d in config.devices}
        self.collect.configure({d.id: d.transport for d in config.devices})
        before, after = self._driver_devices(old), self._driver_devices(config)
        restart = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
        for name in sorted(restart):
            await self._stop_driver(name)
        built = {d.name: d for d in self._build_drivers(config)}
        self.drivers = [d for d in self.drivers if d.name not in restart] + [
            built[name] for name in sorted(restart) if name in built
        ]
        for name in sorted(restart):
            if name in built:
                self._start_driver(built[name])
        self._configure_clean(config)
        if config.catalog != old.catalog:
            self.catalog = Catalog(self.template, config.catalog.all_types, strict=config.catalog.strict)
            self.define.set_catalog(self.catalog)
            self.traffic.set_catalog(self.catalog)
        if plan.pipeline_changed:
            self.analyze.set_rules(RuleSet([r.to_rule() for r in config.rules]))
            await self.store.close_unconfigured_alerts([r.name for r in config.rules],
                                                       int(datetime.now(UTC).timestamp() * 1000))
        await self._reload_destinations(plan, config)
        log.warning("reloaded: %s", plan.summary())
        return plan

    async def _reload_destinations(self, plan: ReloadPlan, config: GatewayConfig) -> None:
        settings = {f.name: f for f in config.forward}
        if self.forwarder is None:
            if not settings:
                return
            self.forwarder = await self._stack.enter_async_context(self._new_forwarder([]))
        for name in (*plan.destinations_removed, *plan.destinations_changed):
            await self.forwarder.remove(name)
        for name in (*plan.destinations_changed, *plan.destinations_added):
            await self.forwarder.add(self._route(settings[name]))

    async def _ingest(
        self, topic: str, payload: bytes, origin: str | None, event_id: str | None, resend: Resend | None
    ) -> list[asyncio.Future[None]]:
        """Every message published on the broker comes here (see :class:`gateway.broker.Ingest`)."""
        futures: list[asyncio.Future[None]] = []
        if resend is not None and resend.dup and origin is not None and event_id is None:
            event_id = self.journal.resent_id(origin, resend.packet_id, topic, payload)  # the same event again
        if self._raw.matches(topic):
            message = RawMessage(topic, payload, origin, datetime.now(UTC), event_id or new_event_id())
            event_id = message.event_id
            futures.append(self.journal.append(message, resend.packet_id if resend else None))
            await self.queue.put(message)
        if self.forwarder is not None and self.forwarder.wants(topic, origin):
            fields = self.template.parse(topic)
            futures += await self.forwarder.route(
                topic, payload, event_id=event_id or new_event_id(), key=fields.device_id if fields else "",
                origin=origin,
            )
        return futures

    async def _pipeline_loop(self) -> None:
        """The stages as two tasks joined by a bounded queue: collect, clean and define (CPU) on one
        batch while store and analyze (SQLite, on its own thread) finish the one before; batches stay
        in order. A batch leaves the journal only once stored and its events are in the outboxes."""
        handoff: asyncio.Queue[tuple[list[RawMessage], Emitter, list[Any]] | None] = asyncio.Queue(
            PIPELINE_HANDOFF)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._front(handoff), name="pipeline: collect, clean, define")
            group.create_task(self._back(handoff), name="pipeline: store, analyze, publish")

    async def _front(self, handoff: asyncio.Queue[tuple[list[RawMessage], Emitter, list[Any]] | None]) -> None:
        settings = self.config.pipeline
        while batch := await self.queue.get_batch(settings.batch_size, settings.max_latency_s):
            # Process only what is journaled: otherwise a crash could leave an event in an outbox whose
            # message the journal never recorded, and the device's resend would get a second event id.
            await _until_done(self.journal.flush, "journal")
            emit = Emitter()
            self._busy["front"] = time.monotonic()
            items = await self.pipeline.run_front(batch, emit)  # never raises
            del self._busy["front"]
            await handoff.put((batch, emit, items))  # waits while the back is two batches behind
        await handoff.put(None)  # the queue closed (shutdown): the back finishes what it has, then ends

    async def _back(self, handoff: asyncio.Queue[tuple[list[RawMessage], Emitter, list[Any]] | None]) -> None:
        while (job := await handoff.get()) is not None:
            batch, emit, items = job
            self._busy["back"] = time.monotonic()
            await self.pipeline.run_back(items, emit)  # never raises
            del self._busy["back"]
            self.batches += 1
            await self._publish(emit)
            if self.forwarder is not None:  # the batch's events are durable in the outboxes ...
                await _until_done(self.forwarder.flush, "outbox")
            self.journal.done([m.event_id for m in batch])  # ... so the journal can let it go

    async def _publish(self, emit: Emitter) -> None:
        for topic, event in emit.events:
            await self.broker.publish(topic, _dumps(event), event_id=event.get("id"))
        self.published["events"] += len(emit.events)
        await self.publish_rejects(emit.rejects)

    async def publish_rejects(self, rejects: list[Reject]) -> None:
        for reject in rejects:
            topic, event = self.pipeline.reject_event(reject)
            await self.broker.publish(topic, _dumps(event), event_id=event["id"])
        self.published["rejects"] += len(rejects)

    async def _inbound(self, destination: str, message: InboundMessage) -> None:
        """From the backbone: a downlink command, or an event from another gateway (mesh)."""
        await self.broker.publish(message.topic, message.payload, event_id=message.event_id,
                                  origin=ORIGIN_PREFIX + destination)
        levels = message.topic.split("/")
        if len(levels) >= 4 and levels[0] == "cmd" and levels[1] == self.config.site:
            device_id, command = levels[2], "/".join(levels[3:])
            status = await self._deliver_command(device_id, command, message.payload, message.topic)
            self.commands[status] = self.commands.get(status, 0) + 1
            topic = f"cmdack/{self.config.site}/{device_id}/{command}"
            event = cloudevent(
                event_id=new_event_id(), source=f"/iotgw/{self.config.site}/{self.gateway_id}", type_=COMMAND_ACK_TYPE,
                subject=topic, time=datetime.now(UTC),
                data={"device_id": device_id, "command": command, "status": status, "via": destination,
                      "command_event_id": message.event_id},
            )
            await self.broker.publish(topic, _dumps(event), event_id=event["id"])

    async def _deliver_command(self, device_id: str, command: str, payload: bytes, topic: str) -> str:
        """A serial device whose protocol has commands gets the encoded frame written to its port;
        any other device gets the command on the embedded broker (already published), if it listens."""
        driver = next((d for d in self.drivers if isinstance(d, SerialDriver) and d.device_id == device_id), None)
        if driver is None or driver.protocol not in COMMANDS:
            return "delivered" if self.broker.has_subscriber(topic) else "no_subscriber"
        try:
            args = json.loads(payload) if payload.strip() else {}
            frame = COMMANDS[driver.protocol](command, args if isinstance(args, dict) else {})
        except (ValueError, DecodeError) as exc:
            log.warning("command %s for %s refused: %s", command, device_id, exc)
            return exc.reason if isinstance(exc, DecodeError) else "invalid_argument"
        return "delivered" if await driver.send(frame) else "device_offline"

    def _outbox_dropped(self, destination: str, count: int) -> None:
        self._drops[destination] = self._drops.get(destination, 0) + count

    async def _alert_loop(self) -> None:
        while True:
            await asyncio.sleep(ALERT_INTERVAL_S)
            await self._publish_drop_alerts()

    async def _windows_loop(self) -> None:
        """Close the aggregate windows of series that went quiet (their grace period passed)."""
        while True:
            await asyncio.sleep(WINDOW_TICK_S)
            emit = Emitter()
            self.analyze.tick(emit)
            await self._publish(emit)

    async def _store_housekeeping_loop(self) -> None:
        """Retention and the disk budget of the store (pipeline/store.py), in short transactions."""
        while True:
            await asyncio.sleep(self.config.storage.maintenance_interval_s)
            try:
                await self.store.maintain(int(datetime.now(UTC).timestamp() * 1000))
            except Exception:
                log.exception("store housekeeping failed; trying again in %.0f s",
                              self.config.storage.maintenance_interval_s)

    async def _publish_drop_alerts(self) -> None:
        """Outbox drops are raised as alert events (at most one per destination per interval)."""
        drops, self._drops = self._drops, {}
        self.alert_log.clear_others("outbox_dropped", set(drops))
        for destination, count in drops.items():
            topic = f"alert/raised/1.0/{self.config.site}/gateway/{self.gateway_id}/outbox_dropped"
            event = cloudevent(
                event_id=new_event_id(), source=f"/iotgw/{self.config.site}/{self.gateway_id}", type_=ALERT_TYPE,
                subject=topic, time=datetime.now(UTC),
                data={"alert": "outbox_dropped", "destination": destination, "dropped": count,
                      "policy": "drop_oldest"},
            )
            log.warning("forward %s: outbox full, dropped %d oldest event(s)", destination, count)
            self.alert_log.raise_(event["id"], "outbox_dropped", destination, detail=event["data"])
            await self.broker.publish(topic, _dumps(event), event_id=event["id"])

    def health(self) -> Health:
        """What the systemd watchdog is fed on: the pipeline task runs and is not stuck inside a batch
        (a store write retrying on a failing disk, a stage that hangs), and the broker listens. Waiting
        for room (backpressure from a refusing outbox) is not a fault."""
        problems = []
        if not self.pipeline_running():
            problems.append("the pipeline task is not running")
        for started in list(self._busy.values()):
            if (busy := time.monotonic() - started) > self.config.pipeline.stall_s:
                problems.append(f"the pipeline has been inside one batch for {busy:.0f} s")
        if not self.broker.serving:
            problems.append("the broker is not serving")
        up = sum(d.stats.connected for d in self.drivers)
        status = (
            f"in={self.pipeline.stats()['collect']['in']} stored={self.store.rows_written}"
            f" rejected={self.published['rejects']} queue={len(self.queue)} clients={self.broker.clients}"
            f" drivers_up={up}/{len(self.drivers)}"
        )
        if self.forwarder is not None:
            status += "".join(
                f" {name}:{'up' if f['connected'] else 'down'}/{f['depth']}"
                for name, f in self.forwarder.stats().get("destinations", {}).items()
            )
        return Health(tuple(problems), status)

    def pipeline_running(self) -> bool:
        return self._pipeline_task is not None and not self._pipeline_task.done()

    def stats(self) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(),
            "broker": {"port": self.broker.port, "tapped": self.broker.tapped,
                       "security": self.broker.security.snapshot() if self.broker.security else {},
                       **self.broker.stats()},
            "queue": {"depth": len(self.queue), "max": self.queue.maxsize, "high_water": self.queue.high_water,
                      "producer_waits": self.queue.put_waits},
            "drivers": {d.name: d.stats.as_dict() for d in self.drivers},
            "stages": self.pipeline.stats(),
            "published": dict(self.published),
            "stored": self.store.rows_written,
            "journal": {"appended": self.journal.appended, "replayed": self.journal.replayed,
                        "resends_recognised": self.journal.resends_recognised, "commits": self.journal.commits},
            "forward": self.forwarder.stats() if self.forwarder is not None else {},
            "commands": dict(self.commands),
            "store_transactions": self.store.transactions,
            "store": self.store.stats(),
            "analyze": self.analyze.stats_dict(),
            "undrained": self.undrained,
        }
