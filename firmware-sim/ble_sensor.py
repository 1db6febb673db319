"""A simulated BTHome v2 temperature/humidity sensor: it broadcasts service-data advertisements
on a simulated radio, repeating each packet a few times as real firmware does."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

from firmware_sim.bthome import BTHOME_UUID, encode_service_data

Radio = Callable[[str, int, Mapping[str, bytes]], None]


class BTHomeSensorSim:
    def __init__(
        self, address: str, radio: Radio, *, interval_s: float = 1.0, repeats: int = 2, seed: int | None = None
    ) -> None:
        self.address = address
        self._radio = radio
        self.interval_s = interval_s
        self.repeats = repeats
        self._rng = random.Random(seed)
        self._task: asyncio.Task[None] | None = None
        self.packet_id = 0
        self.packets_sent = 0
        self.history: deque[tuple[int, float, float, int]] = deque(maxlen=10_000)  # (packet id, t, rh, battery)
        self.temperature = 21.5
        self.humidity = 45.0
        self.battery = 97

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._firmware(), name=f"sim-bthome-{self.address}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _firmware(self) -> None:
        while True:
            self.packet_id = (self.packet_id + 1) % 256
            self.temperature = round(min(40.0, max(5.0, self.temperature + self._rng.uniform(-0.2, 0.2))), 2)
            self.humidity = round(min(90.0, max(20.0, self.humidity + self._rng.uniform(-0.5, 0.5))), 2)
            data = encode_service_data(
                packet_id=self.packet_id, temperature=self.temperature, humidity=self.humidity, battery=self.battery
            )
            self.history.append((self.packet_id, self.temperature, self.humidity, self.battery))
            for _ in range(self.repeats):  # the same packet again: the driver must suppress it
                self._radio(self.address, self._rng.randint(-80, -50), {BTHOME_UUID: data})
                await asyncio.sleep(self.interval_s / (self.repeats * 4))
            self.packets_sent += 1
            await asyncio.sleep(self.interval_s * (1 - 1 / 4))
