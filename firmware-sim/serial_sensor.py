"""A simulated SDS011 particulate sensor on a pseudo-terminal.

The "firmware" writes one data frame per interval into the master side of a pty pair, paced at
its baud rate (a pty does not enforce one); the gateway opens the slave side through pyserial, by
a stable symlinked path, exactly as it would open ``/dev/serial/by-id/...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tty
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

from firmware_sim.sds011 import encode_frame


class Sds011Sim:
    def __init__(
        self,
        link: Path,
        *,
        interval_s: float = 1.0,
        baudrate: int = 9600,
        bad_checksum_every: int = 0,
        seed: int | None = None,
    ) -> None:
        self.link = link
        self.interval_s = interval_s
        self.baudrate = baudrate
        self.bad_checksum_every = bad_checksum_every
        self._rng = random.Random(seed)
        self._master = -1
        self._slave = -1
        self._task: asyncio.Task[None] | None = None
        self.history: deque[tuple[float, float, bool]] = deque(maxlen=10_000)  # (pm2_5, pm10, corrupt)
        self.frames_sent = 0
        self.bad_frames_sent = 0
        self.pm2_5 = 12.0
        self.pm10 = 20.0
        self.sleeping = False
        self.commands: list[tuple[int, bytes]] = []  # (sub-command, data) of each valid host command
        self._rx = b""

    async def __aenter__(self) -> Self:
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        self.link.symlink_to(os.ttyname(self._slave))
        self._task = asyncio.create_task(self._firmware(), name=f"sim-sds011-{self.link.name}")
        asyncio.get_running_loop().add_reader(self._master, self._on_host_bytes)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._master)
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_host_bytes(self) -> None:
        """The UART's receive side: 19-byte host commands (AA B4 ... checksum AB)."""
        try:
            self._rx += os.read(self._master, 256)
        except (BlockingIOError, OSError):
            return
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
            sub, data = frame[2], frame[3:15]
            self.commands.append((sub, data))
            if sub == 0x06 and data[0] == 0x01:  # set sleep (0) / work (1)
                self.sleeping = data[1] == 0x00
            elif sub == 0x08 and data[0] == 0x01:  # set working period, minutes (0 = continuous)
                self.interval_s = 60.0 * data[1] if data[1] else self.interval_s

    def _next_values(self) -> tuple[float, float]:
        self.pm2_5 = min(300.0, max(1.0, self.pm2_5 + self._rng.uniform(-1.5, 1.5)))
        self.pm10 = min(500.0, max(self.pm2_5, self.pm10 + self._rng.uniform(-2.0, 2.0)))
        return round(self.pm2_5, 1), round(self.pm10, 1)

    async def _firmware(self) -> None:
        byte_time = 10 / self.baudrate  # 8N1: ten bits a byte
        while True:
            if self.sleeping:  # fan and laser off: no reports until told to work
                await asyncio.sleep(0.05)
                continue
            pm2_5, pm10 = self._next_values()
            corrupt = self.bad_checksum_every > 0 and (self.frames_sent + 1) % self.bad_checksum_every == 0
            frame = encode_frame(pm2_5, pm10, corrupt_checksum=corrupt)
            self.history.append((pm2_5, pm10, corrupt))  # before the bytes leave: a reader may be quick
            for offset in range(0, len(frame), 4):  # UART-like: a few bytes at a time, at the baud rate
                with contextlib.suppress(BlockingIOError):  # nobody reading: the bytes are lost, as on a wire
                    os.write(self._master, frame[offset:offset + 4])
                await asyncio.sleep(4 * byte_time)
            self.frames_sent += 1
            self.bad_frames_sent += corrupt
            await asyncio.sleep(max(0.0, self.interval_s - len(frame) * byte_time))
