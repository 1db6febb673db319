"""The composition root: builds broker, drivers and pipeline from config and runs them together.

Start order: store, broker, pipeline, drivers. Stop order is the reverse, and it loses nothing
accepted: drivers stop, the broker stops reading from clients and hands what it has already read
(and acknowledged) to the queue, the pipeline drains the queue into the store, then the broker and
the store close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from drivers.base import Driver, DriverReading
from drivers.serial.driver import SerialDriver
from gateway.broker import EmbeddedBroker
from gateway.config import BleDevice, GatewayConfig, SerialDevice
from pipeline.analyze import AnalyzeStage
from pipeline.clean import CleanStage
from pipeline.collect import CollectStage
from pipeline.define import DefineStage
from pipeline.queue import BatchQueue
from pipeline.runner import Pipeline
from pipeline.stage import Emitter, RawMessage, Reject
from pipeline.store import SqliteStore, StoreStage
from pipeline.topics import TopicFields, TopicTemplate

if TYPE_CHECKING:
    from drivers.ble.sources import AdvertisementSource

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 10.0
FRAME_METRIC = "_frame"  # the metric level under which undecodable frames are rejected


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
        self.queue: BatchQueue[RawMessage] = BatchQueue(config.pipeline.queue_size)
        self.store = SqliteStore(config.storage.data_dir)
        self.broker = EmbeddedBroker(
            config.broker, self.template.stage_filter("raw"), self.queue, port_option=port_option
        )
        self.analyze = AnalyzeStage(self.template, config.topics.version, interval_s=config.pipeline.agg_interval_s)
        self.pipeline = Pipeline(
            [
                CollectStage(self.template, {d.id: d.transport for d in config.devices}),
                CleanStage(config.pipeline.ranges),
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
            await self._stack.enter_async_context(self.store)
            await self._stack.enter_async_context(self.broker)
        except BaseException:
            await self._stack.aclose()
            raise
        self._pipeline_task = asyncio.create_task(self._pipeline_loop(), name="pipeline")
        sink = _DriverSink(self)
        self._tasks = [asyncio.create_task(d.run(sink), name=f"driver {d.name}") for d in self.drivers]
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
            self.queue.close()
            if self._pipeline_task is not None:
                await self._pipeline_task
            emit = Emitter()
            self.analyze.flush(emit)
            await self._publish(emit)
        finally:
            if self._pipeline_task is not None and not self._pipeline_task.done():
                self._pipeline_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pipeline_task
            await self._stack.aclose()
        log.info("gateway stopped: %d reading(s) stored", self.store.rows_written)

    async def _pipeline_loop(self) -> None:
        settings = self.config.pipeline
        while batch := await self.queue.get_batch(settings.batch_size, settings.max_latency_s):
            emit = await self.pipeline.run(batch)
            await self._publish(emit)

    async def _publish(self, emit: Emitter) -> None:
        for topic, event in emit.events:
            await self.broker.publish(topic, _dumps(event))
        self.published["events"] += len(emit.events)
        await self.publish_rejects(emit.rejects)

    async def publish_rejects(self, rejects: list[Reject]) -> None:
        for reject in rejects:
            topic, event = self.pipeline.reject_event(reject)
            await self.broker.publish(topic, _dumps(event))
        self.published["rejects"] += len(rejects)

    def stats(self) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(),
            "broker": {"port": self.broker.port, "tapped": self.broker.tapped},
            "queue": {"depth": len(self.queue), "max": self.queue.maxsize, "high_water": self.queue.high_water,
                      "producer_waits": self.queue.put_waits},
            "drivers": {d.name: d.stats.as_dict() for d in self.drivers},
            "stages": self.pipeline.stats(),
            "published": dict(self.published),
            "stored": self.store.rows_written,
            "store_transactions": self.store.transactions,
            "undrained": self.undrained,
        }
