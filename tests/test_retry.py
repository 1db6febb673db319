"""pipeline.retry: the one backoff formula, the state-change log, the retry-until-done loop and the
stop of a task that swallows its cancellation."""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys

import pytest

from pipeline.retry import (
    RECANCEL_S,
    StateLog,
    backoff_delay,
    cancel_and_wait,
    commit_delay,
    raise_swallowed_cancel,
    stop_task,
    until_done,
)

LOGGER = "test.retry"


# -- backoff_delay ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "expected"), [
    (0, 0.1), (1, 0.2), (2, 0.4), (5, 3.2), (6, 5.0), (7, 5.0), (10_000, 5.0),
])
def test_commit_delay_doubles_from_a_tenth_up_to_five_seconds(attempt: int, expected: float) -> None:
    assert commit_delay(attempt) == pytest.approx(expected)


@pytest.mark.parametrize(("kwargs", "attempt", "expected"), [
    ({"base_s": 0.5, "factor": 2.0, "cap_s": 30.0}, 3, 4.0),
    ({"base_s": 0.5, "factor": 2.0, "cap_s": 30.0}, 6, 30.0),
    ({"base_s": 0.2, "factor": 2.0, "cap_s": 5.0}, 4, 3.2),
    ({"base_s": 1.0, "factor": 1.5, "cap_s": 1e9}, 2_000, 1e9),  # 1.5 ** 2000 overflows a float
    ({"base_s": 0.01, "factor": 2.0, "cap_s": 5.0, "floor_s": 0.1}, 1, 0.1),
], ids=["store-3", "store-capped", "forwarder-4", "overflow", "floor"])
def test_without_jitter_the_delay_is_the_bound(kwargs: dict[str, float], attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, jitter=False, **kwargs) == pytest.approx(expected)


def test_with_jitter_the_delay_is_spread_below_the_bound() -> None:
    for attempt in range(1, 12):
        bound = min(30.0, 1.5**attempt)
        samples = [backoff_delay(attempt) for _ in range(400)]
        assert all(0 <= s <= bound for s in samples), attempt
        assert statistics.pstdev(samples) > 0.1 * bound, attempt
    assert max(backoff_delay(10_000) for _ in range(1000)) <= 30.0


def test_the_floor_holds_under_jitter() -> None:
    samples = [backoff_delay(1, cap_s=1.5**10, floor_s=0.1) for _ in range(500)]
    assert min(samples) >= 0.1
    assert max(samples) <= 1.5


# -- StateLog --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_an_outage_is_logged_when_it_starts_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    state = StateLog(logging.getLogger(LOGGER), "serial device pm-1", clock=clock)
    state.up()  # up already: nothing to say
    for n in range(3):
        state.down(f"no such port ({n})")
    assert state.is_down
    assert state.failures == 3
    clock.now += 12.5
    state.up()
    state.up()
    assert not state.is_down
    assert state.failures == 0
    assert logged(caplog) == [
        ("WARNING", "serial device pm-1: unavailable (no such port (0)); retrying with backoff"),
        ("WARNING", "serial device pm-1: recovered after 12.5 s"),
    ]


def test_templates_levels_and_an_unknown_first_state(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    state = StateLog(
        logging.getLogger(LOGGER), "Kafka destination k", down="%(name)s: unavailable (%(reason)s); retrying",
        up="%(name)s: %(reason)s after %(failures)d failure(s)", up_level=logging.INFO, initially_up=None,
    )
    state.up("connected")  # the state was unknown: the first report is logged even when it is "up"
    state.down("timeout")
    state.down("timeout")
    state.up("sends succeed again")
    assert logged(caplog) == [
        ("INFO", "Kafka destination k: connected after 0 failure(s)"),
        ("WARNING", "Kafka destination k: unavailable (timeout); retrying"),
        ("INFO", "Kafka destination k: sends succeed again after 2 failure(s)"),
    ]


def test_an_unknown_first_state_that_is_down_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    state = StateLog(logging.getLogger(LOGGER), "x", initially_up=None)
    state.down("refused", exc_info=True)
    assert logged(caplog) == [("WARNING", "x: unavailable (refused); retrying with backoff")]


# -- until_done ------------------------------------------------------------------------------------


class Flaky:
    """Fails ``failures`` times with ``error``, then returns how many calls it took."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.left = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.error
        return self.calls


async def test_until_done_retries_and_logs_the_first_failure_and_the_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    delays: list[int] = []

    def no_wait(attempt: int) -> float:
        delays.append(attempt)
        return 0.0

    op = Flaky(3, OSError("disk full"))
    assert await until_done(op, what="journal commit", log=logging.getLogger(LOGGER), delay=no_wait) == 4
    assert delays == [1, 2, 3]
    assert logged(caplog) == [
        ("ERROR", "journal commit failed, retrying until it succeeds: disk full"),
        ("WARNING", "journal commit recovered after 3 failed attempt(s)"),
    ]


async def test_until_done_says_nothing_when_the_first_attempt_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert await until_done(Flaky(0, OSError()), what="w", log=logging.getLogger(LOGGER)) == 1
    assert logged(caplog) == []


async def test_until_done_lets_other_errors_through_at_once() -> None:
    op = Flaky(5, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await until_done(op, what="w", log=logging.getLogger(LOGGER), retry_on=(OSError,))
    assert op.calls == 1


async def test_until_done_logs_at_the_level_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await until_done(Flaky(1, TimeoutError("no answer")), what="forward n: connecting to nats://x",
                     log=logging.getLogger(LOGGER), delay=lambda _: 0.0, level=logging.WARNING)
    assert [level for level, _ in logged(caplog)] == ["WARNING", "WARNING"]


async def test_cancelling_until_done_ends_its_wait() -> None:
    op = Flaky(1_000_000, OSError("down"))
    task = asyncio.create_task(until_done(op, what="w", log=logging.getLogger(LOGGER), delay=lambda _: 3600.0))
    while op.calls == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    assert op.calls == 1


# -- cancel_and_wait / stop_task / raise_swallowed_cancel ------------------------------------------------

QUICK = 0.05  # a re-cancel interval for the tests


async def _answered_as_cancelled(answers: asyncio.Queue[asyncio.Future[int]], *, check: bool) -> None:
    """Waits for replies as pymodbus does (``asyncio.wait_for``), one after another, forever; with
    ``check``, calls ``raise_swallowed_cancel`` after each, as the Modbus driver does."""
    while True:
        reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await answers.put(reply)
        await asyncio.wait_for(reply, 10.0)
        if check:
            raise_swallowed_cancel()


async def _swallowing_task(*, check: bool = False) -> asyncio.Task[None]:
    """A task to be cancelled in the same loop step as its reply arrives (call ``cancel`` at once).
    On Python 3.11 ``wait_for`` then returns the reply and the task runs on; on 3.12 it ends."""
    answers: asyncio.Queue[asyncio.Future[int]] = asyncio.Queue()
    task = asyncio.create_task(_answered_as_cancelled(answers, check=check))
    reply = await answers.get()
    await asyncio.sleep(0)  # the task is in wait_for now
    reply.set_result(1)
    return task


async def test_one_cancel_may_be_swallowed_and_raise_swallowed_cancel_ends_the_task() -> None:
    task = await _swallowing_task()
    task.cancel()
    await asyncio.wait({task}, timeout=0.3)
    if sys.version_info < (3, 12):
        assert not task.done(), "Python 3.11's wait_for swallowed the cancel: the task runs on"
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()

    checked = await _swallowing_task(check=True)
    checked.cancel()
    await asyncio.wait({checked}, timeout=5)
    assert checked.cancelled()


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_its_cancel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = await _swallowing_task()
    async with asyncio.timeout(5):
        await cancel_and_wait(task, recancel_s=QUICK)  # its first cancel comes in the reply's step
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert "after it was cancelled: cancelling it again" in caplog.text


class _Stubborn:
    """A task body that ends on its ``n``-th cancel only (``cancels`` counts them)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cancels = 0

    async def __call__(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancels += 1
                if self.cancels == self.n:
                    raise


async def test_a_task_that_ignores_cancels_for_a_while_is_cancelled_until_it_ends() -> None:
    stubborn = _Stubborn(3)
    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await stop_task(task, recancel_s=QUICK)
    assert task.cancelled()
    assert stubborn.cancels == 3


async def test_a_cleanup_shorter_than_the_recancel_time_is_not_cut() -> None:
    steps: list[str] = []

    async def with_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            steps.append("cleanup started")
            await asyncio.sleep(0.3)  # a BLE disconnect, a broker's goodbye
            steps.append("cleanup done")

    task = asyncio.create_task(with_cleanup())
    await asyncio.sleep(0)
    await stop_task(task, recancel_s=1.0)
    assert steps == ["cleanup started", "cleanup done"]
    assert RECANCEL_S >= 1.0


async def test_cancelling_the_caller_finishes_the_stop_then_raises() -> None:
    deaf = True

    async def deaf_for_now() -> None:  # ignores every cancel while ``deaf``
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not deaf:
                    raise

    task = asyncio.create_task(deaf_for_now())
    await asyncio.sleep(0)
    caller = asyncio.create_task(stop_task(task, recancel_s=QUICK))
    await asyncio.sleep(3 * QUICK)
    caller.cancel()
    await asyncio.sleep(3 * QUICK)
    assert not caller.done(), "the stop goes on: the task is not left half-stopped and untracked"
    deaf = False
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await caller
    assert caller.cancelled()
    assert task.cancelled()


async def test_stop_task_raises_what_the_task_raised_and_cancel_and_wait_does_not() -> None:
    async def failing_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("the cleanup failed") from None

    first = asyncio.create_task(failing_on_cancel())
    second = asyncio.create_task(failing_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="the cleanup failed"):
        await stop_task(first)
    await cancel_and_wait(second, None)
    assert isinstance(second.exception(), RuntimeError)
    await stop_task(None)
    await cancel_and_wait()


async def test_a_stop_inside_a_stop_cancels_the_inner_task_again() -> None:
    """The outer stop's re-cancels interrupt the inner stop's wait; the inner one still re-cancels on time
    (SIGTERM while a reload stops a driver that swallowed its cancel)."""
    inner = asyncio.create_task(_Stubborn(2)())
    await asyncio.sleep(0)

    async def stopping_inner() -> None:
        await cancel_and_wait(inner, recancel_s=QUICK)

    outer = asyncio.create_task(stopping_inner())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await stop_task(outer, recancel_s=QUICK)
    assert inner.cancelled()
    assert outer.cancelled()
