"""What every serial stream decoder shares: accepting bytes-like input, and reporting skipped
garbage once per run (or every :data:`MAX_GARBAGE_RUN` bytes of a run that does not end)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from drivers.reading import FrameError

MAX_GARBAGE_RUN = 256
F = TypeVar("F")
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


class HeaderFrameStream(Generic[F]):
    """An incremental decoder for frames that begin with a two-byte header (SDS011 ``AA C0``,
    PMS5003 ``42 4D``) and carry a checksum, resynchronising on garbage. A subclass says what the
    header is, how long a frame at an offset is, how to decode it and how to name a rejected one:

    * bytes before a header are reported as one ``garbage`` error per run (see :func:`count_garbage`);
    * a candidate the decoder rejects is reported once, by :meth:`_reject`, and decoding resumes at
      the byte after its first header byte, so a real frame inside a bogus candidate is still found;
      bytes of a rejected candidate are not counted again as garbage;
    * a decode result with reason ``reply`` (a valid command reply) emits nothing and increments
      :attr:`replies`.

    Only an incomplete candidate is kept between calls; :meth:`flush` reports it and any pending
    garbage run at end of stream. Never raises.
    """

    __slots__ = ("_buf", "_garbage", "_quiet", "replies")

    HEADER_BYTE: bytes  # the first header byte, as a one-byte string
    LENGTH_AT = 2  # bytes needed from a header on before :meth:`_total` can answer

    def __init__(self) -> None:
        self._buf = b""
        self._garbage = 0  # skipped bytes of the current garbage run, not yet reported
        self._quiet = 0  # bytes at the start of ``_buf`` that belong to a rejected candidate
        self.replies = 0
        """Valid command-reply frames seen so far."""

    def _second_ok(self, byte: int) -> bool:
        """Whether ``byte`` can follow the first header byte."""
        raise NotImplementedError

    def _total(self, buf: bytes, i: int) -> int | FrameError:
        """The whole length of the candidate at ``buf[i]`` (``LENGTH_AT`` bytes are there), or why it
        cannot be one."""
        raise NotImplementedError

    def _decode(self, buf: bytes, i: int, total: int) -> F | FrameError:
        raise NotImplementedError

    def _reject(self, buf: bytes, i: int, total: int, error: FrameError) -> FrameError:
        """How to report a candidate :meth:`_decode` refused (e.g. ``truncated`` when a new header
        starts inside it)."""
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes held back as the start of an incomplete frame."""
        return len(self._buf)

    @property
    def pending_garbage(self) -> int:
        """Skipped bytes of the current garbage run, not reported yet."""
        return self._garbage

    def feed(self, data: BytesLike) -> list[F | FrameError]:
        """Decode one read; see the class docstring for what comes out."""
        chunk = as_bytes(data)
        if chunk is None:
            return [bad_input(data)]
        out: list[F | FrameError] = []
        buf = self._buf + chunk if self._buf else chunk
        n = len(buf)
        quiet_end = self._quiet
        i = 0
        while i < n:
            j = buf.find(self.HEADER_BYTE, i)
            if j < 0:
                self._skip(i, n, quiet_end, out)
                i = n
                break
            if j > i:
                self._skip(i, j, quiet_end, out)
                i = j
            if i + 1 >= n:
                break  # a lone first header byte: wait for the next one
            if not self._second_ok(buf[i + 1]):
                self._skip(i, i + 1, quiet_end, out)
                i += 1
                continue
            if n - i < self.LENGTH_AT:
                break  # wait for the length field
            total = self._total(buf, i)
            if isinstance(total, FrameError):
                self._end_run(out)
                out.append(total)
                quiet_end = max(quiet_end, i + self.LENGTH_AT)
                i += 1
                continue
            if n - i < total:
                break  # wait for the rest of the candidate
            self._end_run(out)
            result = self._decode(buf, i, total)
            if not isinstance(result, FrameError):
                out.append(result)
                i += total
            elif result.reason == "reply":
                self.replies += 1
                i += total
            else:
                out.append(self._reject(buf, i, total, result))
                quiet_end = max(quiet_end, i + total)
                i += 1
        self._buf = buf[i:]
        self._quiet = max(0, quiet_end - i)
        return out

    def flush(self) -> list[FrameError]:
        """End of stream: report the pending garbage run and any incomplete frame (as ``truncated``),
        then reset (the :attr:`replies` count is kept)."""
        out: list[F | FrameError] = []
        self._end_run(out)
        errors = [e for e in out if isinstance(e, FrameError)]
        if self._buf:
            errors.append(FrameError("truncated", f"{len(self._buf)} bytes at end of stream"))
        self._buf = b""
        self._quiet = 0
        return errors

    def _skip(self, start: int, stop: int, quiet_end: int, out: list[Any]) -> None:
        """Account for skipping ``buf[start:stop]``."""
        counted = stop - max(start, quiet_end)
        if counted > 0:
            self._garbage = count_garbage(self._garbage + counted, out)

    def _end_run(self, out: list[Any]) -> None:
        self._garbage = end_garbage(self._garbage, out)
