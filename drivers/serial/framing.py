"""What every serial stream decoder shares: accepting bytes-like input, and reporting skipped
garbage once per run (or every :data:`MAX_GARBAGE_RUN` bytes of a run that does not end)."""

from __future__ import annotations

from typing import Any

from drivers.reading import FrameError

MAX_GARBAGE_RUN = 256
BytesLike = bytes | bytearray | memoryview


def as_bytes(data: object) -> bytes | None:
    """``data`` as ``bytes``, or ``None`` when it is not a bytes-like object."""
    if type(data) is bytes:
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            return bytes(data)
        except (ValueError, TypeError, BufferError):  # e.g. a released memoryview
            return None
    return None


def bad_input(data: object) -> FrameError:
    return FrameError("bad_input", f"expected bytes, got {type(data).__name__}")


def count_garbage(pending: int, out: list[Any]) -> int:
    """Report each full :data:`MAX_GARBAGE_RUN` of a garbage run; returns what is still pending."""
    while pending >= MAX_GARBAGE_RUN:
        out.append(FrameError("garbage", f"{MAX_GARBAGE_RUN} bytes skipped"))
        pending -= MAX_GARBAGE_RUN
    return pending


def end_garbage(pending: int, out: list[Any]) -> int:
    """The run ended: report what it skipped; returns 0, the new pending count."""
    if pending:
        out.append(FrameError("garbage", f"{pending} bytes skipped"))
    return 0
