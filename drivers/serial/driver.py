"""The serial driver: one per port. Opens the port, feeds bytes to the protocol's decoder, and
survives unplugs by reopening the same path with capped, jittered backoff."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import serial
import serial_asyncio_fast

from drivers.base import DriverReading, DriverStats, Sink
from drivers.errors import DriverError
from drivers.reading import FrameError
from drivers.serial.nmea import GgaFix, RmcFix
from drivers.serial.protocols import PROTOCOLS, Frame
from drivers.serial.textlines import TextFrame
from pipeline.retry import StateLog, backoff_delay

log = logging.getLogger(__name__)
READ_SIZE = 256
DEFAULT_MAX_CLOCK_SKEW_S = 5.0


def frame_time(frame: Frame, now: datetime) -> datetime | None:
    """The device's clock for a frame, for formats that carry one: an NMEA RMC date and time, an NMEA
    GGA time of day (on the UTC date that puts it nearest ``now``), a JSON-lines ``ts``."""
    if isinstance(frame, RmcFix):
        return frame.timestamp
    if isinstance(frame, GgaFix):
        if frame.time is None:
            return None
        candidates = [datetime.combine(now.date() + timedelta(days=d), frame.time) for d in (-1, 0, 1)]
        return min(candidates, key=lambda t: abs(t - now))
    if isinstance(frame, TextFrame) and frame.device_ts is not None:
        try:
            return datetime.fromtimestamp(frame.device_ts, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


class SerialDriver:
    def __init__(
        self, device_id: str, port: str, protocol: str, baudrate: int, *,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise DriverError(f"unknown serial protocol {protocol!r}; known: {', '.join(sorted(PROTOCOLS))}")
        self.name = f"serial:{device_id}"
        self.device_id = device_id
        self.port = port
        self.protocol = protocol
        self.baudrate = baudrate
        self.max_clock_skew = timedelta(seconds=max_clock_skew_s)
        self.stats = DriverStats()
        self._state = StateLog(log, f"serial device {device_id} on {port}")
        self._writer: asyncio.StreamWriter | None = None
        self.commands_sent = 0

    async def run(self, sink: Sink) -> None:
        attempt = 0
        while True:
            try:
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.port, baudrate=self.baudrate
                )
            except (serial.SerialException, OSError) as exc:
                self._state.down(str(exc))
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt))
                continue
            self._state.up()
            self.stats.connected = True
            self._writer = writer
            attempt = 0
            try:
                await self._read(reader, sink)
            except (serial.SerialException, OSError) as exc:
                self.stats.disconnects += 1
                self._state.down(str(exc))
            finally:
                self.stats.connected = False
                self._writer = None
                writer.close()
            await asyncio.sleep(backoff_delay(1))

    async def send(self, data: bytes) -> bool:
        """Write a command to the device; False when the port is not open (unplugged)."""
        writer = self._writer
        if writer is None:
            return False
        try:
            writer.write(data)
            await writer.drain()
        except (serial.SerialException, OSError):
            return False
        self.commands_sent += 1
        return True

    async def _read(self, reader: asyncio.StreamReader, sink: Sink) -> None:
        stream = PROTOCOLS[self.protocol]()
        synced = False  # a port opened mid-frame starts with the tail of one: not the device's fault
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise OSError("end of file on the serial port")
            for item in stream.feed(data):
                if isinstance(item, FrameError):
                    if not synced:
                        synced = True
                        self.stats.skipped["resync"] += 1
                        continue
                    self.stats.errors[item.reason] += 1
                    await sink.error(self.device_id, item.reason, item.detail, data)
                    continue
                synced = True
                self.stats.frames += 1
                device_ts = frame_time(item, datetime.now(UTC))
                if device_ts is not None and abs(device_ts - datetime.now(UTC)) >= self.max_clock_skew:
                    self.stats.anomalies["clock_skew"] += 1  # kept, with the device's time: the pipeline decides
                for m in item.measurements():
                    self.stats.readings += 1
                    await sink.reading(DriverReading(self.device_id, m.metric, m.value, m.unit, device_ts))
