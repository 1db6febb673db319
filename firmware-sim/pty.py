"""A serial cable for simulated devices: a socat pseudo-terminal pair with two stable symlinks.

``socat pty,raw,echo=0,link=DIR/ttyDEV pty,raw,echo=0,link=DIR/ttyGW`` joins two pseudo-terminals:
the simulated firmware writes to the device-side link and the gateway opens the gateway-side link,
as it would open ``/dev/serial/by-id/...``. Killing socat is an unplug (both links vanish and the
gateway's reads fail); starting it again on the same links is a replug.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["SocatError", "SocatPair"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class SocatError(RuntimeError):
    """socat is missing, or did not create its links in time."""


class SocatPair:
    """``async with SocatPair(gateway_path) as pair:`` gives ``pair.gateway_path`` (the end to put in the
    gateway's config) and ``pair.device_path`` (the firmware's end; by default ``<gateway_path>.dev``)."""

    def __init__(self, gateway_path: Path, device_path: Path | None = None) -> None:
        self.gateway_path = gateway_path
        self.device_path = device_path or gateway_path.with_name(gateway_path.name + ".dev")
        self._proc: asyncio.subprocess.Process | None = None
        self.unplugs = 0

    @property
    def plugged(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def __aenter__(self) -> Self:
        await self.replug()
        return self

    async def plug(self, device_ready: Callable[[], Awaitable[None]]) -> Self:
        """Like ``async with``, with ``device_ready`` run before the gateway's end appears."""
        await self.replug(device_ready)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def replug(self, device_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start socat on the same links (no-op when it runs) and wait until both links exist.

        ``device_ready`` runs once the device end exists and before the gateway's end appears (the
        link is renamed into place last), as a USB device node appears only once the device is up:
        a gateway cannot open the port and write to a device that is not listening yet."""
        if self.plugged:
            return
        socat = shutil.which("socat")
        if socat is None:
            raise SocatError("socat is not installed (Debian package: socat)")
        for link in (self.device_path, self.gateway_path):
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()  # a stale link left by a killed socat
        pending = self.gateway_path.with_name(self.gateway_path.name + ".pending")
        with contextlib.suppress(FileNotFoundError):
            pending.unlink()
        self._proc = await asyncio.create_subprocess_exec(
            socat, f"pty,raw,echo=0,link={self.device_path}", f"pty,raw,echo=0,link={pending}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not (self.device_path.exists() and pending.exists()):
            if self._proc.returncode is not None or loop.time() > deadline:
                stderr = b""
                if self._proc.returncode is None:
                    self._proc.kill()
                if self._proc.stderr is not None:
                    stderr = await self._proc.stderr.read()
                await self._proc.wait()
                raise SocatError(f"socat did not create {self.gateway_path}: {stderr.decode(errors='replace')}")
            await asyncio.sleep(0.01)
        if device_ready is not None:
            await device_ready()
        pending.replace(self.gateway_path)

    async def unplug(self) -> None:
        """Kill socat: both ends of the cable disappear."""
        if self.plugged:
            self.unplugs += 1
        await self._stop()

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            with contextlib.suppress(TimeoutError):  # reaped later by the child watcher if need be
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        for link in (self.device_path, self.gateway_path):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
