"""Simulated serial devices: firmware that writes its frame format at its baud rate into the device
end of a pseudo-terminal pair (socat's, or Python's without socat: :func:`firmware_sim.pty.serial_cable`);
the gateway opens the other end by a stable symlinked path, exactly as it would open ``/dev/serial/by-id/...``.

Every simulator has one shape: ``async with XxxSim(link, **knobs) as sim:`` where ``link`` is the
gateway-side path, and a ``faults`` Counter of what it injected. Fault knobs (0 = off; "every N"
counts frames):

=====================  =========================================================================
``garbage_every``      noise bytes between two frames (never a frame start)
``bad_checksum_every`` a frame whose checksum is wrong (protocols that carry one)
``truncate_every``     a frame cut short, followed by the next frame
``stuck_every``        the values freeze for ``stuck_for`` frames (a stuck sensor; frames are valid)
``spike_every``        one value out of its physical range (``SPIKE``): the gateway's clean stage
                       must reject it
``clock_drift_s``      the device clock gains this many seconds per frame (formats with a time);
                       frames whose clock is off by ``skew_limit_s`` or more count as ``clock_drift``
``burst_every``        ``burst_size`` frames back to back, without the interval
``unplug_every``       after every N frames the cable is pulled for ``unplug_for_s`` (socat killed; needs socat)
=====================  =========================================================================

At most one wire fault (bad checksum, truncation, noise) touches a frame, so each one is reported by
the gateway exactly once, under the reason in the class's ``REASONS`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import tty
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from firmware_sim.pty import SerialCable, serial_cable
from firmware_sim.sds011 import encode_frame as encode_sds011

__all__ = [
    "SERIAL_SIMS",
    "JsonLinesSim",
    "KeyValueSim",
    "NmeaSim",
    "Pms5003Sim",
    "Sds011Sim",
    "Sent",
    "SerialSim",
]

WIRE_FAULTS = ("bad_checksum", "truncated", "garbage")  # in priority order when two fall on one frame
CHUNK = 16  # bytes written at a time, like a UART FIFO


@dataclass(frozen=True, slots=True)
class Sent:
    """One frame the firmware sent: the values it meant (as the gateway decodes them), whether it was
    damaged on the wire (``fault``), and the device clock's time for it."""

    values: Mapping[str, float]
    fault: str | None
    device_time: datetime
    spiked: str | None = None  # the metric that carried an out-of-range spike

    @property
    def intact(self) -> bool:
        """The frame itself reached the wire undamaged (noise before it leaves it whole)."""
        return self.fault in (None, "garbage")


class SerialSim:
    """The base of every simulated serial device; subclasses encode frames."""

    protocol: ClassVar[str]
    """The gateway's ``protocol`` name for this device."""
    REASONS: ClassVar[dict[str, str]] = {}
    """Wire faults this protocol supports -> the driver error reason they produce."""
    SPIKE: ClassVar[tuple[str, float] | None] = None
    """(metric, value) of an out-of-range spike; ``None`` if the format cannot carry one."""
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {}
    """Ranges the gateway needs (``[pipeline.clean.metrics]``) to catch ``SPIKE`` beyond its defaults."""
    HAS_CLOCK: ClassVar[bool] = False

    def __init__(
        self,
        link: Path,
        *,
        interval_s: float = 1.0,
        baudrate: int = 9600,
        seed: int | None = None,
        garbage_every: int = 0,
        bad_checksum_every: int = 0,
        truncate_every: int = 0,
        stuck_every: int = 0,
        stuck_for: int = 3,
        spike_every: int = 0,
        clock_drift_s: float = 0.0,
        skew_limit_s: float = 5.0,
        burst_every: int = 0,
        burst_size: int = 5,
        unplug_every: int = 0,
        unplug_for_s: float = 1.0,
    ) -> None:
        knobs = {"garbage": garbage_every, "bad_checksum": bad_checksum_every, "truncated": truncate_every}
        for fault, every in knobs.items():
            if every and fault not in self.REASONS:
                raise ValueError(f"{type(self).__name__}: the {self.protocol} format has no {fault!r} fault")
        if spike_every and self.SPIKE is None:
            raise ValueError(f"{type(self).__name__}: the {self.protocol} format cannot carry a spike")
        if clock_drift_s and not self.HAS_CLOCK:
            raise ValueError(f"{type(self).__name__}: the {self.protocol} format carries no time")
        if min(garbage_every, bad_checksum_every, truncate_every, stuck_every, spike_every, burst_every,
               unplug_every) < 0:
            raise ValueError("fault intervals must be >= 0")
        self.link = link
        self.pair: SerialCable = serial_cable(link, unplugs=unplug_every > 0)
        self.interval_s = interval_s
        self.baudrate = baudrate
        self._every = knobs
        self.stuck_every, self.stuck_for = stuck_every, stuck_for
        self.spike_every = spike_every
        self.clock_drift_s, self.skew_limit_s = clock_drift_s, skew_limit_s
        self.burst_every, self.burst_size = burst_every, burst_size
        self.unplug_every, self.unplug_for_s = unplug_every, unplug_for_s
        self.rng = random.Random(seed)
        self.faults: Counter[str] = Counter()
        self.history: deque[Sent] = deque(maxlen=100_000)
        self.frames_sent = 0
        self._fd = -1
        self._task: asyncio.Task[None] | None = None
        self._stuck_left = 0
        self._last_values: dict[str, float] | None = None
        self._clock_offset_s = 0.0
        self._after_wire_fault = False
        self.sleeping = False
        self.setup()

    def setup(self) -> None:
        """Per-model state (starting values); called at the end of ``__init__``."""

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.pair.plug(self._open)
        self._task = asyncio.create_task(self._firmware(), name=f"sim-{self.protocol}-{self.link.name}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close()
        await self.pair.__aexit__(exc_type, exc, tb)

    async def unplug(self) -> None:
        """Pull the cable (socat is killed): the gateway's port goes away; the firmware stops writing."""
        self._close()
        await self.pair.unplug()

    async def replug(self) -> None:
        """Plug the cable back in on the same path."""
        await self.pair.replug(self._open)

    async def _open(self) -> None:
        self._fd = os.open(self.pair.device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._fd)
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 256)
        except BlockingIOError:
            return
        except OSError:  # the cable went away under us
            self._close()
            return
        self.on_host_bytes(data)

    def on_host_bytes(self, data: bytes) -> None:
        """Bytes the host wrote to the device (commands); ignored unless a device takes commands."""

    # ------------------------------------------------------------------ firmware

    def next_values(self) -> dict[str, float]:
        raise NotImplementedError

    def encode(self, values: Mapping[str, float], device_time: datetime, fault: str | None) -> bytes:
        """One frame; ``fault`` is ``bad_checksum`` or ``truncated`` (cut short) or ``None``."""
        raise NotImplementedError

    def garbage(self) -> bytes:
        """Noise that can never start a frame."""
        raise NotImplementedError

    def _due(self, every: int, n: int) -> bool:
        return every > 0 and n % every == 0

    def _values(self, n: int) -> tuple[dict[str, float], str | None]:
        if self._stuck_left > 0 and self._last_values is not None:
            self._stuck_left -= 1
            values = dict(self._last_values)
        else:
            values = self.next_values()
            if self._due(self.stuck_every, n):
                self.faults["stuck"] += 1
                self._stuck_left = self.stuck_for - 1
        self._last_values = dict(values)
        spiked = None
        if self.SPIKE is not None and self._due(self.spike_every, n):
            spiked, values[self.SPIKE[0]] = self.SPIKE  # counted once we know it reaches the wire intact
        return values, spiked

    def _device_time(self) -> datetime:
        self._clock_offset_s += self.clock_drift_s
        return datetime.now(UTC) + timedelta(seconds=self._clock_offset_s)

    def readings(self, sent: Sent) -> list[tuple[str, float]]:
        """What the gateway decodes from a frame sent as ``sent``: (metric, value) in order."""
        return list(sent.values.items()) if sent.intact else []

    def timed_frames(self, sent: Sent) -> int:
        """How many frames carrying the device's time reach the gateway from ``sent``."""
        return int(self.HAS_CLOCK and sent.intact)

    async def _write(self, data: bytes) -> None:
        byte_time = 10 / self.baudrate  # 8N1: ten bits a byte; a pty does not pace, so we do
        for offset in range(0, len(data), CHUNK):
            chunk = data[offset:offset + CHUNK]
            if self._fd >= 0:
                with contextlib.suppress(BlockingIOError, OSError):  # nobody reading: lost, as on a wire
                    os.write(self._fd, chunk)
            await asyncio.sleep(len(chunk) * byte_time)

    async def send_frame(self) -> None:
        n = self.frames_sent + 1
        values, spiked = self._values(n)
        device_time = self._device_time()
        fault = next((f for f in WIRE_FAULTS if self._due(self._every[f], n)), None)
        if self._after_wire_fault:  # a damaged frame is always followed by an intact one
            fault = None
        self._after_wire_fault = fault is not None
        sent = Sent(values, fault, device_time, spiked)
        self.history.append(sent)  # before the bytes leave
        if fault is not None:
            self.faults[fault] += 1
        if spiked is not None and any(m == spiked for m, _ in self.readings(sent)):
            self.faults["spike"] += 1
        if self.clock_drift_s and abs(self._clock_offset_s) >= self.skew_limit_s:
            self.faults["clock_drift"] += self.timed_frames(sent)
        data = self.encode(values, device_time, fault if fault != "garbage" else None)
        if fault == "garbage":
            data = self.garbage() + data
        await self._write(data)
        self.frames_sent = n

    async def _firmware(self) -> None:
        while True:
            if self.sleeping and not self._after_wire_fault:  # e.g. an SDS011 told to sleep (a damaged
                # frame is still followed by an intact one, which ends it for the reader)
                await asyncio.sleep(0.05)
                continue
            started = time.monotonic()
            await self.send_frame()
            n = self.frames_sent
            if self._due(self.burst_every, n):
                self.faults["burst"] += 1
                for _ in range(self.burst_size - 1):
                    await self.send_frame()
            if self._due(self.unplug_every, n):
                await asyncio.sleep(0.2)  # let socat pass on the last frame before the cable goes
                self.faults["disconnect"] += 1
                await self.unplug()
                await asyncio.sleep(self.unplug_for_s)
                await self.replug()
                continue
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _noise(self, forbidden: bytes, *, lo: int = 3, hi: int = 12) -> bytes:
        alphabet = [b for b in range(256) if b not in forbidden]
        return bytes(self.rng.choice(alphabet) for _ in range(self.rng.randint(lo, hi)))


def _walk(rng: random.Random, value: float, step: float, lo: float, hi: float, *, digits: int = 1) -> float:
    return round(min(hi, max(lo, value + rng.uniform(-step, step))), digits)


class Sds011Sim(SerialSim):
    """Nova SDS011: 10-byte frames, one per interval; takes sleep/work/period commands."""

    protocol = "sds011"
    REASONS: ClassVar[dict[str, str]] = {"garbage": "garbage", "bad_checksum": "bad_checksum",
                                         "truncated": "truncated"}
    SPIKE = ("pm2_5", 999.9)  # the sensor's full scale: a saturated reading
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"pm2_5": (0.0, 999.0)}

    def setup(self) -> None:
        self.pm2_5, self.pm10 = 12.0, 20.0
        self.commands: list[tuple[int, bytes]] = []  # (sub-command, data) of each valid host command
        self._rx = b""

    def next_values(self) -> dict[str, float]:
        self.pm2_5 = _walk(self.rng, self.pm2_5, 1.5, 1.0, 300.0)
        self.pm10 = _walk(self.rng, self.pm10, 2.0, self.pm2_5, 500.0)
        return {"pm2_5": self.pm2_5, "pm10": self.pm10}

    def encode(self, values: Mapping[str, float], device_time: datetime, fault: str | None) -> bytes:
        frame = encode_sds011(values["pm2_5"], values["pm10"], corrupt_checksum=fault == "bad_checksum")
        # Cut after the PM2.5 bytes: the next frame's header then lands inside the 10-byte window.
        return frame[:4] if fault == "truncated" else frame

    def garbage(self) -> bytes:
        return self._noise(b"\xaa")

    def on_host_bytes(self, data: bytes) -> None:
        """The UART's receive side: 19-byte host commands (AA B4 ... checksum AB)."""
        self._rx += data
        while len(self._rx) >= 19:
            start = self._rx.find(b"\xaa\xb4")
            if start < 0:
                self._rx = b""
                return
            frame, self._rx = self._rx[start:start + 19], self._rx[start + 19:]
            if len(frame) < 19:
                self._rx = frame + self._rx
                return
            if frame[18] != 0xAB or sum(frame[2:17]) & 0xFF != frame[17]:
                continue  # real firmware ignores a corrupt command
            sub, payload = frame[2], frame[3:15]
            self.commands.append((sub, payload))
            if sub == 0x06 and payload[0] == 0x01:  # set sleep (0) / work (1)
                self.sleeping = payload[1] == 0x00
            elif sub == 0x08 and payload[0] == 0x01:  # set working period, minutes (0 = continuous)
                self.interval_s = 60.0 * payload[1] if payload[1] else self.interval_s


def encode_pms5003(words: list[int], *, corrupt_checksum: bool = False) -> bytes:
    """A PMS5003 32-byte frame from its 13 data words (datasheet appendix I), big-endian."""
    if len(words) != 13 or not all(0 <= w <= 0xFFFF for w in words):
        raise ValueError("a PMS5003 frame has 13 uint16 data words")
    body = b"\x42\x4d" + (28).to_bytes(2, "big") + b"".join(w.to_bytes(2, "big") for w in words)
    checksum = sum(body) & 0xFFFF
    if corrupt_checksum:
        checksum ^= 0x5A5A
    return body + checksum.to_bytes(2, "big")


class Pms5003Sim(SerialSim):
    """Plantower PMS5003: 32-byte frames in active mode."""

    protocol = "pms5003"
    REASONS: ClassVar[dict[str, str]] = {"garbage": "garbage", "bad_checksum": "bad_checksum",
                                         "truncated": "truncated"}
    SPIKE = ("pm2_5", 5000.0)
    METRICS = ("pm1_0", "pm2_5", "pm10", "particles_0_3um", "particles_0_5um", "particles_1_0um",
               "particles_2_5um", "particles_5_0um", "particles_10um")

    def setup(self) -> None:
        self._pm = 10.0

    def next_values(self) -> dict[str, float]:
        self._pm = _walk(self.rng, self._pm, 2.0, 2.0, 200.0, digits=0)
        pm = int(self._pm)
        counts = [pm * 150, pm * 45, pm * 9, pm, pm // 3, pm // 9]
        return dict(zip(self.METRICS, [float(max(0, pm - 3)), float(pm), float(pm + 4), *map(float, counts)],
                        strict=True))

    def encode(self, values: Mapping[str, float], device_time: datetime, fault: str | None) -> bytes:
        pm1, pm25, pm10 = (int(values[m]) for m in self.METRICS[:3])
        words = [pm1, pm25, pm10, pm1, pm25, pm10, *(int(values[m]) for m in self.METRICS[3:]), 0]
        frame = encode_pms5003(words, corrupt_checksum=fault == "bad_checksum")
        # Cut to 12 bytes: the next frame's header lands inside the 32-byte window.
        return frame[:12] if fault == "truncated" else frame

    def garbage(self) -> bytes:
        return self._noise(b"\x42")


def _nmea(body: str) -> bytes:
    checksum = 0
    for ch in body.encode("ascii"):
        checksum ^= ch
    return f"${body}*{checksum:02X}\r\n".encode("ascii")


def _ddmm(value: float, lon: bool) -> tuple[str, str]:
    hemisphere = ("E" if value >= 0 else "W") if lon else ("N" if value >= 0 else "S")
    value = abs(value)
    degrees = int(value)
    minutes = round((value - degrees) * 60, 4)
    if minutes >= 60:
        degrees, minutes = degrees + 1, 0.0
    return f"{degrees:0{3 if lon else 2}d}{minutes:07.4f}", hemisphere


def degrees_of(field: str) -> float:
    """What a ``ddmm.mmmm`` field means, in degrees (as a receiver's reader computes it)."""
    whole, _, fraction = field.partition(".")
    return int(whole[:-2]) + float(f"{whole[-2:]}.{fraction}") / 60


class NmeaSim(SerialSim):
    """A GPS receiver: a GGA and an RMC sentence per fix (the device clock's time in both)."""

    protocol = "nmea"
    REASONS: ClassVar[dict[str, str]] = {"garbage": "garbage", "bad_checksum": "bad_checksum",
                                         "truncated": "bad_format"}
    SPIKE = ("altitude", 99999.9)
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"altitude": (-500.0, 20000.0)}
    HAS_CLOCK = True

    GGA_METRICS = ("latitude", "longitude", "altitude", "satellites", "hdop")
    RMC_METRICS = ("latitude", "longitude", "speed", "course")

    def setup(self) -> None:
        self._lat, self._lon, self._alt = 48.1173, 11.5167, 545.4

    def next_values(self) -> dict[str, float]:
        self._lat = _walk(self.rng, self._lat, 0.0005, -89.0, 89.0, digits=6)
        self._lon = _walk(self.rng, self._lon, 0.0005, -179.0, 179.0, digits=6)
        self._alt = _walk(self.rng, self._alt, 0.5, -100.0, 3000.0, digits=1)
        lat_f, _ = _ddmm(self._lat, False)
        lon_f, _ = _ddmm(self._lon, True)
        # The values as sent: positions are rounded to the sentence's 4 decimals of minutes.
        return {"latitude": round(degrees_of(lat_f) * (1 if self._lat >= 0 else -1), 9),
                "longitude": round(degrees_of(lon_f) * (1 if self._lon >= 0 else -1), 9),
                "altitude": self._alt, "satellites": 8.0, "hdop": 0.9, "speed": 0.0, "course": 0.0}

    def encode(self, values: Mapping[str, float], device_time: datetime, fault: str | None) -> bytes:
        lat, ns = _ddmm(values["latitude"], False)
        lon, ew = _ddmm(values["longitude"], True)
        hms = device_time.strftime("%H%M%S") + f".{device_time.microsecond // 10000:02d}"
        gga = _nmea(f"GPGGA,{hms},{lat},{ns},{lon},{ew},1,08,0.9,{values['altitude']:.1f},M,46.9,M,,")
        rmc = _nmea(f"GPRMC,{hms},A,{lat},{ns},{lon},{ew},0.0,0.0,{device_time.strftime('%d%m%y')},,,A")
        if fault == "bad_checksum":
            gga = gga[:-4] + (b"00" if gga[-4:-2] != b"00" else b"11") + b"\r\n"
        elif fault == "truncated":
            gga = gga[:20] + b"\r\n"  # the receiver reset mid-sentence
        return gga + rmc

    def readings(self, sent: Sent) -> list[tuple[str, float]]:
        """Faults damage the GGA sentence only; the RMC after it always arrives."""
        gga = [(m, sent.values[m]) for m in self.GGA_METRICS] if sent.intact else []
        return gga + [(m, sent.values[m]) for m in self.RMC_METRICS]

    def timed_frames(self, sent: Sent) -> int:
        return 1 + sent.intact

    def garbage(self) -> bytes:
        return bytes(self.rng.choice(b"#@!~%^&|?") for _ in range(self.rng.randint(3, 12))) + b"\r\n"


class JsonLinesSim(SerialSim):
    """Hobbyist firmware printing one JSON object a line, with its clock as ``ts`` (epoch seconds)."""

    protocol = "jsonlines"
    REASONS: ClassVar[dict[str, str]] = {"garbage": "bad_json", "truncated": "bad_json"}
    SPIKE = ("temperature", 500.0)
    HAS_CLOCK = True

    def setup(self) -> None:
        self._t, self._rh = 21.0, 45.0

    def next_values(self) -> dict[str, float]:
        self._t = _walk(self.rng, self._t, 0.3, -20.0, 45.0, digits=2)
        self._rh = _walk(self.rng, self._rh, 1.0, 5.0, 95.0, digits=1)
        return {"temperature": self._t, "humidity": self._rh}

    def encode(self, values: Mapping[str, float], device_time: datetime, fault: str | None) -> bytes:
        line = json.dumps({"ts": round(device_time.timestamp(), 3), **values})
        if fault == "truncated":
            line = line[: len(line) // 2]
        return line.encode() + b"\n"

    def garbage(self) -> bytes:
        return bytes(self.rng.choice(b"#@!~%^&|?") for _ in range(self.rng.randint(3, 12))) + b"\n"


class KeyValueSim(SerialSim):
    """Firmware printing ``temperature=21.5C humidity=40.0% pressure=1013.2hPa`` lines."""

    protocol = "kv"
    REASONS: ClassVar[dict[str, str]] = {"garbage": "bad_token", "truncated": "bad_token"}
    SPIKE = ("humidity", 150.0)
    UNITS: ClassVar[dict[str, str]] = {"temperature": "C", "humidity": "%", "pressure": "hPa"}

    def setup(self) -> None:
        self._t, self._rh, self._p = 19.0, 50.0, 1013.2

    def next_values(self) -> dict[str, float]:
        self._t = _walk(self.rng, self._t, 0.3, -20.0, 45.0, digits=1)
        self._rh = _walk(self.rng, self._rh, 1.0, 5.0, 95.0, digits=1)
        self._p = _walk(self.rng, self._p, 0.5, 950.0, 1050.0, digits=1)
        return {"temperature": self._t, "humidity": self._rh, "pressure": self._p}

    def encode(self, values: Mapping[str, float], device_time: datetime, fault: str | None) -> bytes:
        line = " ".join(f"{k}={v}{self.UNITS[k]}" for k, v in values.items())
        if fault == "truncated":
            line = line[: line.index(" humidity=") + 4]  # cut inside the next key: "... hum"
        return line.encode() + b"\r\n"

    def garbage(self) -> bytes:
        return bytes(self.rng.choice(b"#@!~%^&|?") for _ in range(self.rng.randint(3, 12))) + b"\r\n"


SERIAL_SIMS: dict[str, type[SerialSim]] = {
    sim.protocol: sim for sim in (Sds011Sim, Pms5003Sim, NmeaSim, JsonLinesSim, KeyValueSim)
}
"""Simulators by the gateway's protocol name."""
