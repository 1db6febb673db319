"""GATT for connectable sensors: one characteristic of one device, read every ``poll_interval_s``
or subscribed to (notifications), through :class:`bleak.BleakClient`.

:class:`GattValueDecoder` is the pure part: the characteristic's bytes in, a reading (one
measurement, ``raw * scale + offset``) or a counted :class:`~drivers.reading.FrameError` out
(``bad_length``: not the struct format's size; ``bad_value``: not a finite number).

:class:`GattDriver` holds the connection: connect, read or subscribe, and on a lost link or a
failed connect, retry with capped, jittered backoff; the outage is logged once when it starts and
once when it ends, and each lost connection is counted in ``stats.disconnects``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from drivers.base import DriverReading, DriverStats, Sink
from drivers.ble.advert import BleReading
from drivers.reading import FrameError, Measurement
from pipeline.queue import DropOldestQueue
from pipeline.retry import StateLog, backoff_delay

if TYPE_CHECKING:
    from bleak import BleakClient

__all__ = ["GattDriver", "GattSpec", "GattValueDecoder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GattValueDecoder:
    """One number in ``value_format`` (a :mod:`struct` format such as ``<h``), scaled."""

    metric: str
    unit: str | None
    value_format: str = "<h"
    scale: float = 1.0
    offset: float = 0.0

    def decode(self, data: bytes) -> BleReading | FrameError:
        size = struct.calcsize(self.value_format)
        if len(data) != size:
            return FrameError("bad_length", f"{len(data)} bytes, {self.value_format} has {size}")
        (raw,) = struct.unpack(self.value_format, data)
        value = float(raw) * self.scale + self.offset
        if not math.isfinite(value):
            return FrameError("bad_value", f"{value!r} from {data.hex()}")
        return BleReading(None, (Measurement(self.metric, value, self.unit),))


@dataclass(frozen=True, slots=True)
class GattSpec:
    device_id: str
    address: str
    characteristic: str
    decoder: GattValueDecoder
    mode: Literal["poll", "notify"] = "poll"
    poll_interval_s: float = 30.0
    adapter: str | None = None
    connect_timeout_s: float = 20.0
    backoff_cap_s: float = 60.0


class GattDriver:
    def __init__(self, spec: GattSpec) -> None:
        self.spec = spec
        self.name = f"ble-gatt:{spec.device_id}"
        self.stats = DriverStats()
        self._state = StateLog(log, f"GATT {spec.device_id} ({spec.address})")
        self.connects = 0

    async def run(self, sink: Sink) -> None:
        attempt = 0
        try:
            while True:
                try:
                    await self._session(sink)
                    attempt = 0  # it was connected: the first retry comes soon
                    reason = "disconnected"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # BleakError, D-Bus errors, timeouts: all mean "retry later"
                    reason = f"{type(exc).__name__}: {exc}"
                self.stats.connected = False
                self._state.down(reason)
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, cap_s=self.spec.backoff_cap_s))
        finally:
            self.stats.connected = False

    async def _session(self, sink: Sink) -> None:
        """One connection, until the link is lost (returns) or fails (raises)."""
        from bleak import BleakClient  # imported here: hosts without BlueZ can still run the rest
        from bleak.args.bluez import BlueZClientArgs

        spec = self.spec
        lost = asyncio.Event()
        bluez: BlueZClientArgs = {} if spec.adapter is None else {"adapter": spec.adapter}
        client = BleakClient(spec.address, disconnected_callback=lambda _client: lost.set(),
                             timeout=spec.connect_timeout_s, bluez=bluez)
        async with client:
            self.connects += 1
            self.stats.connected = True
            self._state.up()
            try:
                if spec.mode == "notify":
                    await self._notified(client, lost, sink)
                else:
                    await self._polled(client, lost, sink)
            finally:
                self.stats.connected = False
                if lost.is_set():
                    self.stats.disconnects += 1

    async def _polled(self, client: BleakClient, lost: asyncio.Event, sink: Sink) -> None:
        while not lost.is_set():
            data = await client.read_gatt_char(self.spec.characteristic)
            await self._handle(bytes(data), sink)
            try:
                async with asyncio.timeout(self.spec.poll_interval_s):
                    await lost.wait()
            except TimeoutError:
                continue

    async def _notified(self, client: BleakClient, lost: asyncio.Event, sink: Sink) -> None:
        values: DropOldestQueue[bytes | None] = DropOldestQueue(64)
        lost_waiter = asyncio.create_task(lost.wait())
        lost_waiter.add_done_callback(lambda _t: values.offer(None))
        try:
            await client.start_notify(self.spec.characteristic, lambda _char, data: values.offer(bytes(data)))
            while (data := await values.get()) is not None:
                await self._handle(data, sink)
        finally:
            lost_waiter.cancel()

    async def _handle(self, data: bytes, sink: Sink) -> None:
        result = self.spec.decoder.decode(data)
        if isinstance(result, FrameError):
            self.stats.errors[result.reason] += 1
            await sink.error(self.spec.device_id, result.reason, result.detail, data)
            return
        self.stats.frames += 1
        for m in result.measurements:
            self.stats.readings += 1
            await sink.reading(DriverReading(self.spec.device_id, m.metric, m.value, m.unit))
