"""A serial cable for simulated devices: a socat pseudo-terminal pair with two stable symlinks.

``socat pty,raw,echo=0,link=DIR/ttyDEV pty,raw,echo=0,link=DIR/ttyGW`` joins two pseudo-terminals:
the simulated firmware writes to the device-side link and the gateway opens the gateway-side link,
as it would open ``/dev/serial/by-id/...``. Killing socat is an unplug (both links vanish and the
gateway's reads fail); starting it again on the same links is a replug.

Without socat, :class:`PtyPair` makes the same cable in Python (two pseudo-terminals whose master
ends this process joins, as socat does), so the simulators and ``iotgw demo`` need nothing but
Python. Only socat's cable can be unplugged: :func:`serial_cable` picks socat when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

__all__ = ["PtyPair", "SerialCable", "SocatError", "SocatPair", "serial_cable"]

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
NO_SOCAT = "socat is not installed (Debian package: socat)"
UNPLUG_NEEDS_SOCAT = f"unplugging a simulated serial cable needs socat, and {NO_SOCAT}"
_PUMP_CHUNK = 4096


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
            raise SocatError(NO_SOCAT)
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
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
        for link in (self.device_path, self.gateway_path):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()


class SerialCable(Protocol):
    """What a simulator needs of its cable: :class:`SocatPair` or :class:`PtyPair`."""

    gateway_path: Path
    device_path: Path
    unplugs: int

    @property
    def plugged(self) -> bool: ...

    async def plug(self, device_ready: Callable[[], Awaitable[None]]) -> Self: ...

    async def replug(self, device_ready: Callable[[], Awaitable[None]] | None = None) -> None: ...

    async def unplug(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


_fallback_logged = False


class PtyPair:
    """:class:`SocatPair`'s cable made in Python, for machines without socat: two pseudo-terminal pairs
    (``os.openpty``) in raw mode, the device link to one's terminal end and the gateway link to the
    other's, and the event loop copying bytes between their master ends. This process keeps both
    terminal ends open too, so either side may close and reopen its link at any time.

    It cannot be unplugged (:meth:`unplug` raises :class:`SocatError`): use socat for that."""

    def __init__(self, gateway_path: Path, device_path: Path | None = None) -> None:
        self.gateway_path = gateway_path
        self.device_path = device_path or gateway_path.with_name(gateway_path.name + ".dev")
        self._fds: tuple[int, int, int, int] | None = None  # device master, gateway master, both terminal ends
        self.unplugs = 0
        self.dropped = 0  # bytes the far side had no room for (nobody reading): lost, as on a wire

    @property
    def plugged(self) -> bool:
        return self._fds is not None

    async def __aenter__(self) -> Self:
        await self.replug()
        return self

    async def plug(self, device_ready: Callable[[], Awaitable[None]]) -> Self:
        await self.replug(device_ready)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    async def replug(self, device_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Make the cable (no-op when made); ``device_ready`` runs before the gateway's link appears."""
        global _fallback_logged  # noqa: PLW0603 - one log line per process, not one per device
        if self.plugged:
            return
        if not _fallback_logged:
            _fallback_logged = True
            log.info("simulated serial devices use Python pseudo-terminals, which cannot be unplugged (%s)",
                     NO_SOCAT if shutil.which("socat") is None else "socat is installed but not used here")
        loop = asyncio.get_running_loop()
        device_master, device_end = os.openpty()
        gateway_master, gateway_end = os.openpty()
        self._fds = (device_master, gateway_master, device_end, gateway_end)
        try:
            for end in (device_end, gateway_end):
                tty.setraw(end)  # no echo, no line editing: bytes pass as they are
            for master in (device_master, gateway_master):
                os.set_blocking(master, False)
            pending = self.gateway_path.with_name(self.gateway_path.name + ".pending")
            for link, end in ((self.device_path, device_end), (pending, gateway_end)):
                link.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()  # a stale link from an earlier run
                link.symlink_to(os.ttyname(end))
            loop.add_reader(device_master, self._pump, device_master, gateway_master)
            loop.add_reader(gateway_master, self._pump, gateway_master, device_master)
            if device_ready is not None:
                await device_ready()
            pending.replace(self.gateway_path)
        except BaseException:
            self._stop()
            raise

    def _pump(self, source: int, target: int) -> None:
        try:
            data = os.read(source, _PUMP_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: cannot happen while we hold the terminal ends open; stop copying
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(source)
            return
        try:
            written = os.write(target, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            return
        self.dropped += len(data) - written

    async def unplug(self) -> None:
        raise SocatError(UNPLUG_NEEDS_SOCAT)

    def _stop(self) -> None:
        fds, self._fds = self._fds, None
        if fds is None:
            return
        loop = asyncio.get_running_loop()
        for master in fds[:2]:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(master)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        pending = self.gateway_path.with_name(self.gateway_path.name + ".pending")
        for link in (self.device_path, self.gateway_path, pending):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()


def serial_cable(gateway_path: Path, *, unplugs: bool = False) -> SerialCable:
    """socat's cable when socat is installed, else :class:`PtyPair` (said once in the log). A cable that
    must be unplugged (``unplugs``) needs socat: without it this raises :class:`SocatError`."""
    if shutil.which("socat") is not None:
        return SocatPair(gateway_path)
    if unplugs:
        raise SocatError(UNPLUG_NEEDS_SOCAT)
    return PtyPair(gateway_path)
