"""Simulated BLE sensor firmware: BTHome v2, RuuviTag (data format 5) and Xiaomi LYWSD03MMC with
ATC1441/pvvx firmware. Each broadcasts advertisements through a :class:`Radio` -- the in-process
``drivers.ble.sources.SimulatedRadio`` or ``firmware_sim.bluez.BlueZRadio`` (python-dbusmock's BlueZ
on a private D-Bus, scanned by bleak's real backend).

Every simulator has the same shape (``async with Sim(address=..., radio=..., **knobs)``) and the
same fault knobs, each "every n-th packet" (0 = off), each injected fault counted in ``faults``:

- ``duplicate_every``: the packet is broadcast once more (``faults["duplicate"]``);
- ``stuck_every`` / ``stuck_for``: the values freeze for ``stuck_for`` packets (``"stuck"``, per packet);
- ``spike_every``: the temperature jumps out of range (``"spike"``);
- ``burst_every`` / ``burst_len``: ``burst_len`` packets back to back, no interval (``"burst"``);
- ``silence_every`` / ``silence_s``: the radio goes quiet for ``silence_s`` (``"silence"``);
- ``garble_every``: the payload is damaged so it cannot be decoded (``"garbled"``).

``repeats`` is not a fault: firmware sends each packet that many times (same packet id). ``history``
holds every packet sent intact: (packet id, values, spiked).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Literal, Protocol, Required, Self, TypedDict, Unpack

from firmware_sim.atc import ATC_UUID, encode_atc
from firmware_sim.bthome import BTHOME_UUID, Encryption, encode_service_data
from firmware_sim.ruuvi import RUUVI_COMPANY_ID, encode_df5

__all__ = ["BLE_SIMULATORS", "AtcSim", "BTHomeSensorSim", "BleSensorSim", "Radio", "RuuviSim", "SentPacket", "SimKnobs"]


class Radio(Protocol):
    def push(
        self, address: str, rssi: int, service_data: Mapping[str, bytes], name: str | None = None,
        manufacturer_data: Mapping[int, bytes] | None = None,
    ) -> None: ...


class SimKnobs(TypedDict, total=False):
    """The keyword arguments every simulator takes (see the module docstring)."""

    address: Required[str]
    radio: Required[Radio]
    interval_s: float
    repeats: int
    seed: int | None
    duplicate_every: int
    stuck_every: int
    stuck_for: int
    spike_every: int
    burst_every: int
    burst_len: int
    silence_every: int
    silence_s: float
    garble_every: int


@dataclass(frozen=True, slots=True)
class SentPacket:
    packet_id: int
    values: Mapping[str, float]
    spiked: bool


@dataclass(frozen=True, slots=True)
class _Payload:
    service_data: Mapping[str, bytes]
    manufacturer_data: Mapping[int, bytes]


class BleSensorSim:
    """The firmware loop and fault injection; subclasses encode their protocol."""

    kind: ClassVar[str] = ""
    packet_id_modulo: ClassVar[int] = 256
    spike_temperature: ClassVar[float] = 200.0

    def __init__(
        self, *, address: str, radio: Radio, interval_s: float = 1.0, repeats: int = 1, seed: int | None = None,
        duplicate_every: int = 0, stuck_every: int = 0, stuck_for: int = 3, spike_every: int = 0,
        burst_every: int = 0, burst_len: int = 5, silence_every: int = 0, silence_s: float = 2.0,
        garble_every: int = 0,
    ) -> None:
        self.address = address.upper()
        self._radio = radio
        self.interval_s = interval_s
        self.repeats = repeats
        self._rng = random.Random(seed)
        self.duplicate_every, self.stuck_every, self.stuck_for = duplicate_every, stuck_every, stuck_for
        self.spike_every, self.burst_every, self.burst_len = spike_every, burst_every, burst_len
        self.silence_every, self.silence_s, self.garble_every = silence_every, silence_s, garble_every
        self.faults: Counter[str] = Counter()
        self.history: deque[SentPacket] = deque(maxlen=10_000)
        self.packets = 0
        self.transmissions = 0
        self.packet_id = 0
        self.values: dict[str, float] = self._initial()
        self._stuck_left = 0
        self._task: asyncio.Task[None] | None = None

    # -- what a protocol provides ------------------------------------------------------------------
    def _initial(self) -> dict[str, float]:
        return {"temperature": 21.5, "humidity": 45.0, "battery": 97.0}

    def _walk(self, values: dict[str, float]) -> dict[str, float]:
        rng = self._rng
        return values | {
            "temperature": round(min(40.0, max(5.0, values["temperature"] + rng.uniform(-0.2, 0.2))), 2),
            "humidity": round(min(90.0, max(20.0, values["humidity"] + rng.uniform(-0.5, 0.5))), 2),
        }

    def _encode(self, packet_id: int, values: Mapping[str, float]) -> _Payload:
        raise NotImplementedError

    def _garble(self, payload: _Payload) -> _Payload:
        """Cut three bytes off: a fixed-length format no longer has its length."""
        return _Payload({k: v[:-3] for k, v in payload.service_data.items()},
                        {k: v[:-3] for k, v in payload.manufacturer_data.items()})

    # -- the firmware ------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._firmware(), name=f"sim-{self.kind}-{self.address}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _due(self, every: int) -> bool:
        return every > 0 and self.packets % every == 0

    def _transmit(self, payload: _Payload) -> None:
        self._radio.push(self.address, self._rng.randint(-80, -50), payload.service_data, None,
                         payload.manufacturer_data)
        self.transmissions += 1

    def step(self) -> None:
        """Measure, inject the faults due, and broadcast one packet."""
        self.packets += 1
        self.packet_id = (self.packet_id + 1) % self.packet_id_modulo
        if self._stuck_left > 0:
            self._stuck_left -= 1
            self.faults["stuck"] += 1
        else:
            self.values = self._walk(self.values)
            if self._due(self.stuck_every):
                self._stuck_left = self.stuck_for
        values = dict(self.values)
        spiked = self._due(self.spike_every)
        if spiked:
            values["temperature"] = self.spike_temperature
            self.faults["spike"] += 1
        payload = self._encode(self.packet_id, values)
        if self._due(self.garble_every):
            self.faults["garbled"] += 1
            self._transmit(self._garble(payload))
            return
        self.history.append(SentPacket(self.packet_id, values, spiked))
        for _ in range(self.repeats):
            self._transmit(payload)
        if self._due(self.duplicate_every):
            self.faults["duplicate"] += 1
            self._transmit(payload)

    async def _firmware(self) -> None:
        while True:
            self.step()
            if self._due(self.burst_every):
                self.faults["burst"] += 1
                for _ in range(self.burst_len):
                    await asyncio.sleep(0)  # back to back: only let the loop breathe
                    self.step()
            if self._due(self.silence_every):
                self.faults["silence"] += 1
                await asyncio.sleep(self.silence_s)
            await asyncio.sleep(self.interval_s)


class BTHomeSensorSim(BleSensorSim):
    """BTHome v2 temperature/humidity/battery sensor; ``bindkey`` (16 bytes) encrypts."""

    kind = "bthome"

    def __init__(self, *, bindkey: bytes | None = None, **knobs: Unpack[SimKnobs]) -> None:
        super().__init__(**knobs)
        self.bindkey = bindkey
        self._counter = self._rng.randrange(1000, 1_000_000)

    def _encode(self, packet_id: int, values: Mapping[str, float]) -> _Payload:
        encryption = None
        if self.bindkey is not None:
            self._counter += 1
            encryption = Encryption(self.bindkey, self.address, self._counter)
        data = encode_service_data(
            packet_id=packet_id, temperature=values["temperature"], humidity=values["humidity"],
            battery=round(values["battery"]), encryption=encryption,
        )
        return _Payload({BTHOME_UUID: data}, {})

    def _garble(self, payload: _Payload) -> _Payload:
        data = payload.service_data[BTHOME_UUID]
        if self.bindkey is not None:  # a flipped MIC bit: decryption fails
            return _Payload({BTHOME_UUID: data[:-1] + bytes((data[-1] ^ 0x01,))}, {})
        return _Payload({BTHOME_UUID: data[:1]}, {})  # the device-info byte alone: no object


class RuuviSim(BleSensorSim):
    """RuuviTag: temperature, humidity, pressure, battery voltage; data format 5."""

    kind = "ruuvi"
    packet_id_modulo = 0xFFFF  # the measurement sequence (65535 means "not available")
    spike_temperature = 160.0  # within data format 5, beyond the gateway's default range

    def _initial(self) -> dict[str, float]:
        return {"temperature": 19.0, "humidity": 52.0, "pressure": 1009.5, "battery_voltage": 2977.0}

    def _walk(self, values: dict[str, float]) -> dict[str, float]:
        values = super()._walk(values)
        values["temperature"] = round(values["temperature"] / 0.005) * 0.005
        values["humidity"] = round(values["humidity"] / 0.0025) * 0.0025
        values["pressure"] = round(min(1050.0, max(950.0, values["pressure"] + self._rng.uniform(-0.3, 0.3))), 2)
        return values

    def _encode(self, packet_id: int, values: Mapping[str, float]) -> _Payload:
        data = encode_df5(
            mac=self.address, sequence=packet_id, temperature=values["temperature"], humidity=values["humidity"],
            pressure_hpa=values["pressure"], acceleration_mg=(4, -4, 1036), battery_mv=round(values["battery_voltage"]),
            tx_power_dbm=4, movement=self.packets % 255,
        )
        return _Payload({}, {RUUVI_COMPANY_ID: data})


class AtcSim(BleSensorSim):
    """LYWSD03MMC with ATC1441 (``layout="atc1441"``) or pvvx (``"pvvx"``) firmware."""

    kind = "atc"

    def __init__(self, *, layout: Literal["atc1441", "pvvx"] = "pvvx", **knobs: Unpack[SimKnobs]) -> None:
        super().__init__(**knobs)
        self.layout: Literal["atc1441", "pvvx"] = layout

    def _initial(self) -> dict[str, float]:
        return {"temperature": 22.0, "humidity": 48.0, "battery": 88.0, "battery_voltage": 2950.0}

    def _walk(self, values: dict[str, float]) -> dict[str, float]:
        values = super()._walk(values)
        if self.layout == "atc1441":  # 0.1 °C and whole percent on the air
            values["temperature"] = round(values["temperature"], 1)
            values["humidity"] = float(round(values["humidity"]))
        return values

    def _encode(self, packet_id: int, values: Mapping[str, float]) -> _Payload:
        data = encode_atc(
            mac=self.address, counter=packet_id, temperature=values["temperature"], humidity=values["humidity"],
            battery=round(values["battery"]), battery_mv=round(values["battery_voltage"]), layout=self.layout,
        )
        return _Payload({ATC_UUID: data}, {})


# Simulator kinds by name, for a fleet file (``kind = "ruuvi"``): each is built from keyword arguments.
BLE_SIMULATORS: dict[str, type[BleSensorSim]] = {
    "bthome": BTHomeSensorSim,
    "ruuvi": RuuviSim,
    "atc": AtcSim,
}
