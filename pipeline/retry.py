"""Waiting and retrying, written once for the whole project.

Four pieces, used by everything that retries (a driver reopening its port, a destination finding
its server again, a commit on a failing disk) or stops a task:

- :func:`backoff_delay`: how long to wait after the n-th failure: exponential, capped, and by
  default randomised below that ("full jitter", as aiomqtt waits between reconnects), so that many
  clients do not come back at the same instant;
- :class:`StateLog`: logs an outage when it starts and when it ends, not every failed attempt (as
  Home Assistant's update coordinator does);
- :func:`until_done`: awaits an operation until it succeeds, with both of the above;
- :func:`cancel_and_wait` and :func:`stop_task`: cancel tasks and wait until they have ended, cancelling
  again a task that swallowed its cancellation (:func:`raise_swallowed_cancel` stops the known case
  where it happens).

Nothing here imports the rest of the project.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = [
    "RECANCEL_S", "StateLog", "backoff_delay", "cancel_and_wait", "commit_delay", "raise_swallowed_cancel", "stop_task",
    "until_done",
]

T = TypeVar("T")
log = logging.getLogger(__name__)


def backoff_delay(
    attempt: int, *, base_s: float = 1.0, factor: float = 1.5, cap_s: float = 30.0, floor_s: float = 0.0,
    jitter: bool = True,
) -> float:
    """Seconds to wait after the ``attempt``-th failure in a row.

    The bound is ``base_s * factor ** attempt``, at most ``cap_s``. With ``jitter`` (for peers that
    many clients may retry at once) the wait is drawn uniformly between 0 and that bound; without it
    (a local disk: nobody to spread out) it is the bound itself. Never less than ``floor_s``.
    """
    try:
        bound = min(cap_s, base_s * factor**attempt)
    except OverflowError:  # thousands of attempts: long past the cap
        bound = cap_s
    wait = random.uniform(0, bound) if jitter else bound
    return max(floor_s, wait)


def commit_delay(attempt: int) -> float:
    """Between attempts at a local commit: 0.2, 0.4, 0.8, ... seconds, at most 5, not randomised."""
    return backoff_delay(attempt, base_s=0.1, factor=2.0, cap_s=5.0, jitter=False)


class StateLog:
    """Logs a source going down once, and its recovery once: state changes, not every failure.

    :meth:`down` counts a failed attempt and logs only the first of an outage; :meth:`up` ends the
    outage and logs that only if there was one. The texts are %-templates over ``name``, ``reason``,
    ``failures`` (failed attempts in the outage) and ``seconds`` (how long it lasted).

    Args:
        initially_up: the state before the first report; None: unknown, so the first report is
            logged whichever it is (a destination that says "connected" once at start).
    """

    def __init__(
        self, logger: logging.Logger, name: str, *,
        down: str = "%(name)s: unavailable (%(reason)s); retrying with backoff",
        up: str = "%(name)s: recovered after %(seconds).1f s",
        down_level: int = logging.WARNING, up_level: int = logging.WARNING,
        initially_up: bool | None = True, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.name = name
        self._down_text, self._up_text = down, up
        self._down_level, self._up_level = down_level, up_level
        self._up: bool | None = initially_up
        self._clock = clock
        self._since = 0.0
        self.failures = 0  # failed attempts since the last success

    @property
    def is_down(self) -> bool:
        return self._up is False

    def down(self, reason: object, *, exc_info: bool = False, level: int | None = None) -> None:
        """One failed attempt; logged (at ``level``, else the default) only when it starts an outage."""
        self.failures += 1
        if self._up is False:
            return
        self._up = False
        self._since = self._clock()
        fields = {"name": self.name, "reason": reason, "failures": self.failures, "seconds": 0.0}
        self._log.log(self._down_level if level is None else level, self._down_text, fields, exc_info=exc_info)

    def up(self, reason: object = "") -> None:
        failures, self.failures = self.failures, 0
        if self._up is True:
            return
        seconds = self._clock() - self._since if self._up is False else 0.0
        self._up = True
        fields = {"name": self.name, "reason": reason, "failures": failures, "seconds": seconds}
        self._log.log(self._up_level, self._up_text, fields)


async def until_done(
    op: Callable[[], Awaitable[T]], *, what: str, log: logging.Logger,
    retry_on: tuple[type[Exception], ...] = (Exception,), delay: Callable[[int], float] = commit_delay,
    level: int = logging.ERROR,
) -> T:
    """Await ``op()`` until it returns, and return what it returned.

    A failure of a kind in ``retry_on`` is retried after ``delay(n)`` seconds, n counting the
    failures so far; any other exception propagates, and cancelling interrupts a wait at once. The
    first failure is logged at ``level`` ("<what> failed, retrying until it succeeds: <error>") and
    the recovery once ("<what> recovered after <n> failed attempt(s)").
    """
    state = StateLog(
        log, what, down="%(name)s failed, retrying until it succeeds: %(reason)s",
        up="%(name)s recovered after %(failures)d failed attempt(s)", down_level=level,
    )
    while True:
        try:
            result = await op()
        except retry_on as exc:
            state.down(exc)
            await asyncio.sleep(delay(state.failures))
            continue
        state.up()
        return result


RECANCEL_S = 5.0
"""How long a cancelled task may run on (its cleanup: a BLE disconnect, a broker's goodbye) before it
is taken to have swallowed the cancel and is cancelled again."""


def raise_swallowed_cancel() -> None:
    """Raise ``CancelledError`` if the current task was cancelled and the cancel was swallowed.

    On Python 3.11 (Debian 12, Raspberry Pi OS), ``asyncio.wait_for`` returns its result instead of
    raising ``CancelledError`` when the awaited future completes in the same loop step as the cancel
    (fixed in 3.12); the task's ``cancelling()`` count stays up. pymodbus waits for every reply that
    way: a Modbus driver polling back to back swallowed 52 cancels in 300 in a scratch run, and a
    stop that awaited it once hung. Call this right after awaiting such a library, never in cleanup
    that runs because of a cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, recancel_s: float = RECANCEL_S) -> None:
    """Cancel ``tasks`` (``None`` skipped) and wait until every one has ended. What they raised is
    retrieved and dropped, as ``asyncio.gather(..., return_exceptions=True)`` drops it.

    A task still running ``recancel_s`` after its cancel has swallowed it (see
    :func:`raise_swallowed_cancel`, which the known case uses): it is logged and cancelled again, so
    a stop cannot hang on it for good.

    Cancelling the caller does not abandon the tasks half-stopped: as a ``TaskGroup`` does, the wait
    goes on until they have ended, then the caller's ``CancelledError`` is raised (``with
    contextlib.suppress(asyncio.CancelledError): await task`` swallowed it).
    """
    loop = asyncio.get_running_loop()
    pending = {task for task in tasks if task is not None}
    for task in pending:
        task.cancel()
    deadline = loop.time() + recancel_s  # not moved by the caller's cancels: a stop inside a stop ends too
    interrupted = False
    while pending := {task for task in pending if not task.done()}:
        try:
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            interrupted = True
            continue
        if loop.time() < deadline:
            continue  # all ended
        for task in pending:
            if not task.done():
                log.warning("%s still runs %.1f s after it was cancelled: cancelling it again",
                            task.get_name() if isinstance(task, asyncio.Task) else task, recancel_s)
                task.cancel()
        deadline = loop.time() + recancel_s
    for ended in tasks:
        if ended is not None and not ended.cancelled():
            ended.exception()  # retrieved: asyncio does not log it as never retrieved
    if interrupted:
        raise asyncio.CancelledError


async def stop_task(task: asyncio.Future[Any] | None, *, recancel_s: float = RECANCEL_S) -> None:
    """:func:`cancel_and_wait` for one task, then raise what it raised other than its cancellation,
    as ``await task`` would."""
    await cancel_and_wait(task, recancel_s=recancel_s)
    if task is not None and not task.cancelled():
        task.result()
