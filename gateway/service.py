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
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from drivers.base import Driver, DriverReading
from drivers.errors import DecodeError
from drivers.serial.driver import SerialDriver
from drivers.serial.protocols import COMMANDS
from gateway.broker import EmbeddedBroker, Resend
from gateway.config import BleDevice, GatewayConfig, SerialDevice
from gateway.forward.base import InboundMessage
from gateway.forward.forwarder import ORIGIN_PREFIX, Forwarder, Route
from gateway.forward.outbox import Limits
from gateway.forward.registry import build_destination
from gateway.journal import Journal
from pipeline.analyze import AnalyzeStage
from pipeline.clean import CleanStage, ClockPolicy
from pipeline.collect import CollectStage
from pipeline.define import DefineStage
from pipeline.model import ALERT_TYPE, COMMAND_ACK_TYPE, cloudevent, new_event_id
from pipeline.queue import BatchQueue
from pipeline.runner import Pipeline
from pipeline.stage import Emitter, RawMessage, Reject
from pipeline.store import SqliteStore, StoreStage
from pipeline.topics import TopicFields, TopicTemplate, compile_filter

if TYPE_CHECKING:
    from drivers.ble.sources import AdvertisementSource

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 10.0
ALERT_INTERVAL_S = 10.0
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


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


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


class Gateway:
    """``async with Gateway(config) as gw:`` runs everything until the block ends."""

    def __init__(
        self, config: GatewayConfig, *, ble_source: AdvertisementSource | None = None,
        port_option: str = "--mqtt-port",
    ) -> None:
        self.config = config
        self.template = TopicTemplate(config.topics.template)
        self._device_class = {d.id: config.device_class(d) for d in config.devices}
        self.gateway_id = config.effective_gateway_id
        self._raw = self.template.stage_filter("raw")
        self.queue: BatchQueue[RawMessage] = BatchQueue(config.pipeline.queue_size)
        self.journal = Journal(config.storage.data_dir)
        self.store = SqliteStore(config.storage.data_dir)
        self.broker = EmbeddedBroker(config.broker, self._ingest, self.queue.wait_for_room, port_option=port_option,
                                     data_dir=config.storage.data_dir)
        self.forwarder: Forwarder | None = None
        if config.forward:
            routes = [
                Route(build_destination(f, self.gateway_id), tuple(compile_filter(t) for t in f.topics),
                      Limits(f.max_bytes, f.when_full), f.batch_size, f.replay == "fresh_first")
                for f in config.forward
            ]
            self.forwarder = Forwarder(config.storage.data_dir, routes, gateway_id=self.gateway_id,
                                       on_inbound=self._inbound, on_drop=self._outbox_dropped)
        self._drops: dict[str, int] = {}
        self.commands: dict[str, int] = {}
        self.analyze = AnalyzeStage(self.template, config.topics.version, interval_s=config.pipeline.agg_interval_s)
        self.pipeline = Pipeline(
            [
                CollectStage(self.template, {d.id: d.transport for d in config.devices}),
                CleanStage(
                    config.pipeline.clean.metrics, units=config.pipeline.clean.units,
                    clock=ClockPolicy(config.pipeline.clean.max_clock_ahead_s, config.pipeline.clean.max_clock_behind_s,
                                      config.pipeline.clean.clock_policy),
                    duplicate_window_s=config.pipeline.clean.duplicate_window_s,
                ),
                DefineStage(self.template),
                StoreStage(self.store),
                self.analyze,
            ],
            self.template,
            site=config.site,
            version=config.topics.version,
        )
        self.drivers: list[Driver] = self._build_drivers(ble_source)
        self.published: dict[str, int] = {"events": 0, "rejects": 0}
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._pipeline_task: asyncio.Task[None] | None = None
        self.undrained = 0

    def _build_drivers(self, ble_source: AdvertisementSource | None) -> list[Driver]:
        devices = self.config.devices
        drivers: list[Driver] = [
            SerialDriver(d.id, d.port, d.protocol, d.baudrate) for d in devices if isinstance(d, SerialDevice)
        ]
        ble_devices = [d for d in devices if isinstance(d, BleDevice)]
        if ble_devices:  # the BLE stack (bleak, bthome-ble) loads only when a BLE device is configured
            from drivers.ble.driver import BleDeviceSpec, BleDriver
            from drivers.ble.sources import BleakSource

            specs = {
                d.address: BleDeviceSpec(d.id, d.address, d.protocol, bytes.fromhex(d.bindkey) if d.bindkey else None)
                for d in ble_devices
            }
            drivers.append(BleDriver(specs, ble_source or BleakSource()))
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
            if self.forwarder is not None:
                await self._stack.enter_async_context(self.forwarder)
            self._pipeline_task = asyncio.create_task(self._pipeline_loop(), name="pipeline")
            if recovered:  # before any new message: per-device order holds across the crash
                log.warning("replaying %d message(s) accepted before the last stop", len(recovered))
                for message in recovered:
                    await self.queue.put(message)
            await self._stack.enter_async_context(self.broker)
        except BaseException:
            if self._pipeline_task is not None:
                self._pipeline_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pipeline_task
            await self._stack.aclose()
            raise
        self._tasks.append(asyncio.create_task(self._alert_loop(), name="outbox alerts"))
        sink = _DriverSink(self)
        self._tasks += [asyncio.create_task(d.run(sink), name=f"driver {d.name}") for d in self.drivers]
        log.info("gateway up: %d device(s) configured, data in %s", len(self.config.devices),
                 self.config.storage.data_dir)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
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
        settings = self.config.pipeline
        while batch := await self.queue.get_batch(settings.batch_size, settings.max_latency_s):
            # Process only what is journaled: otherwise a crash could leave an event in an outbox whose
            # message the journal never recorded, and the device's resend would get a second event id.
            await _until_done(self.journal.flush, "journal")
            emit = await self.pipeline.run(batch)  # never raises: a failing stage rejects its batch
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

    async def _publish_drop_alerts(self) -> None:
        """Outbox drops are raised as alert events (at most one per destination per interval)."""
        drops, self._drops = self._drops, {}
        for destination, count in drops.items():
            topic = f"alert/raised/1.0/{self.config.site}/gateway/{self.gateway_id}/outbox_dropped"
            event = cloudevent(
                event_id=new_event_id(), source=f"/iotgw/{self.config.site}/{self.gateway_id}", type_=ALERT_TYPE,
                subject=topic, time=datetime.now(UTC),
                data={"alert": "outbox_dropped", "destination": destination, "dropped": count,
                      "policy": "drop_oldest"},
            )
            log.warning("forward %s: outbox full, dropped %d oldest event(s)", destination, count)
            await self.broker.publish(topic, _dumps(event), event_id=event["id"])

    def stats(self) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(),
            "broker": {"port": self.broker.port, "tapped": self.broker.tapped, **self.broker.stats()},
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
            "undrained": self.undrained,
        }
