"""A simulated Modbus RTU energy meter: pymodbus's own server on the device end of a socat pty pair.

Register map (unit 1 by default)::

    input   0-1   voltage    float32 (big-endian words)  V
    input   2-3   current    float32                     A
    input   4-5   power      float32                     W
    holding 256-257 energy   uint32, low word first      Wh   (the gateway scales it to kWh)
    holding 258   frequency  uint16                      0.01 Hz

Fault knobs, counted per request answered (0 = off): ``no_reply_every`` (the meter stays silent),
``exception_every`` (a Modbus exception response with ``exception_code``), ``bad_crc_every`` (a
reply whose CRC is wrong), ``late_every`` (an intact reply, ``late_by_s`` seconds after the reply
time: a master whose timeout is shorter has given up on it, and it comes while the master waits for
its next answer), ``spike_every`` (an impossible voltage), ``unplug_every`` (after every N requests the
cable is pulled for ``unplug_for_s``). At most one fault touches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
from collections import Counter, deque
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_sim.pty import SerialCable, serial_cable

__all__ = ["REGISTERS", "EnergyMeterSim"]

INPUT_BASE = 0
HOLDING_BASE = 256
REGISTERS: list[dict[str, Any]] = [
    {"name": "voltage", "address": 0, "kind": "input", "type": "float32", "unit": "V"},
    {"name": "current", "address": 2, "kind": "input", "type": "float32", "unit": "A"},
    {"name": "power", "address": 4, "kind": "input", "type": "float32", "unit": "W"},
    {"name": "energy", "address": 256, "kind": "holding", "type": "uint32", "word_order": "little",
     "scale": 0.001, "unit": "kWh"},
    {"name": "frequency", "address": 258, "kind": "holding", "type": "uint16", "scale": 0.01, "unit": "Hz"},
]
"""The gateway-side ``[[devices.registers]]`` that read this meter."""


def _float_words(value: float) -> list[int]:
    raw = struct.pack(">f", value)
    return [int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")]


def _f32(value: float) -> float:
    """``value`` as the float32 the meter stores (what the gateway will read back)."""
    result: float = struct.unpack(">f", struct.pack(">f", value))[0]
    return result


class EnergyMeterSim:
    protocol = "modbus"
    SPIKE = ("voltage", 9999.0)
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"voltage": (0.0, 500.0)}
    REASONS: ClassVar[dict[str, str]] = {  # + exception_<code>
        "no_reply": "timeout", "bad_crc": "bad_crc", "late": "timeout"}

    def __init__(
        self,
        link: Path,
        *,
        unit_id: int = 1,
        baudrate: int = 9600,
        seed: int | None = None,
        no_reply_every: int = 0,
        exception_every: int = 0,
        exception_code: int = int(ExcCodes.DEVICE_FAILURE),
        bad_crc_every: int = 0,
        late_every: int = 0,
        late_by_s: float = 1.0,
        spike_every: int = 0,
        unplug_every: int = 0,
        unplug_for_s: float = 1.0,
        interval_s: float = 1.0,  # unused: a Modbus device answers when polled; accepted for a uniform shape
    ) -> None:
        if min(no_reply_every, exception_every, bad_crc_every, late_every, spike_every, unplug_every, late_by_s) < 0:
            raise ValueError("fault intervals must be >= 0")
        self.link = link
        self.pair: SerialCable = serial_cable(link, unplugs=unplug_every > 0)
        self.unit_id = unit_id
        self.baudrate = baudrate
        self.rng = random.Random(seed)
        self.every = {"exception": exception_every, "no_reply": no_reply_every, "bad_crc": bad_crc_every,
                      "late": late_every, "spike": spike_every}
        self.late_by_s = late_by_s
        self.exception_code = ExcCodes(exception_code)
        self.unplug_every, self.unplug_for_s = unplug_every, unplug_for_s
        self.faults: Counter[str] = Counter()
        self.history: deque[dict[str, float]] = deque(maxlen=100_000)  # values of each reply sent intact
        self.late_history: deque[dict[str, float]] = deque(maxlen=100_000)  # and of each sent late
        self.requests = 0
        self.voltage, self.current, self.energy_wh, self.frequency = 230.0, 1.5, 123_456, 5000
        self._server: ModbusSerialServer | None = None
        # (fault, values served) of each reply the server is about to send, in the order they leave: pymodbus's
        # server answers each request in a task of its own, so a late reply may leave after a newer one.
        self._leaving: deque[tuple[str | None, dict[str, float] | None]] = deque()
        self._unplugging: asyncio.Task[None] | None = None
        self._unplug_due = False

    @property
    def reasons(self) -> dict[str, str]:
        """Fault -> the reason the gateway counts it under."""
        return {**self.REASONS, "exception": f"exception_{int(self.exception_code)}"}

    async def __aenter__(self) -> Self:
        await self.pair.plug(self._start_server)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._unplugging is not None:
            self._unplugging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._unplugging
        await self._stop_server()
        await self.pair.__aexit__(exc_type, exc, tb)

    async def unplug(self) -> None:
        await self._stop_server()
        await self.pair.unplug()

    async def replug(self) -> None:
        await self.pair.replug(self._start_server)

    async def _start_server(self) -> None:
        self._leaving.clear()  # replies of the last cable's requests never leave
        device = SimDevice(
            id=self.unit_id,
            simdata=(
                [SimData(0, values=0, datatype=DataType.BITS)],
                [SimData(0, values=0, datatype=DataType.BITS)],
                [SimData(HOLDING_BASE, values=[0] * 3, datatype=DataType.REGISTERS)],
                [SimData(INPUT_BASE, values=[0] * 6, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        self._server = ModbusSerialServer(
            device, port=str(self.pair.device_path), baudrate=self.baudrate, reconnect_delay=0,
            trace_packet=self._trace,
        )
        await self._server.serve_forever(background=True)

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    def _tick(self) -> None:
        self.voltage = round(min(250.0, max(210.0, self.voltage + self.rng.uniform(-0.5, 0.5))), 1)
        self.current = round(min(16.0, max(0.1, self.current + self.rng.uniform(-0.2, 0.2))), 2)
        self.energy_wh += self.rng.randint(0, 3)
        self.frequency = min(5050, max(4950, self.frequency + self.rng.randint(-2, 2)))

    async def _action(  # noqa: PLR0917 - pymodbus calls it with six positional arguments
        self, function_code: int, start_address: int, address: int, count: int, registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Runs for each request the server accepted: fresh values into the registers, or a fault."""
        self.requests += 1
        n = self.requests
        fault = next((f for f, every in self.every.items() if every and n % every == 0), None)
        if self._unplugging is not None:
            fault = "unplugging"  # the cable is about to go: no reply, and no fault of its own
        await asyncio.sleep((5 + 2 * count) * 10 / self.baudrate)  # the reply's time on the wire
        if fault == "late":
            await asyncio.sleep(self.late_by_s)
        if fault == "unplugging":
            self._leaving.append((fault, None))
            return None
        if fault == "exception":
            self.faults["exception"] += 1
            self._leaving.append((fault, None))
            self._after_request(n, fault)
            return self.exception_code
        self._tick()
        voltage = self.SPIKE[1] if fault == "spike" else self.voltage
        power = round(voltage * self.current, 1)
        if function_code == 4:
            words = _float_words(voltage) + _float_words(self.current) + _float_words(power)
            served = {"voltage": _f32(voltage), "current": _f32(self.current), "power": _f32(power)}
        else:
            energy = self.energy_wh & 0xFFFFFFFF
            words = [energy & 0xFFFF, energy >> 16, self.frequency]  # energy: low word first
            served = {"energy": energy * 0.001, "frequency": self.frequency * 0.01}
        offset = HOLDING_BASE if function_code == 3 else INPUT_BASE
        registers[offset - start_address:offset - start_address + len(words)] = words
        if fault == "spike" and function_code != 4:
            fault = None  # only the voltage can spike
        self._leaving.append((fault, {k: v for k, v in served.items() if math.isfinite(v)}))
        self._after_request(n, fault)
        return None

    def _after_request(self, n: int, fault: str | None) -> None:
        """After every ``unplug_every`` requests, pull the cable after the next intact reply (a fault
        just before the pull would look like part of the outage)."""
        if self.unplug_every and n % self.unplug_every == 0:
            self._unplug_due = True
        if self._unplug_due and fault in (None, "spike") and self._unplugging is None:
            self._unplug_due = False
            self._unplugging = asyncio.get_running_loop().create_task(self._pull_cable())

    async def _pull_cable(self) -> None:
        await asyncio.sleep(0.1)  # after the reply has left (later requests go unanswered)
        self.faults["disconnect"] += 1
        await self.unplug()
        await asyncio.sleep(self.unplug_for_s)
        await self.replug()
        self._unplugging = None

    def _trace(self, sending: bool, data: bytes) -> bytes:
        """The server's wire: apply the request's fault to the reply on its way out."""
        if not sending:
            return data
        fault, served = self._leaving.popleft() if self._leaving else (None, None)
        if fault == "unplugging":
            return b""
        if fault == "no_reply":
            self.faults["no_reply"] += 1
            return b""
        if fault == "bad_crc":
            self.faults["bad_crc"] += 1
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        if fault == "late":
            self.faults["late"] += 1  # sent intact, but the master gave up on it: not in the history
            if served is not None:
                self.late_history.append(served)
            return data
        if fault == "spike":
            self.faults["spike"] += 1
        if served is not None:
            self.history.append(served)
        return data
