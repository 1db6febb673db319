"""Parsers for two simple line-oriented text protocols of hobbyist firmware.

* **JSON lines** (:class:`JsonLinesStream`): one JSON object per line, each
  member a metric name and a number, e.g. ``{"temperature": 21.5, "humidity": 40}``.
  Units are not carried (every value gets unit ``None``).  A ``ts`` member is
  not a metric but the device's clock, in epoch seconds (:attr:`TextFrame.device_ts`).
* **key=value** (:class:`KeyValueStream`): ``temperature=21.5 humidity=40%``,
  pairs separated by spaces, tabs, commas or semicolons; a unit may follow the
  number directly (``temp=21.5C`` -> unit ``"C"``).

Lines end with ``LF`` (a ``CR`` before it is dropped); blank lines are skipped
silently; a line is at most :data:`MAX_LINE_LEN` bytes without its line
ending.  A line is decoded as a whole: one bad field rejects the line.  Metric
names are ``[A-Za-z_][A-Za-z0-9_]*``, at most 64 characters.

Error reasons: ``too_long``, ``invalid_utf8``, ``bad_json``, ``not_object``,
``empty`` (an object without members), ``bad_key`` (not a metric name),
``bad_token`` (a key=value token without ``=``), ``duplicate_key``,
``non_numeric`` (a value that is not a finite number; ``true``/``false``,
``null``, strings, ``NaN`` included), ``bad_ts`` (a JSON ``ts`` that is not a
non-negative finite number of epoch seconds), ``truncated`` (an unfinished line at
:meth:`flush`), ``bad_input`` (:meth:`feed` given something other than bytes).

Nothing here does I/O and nothing raises on any input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from drivers.reading import FrameError, Measurement
from drivers.serial.framing import BytesLike
from drivers.serial.framing import as_bytes as _as_bytes

__all__ = [
    "MAX_LINE_LEN",
    "BytesLike",
    "JsonLinesStream",
    "KeyValueStream",
    "TextFrame",
    "parse_json_line",
    "parse_key_value_line",
]

TS_KEY = "ts"
_MAX_TS = 253402300800.0  # 10000-01-01: beyond what a datetime holds

MAX_LINE_LEN = 512
"""Longest accepted line in bytes, without its ``CR LF`` / ``LF``."""


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SEPARATORS = re.compile(r"[\s,;]+")
_NUMBER_UNIT = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)([^\s,;=0-9.+-][^\s,;=]*)?")


@dataclass(frozen=True, slots=True)
class TextFrame:
    """The values of one decoded line, in line order."""

    values: tuple[Measurement, ...]
    device_ts: float | None = None
    """The device's clock (JSON lines ``ts``), epoch seconds; ``None`` when the line has none."""

    def measurements(self) -> tuple[Measurement, ...]:
        return self.values


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its member list, so duplicates stay visible."""


def _decode(line: bytes) -> str | FrameError:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FrameError("invalid_utf8", f"byte 0x{line[exc.start]:02X} at offset {exc.start}")


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def _check_key(key: str, seen: set[str]) -> FrameError | None:
    if not _KEY.fullmatch(key):
        return FrameError("bad_key", f"{key[:40]!r} is not a metric name")
    if key in seen:
        return FrameError("duplicate_key", key)
    seen.add(key)
    return None


def parse_json_line(line: str | BytesLike) -> TextFrame | FrameError | None:
    """Decode one JSON-lines line (without its line ending); ``None`` for a blank line."""
    text = line if isinstance(line, str) else _decode(bytes(line))
    if isinstance(text, FrameError):
        return text
    if not text.strip():
        return None
    try:
        # NaN/Infinity come back as strings and so end up as non_numeric.
        obj = json.loads(text, object_pairs_hook=_Pairs, parse_constant=str)
    except (ValueError, RecursionError) as exc:
        return FrameError("bad_json", str(exc)[:80])
    if not isinstance(obj, _Pairs):
        return FrameError("not_object", f"a JSON {type(obj).__name__}, expected an object")
    if not obj:
        return FrameError("empty", "an object without members")
    seen: set[str] = set()
    values: list[Measurement] = []
    device_ts: float | None = None
    for key, raw in obj:
        error = _check_key(key, seen)
        if error is not None:
            return error
        value = _finite(raw)
        if key == TS_KEY:
            if value is None or value < 0 or value >= _MAX_TS:
                return FrameError("bad_ts", "ts: not epoch seconds")
            device_ts = value
            continue
        if value is None:
            return FrameError("non_numeric", f"{key}: not a finite number")
        values.append(Measurement(key, value, None))
    if not values:
        return FrameError("empty", "no metric besides ts")
    return TextFrame(tuple(values), device_ts)


def parse_key_value_line(line: str | BytesLike) -> TextFrame | FrameError | None:
    """Decode one key=value line (without its line ending); ``None`` for a blank line."""
    text = line if isinstance(line, str) else _decode(bytes(line))
    if isinstance(text, FrameError):
        return text
    seen: set[str] = set()
    values: list[Measurement] = []
    for token in _SEPARATORS.split(text):
        if not token:
            continue
        key, eq, raw = token.partition("=")
        if not eq or not key:
            return FrameError("bad_token", f"{token[:40]!r} is not key=value")
        error = _check_key(key, seen)
        if error is not None:
            return error
        m = _NUMBER_UNIT.fullmatch(raw)
        value = None if m is None else _finite(float(m[1]))
        if m is None or value is None:
            return FrameError("non_numeric", f"{key}: {raw[:40]!r} is not a number")
        values.append(Measurement(key, value, m[2]))
    return TextFrame(tuple(values)) if values else None




class _LineStream:
    """Splits a byte stream into lines and decodes each with ``_parse``.

    At most ``MAX_LINE_LEN + 1`` bytes (a line and its CR) are held between
    calls; a line that grows past that is reported once as ``too_long`` and
    dropped up to the next ``LF``.
    """

    __slots__ = ("_buf", "_skipping")

    _parse: Callable[[bytes], TextFrame | FrameError | None]

    def __init__(self) -> None:
        self._buf = b""
        self._skipping = False

    @property
    def buffered(self) -> int:
        """Bytes held back as the start of an unfinished line."""
        return len(self._buf)

    def feed(self, data: BytesLike) -> list[TextFrame | FrameError]:
        """Decode one read (of any size, split anywhere): the lines it completed, in order."""
        chunk = _as_bytes(data)
        if chunk is None:
            return [FrameError("bad_input", f"expected bytes, got {type(data).__name__}")]
        out: list[TextFrame | FrameError] = []
        pos = 0
        while True:
            nl = chunk.find(b"\n", pos)
            end = len(chunk) if nl < 0 else nl
            if not self._skipping:
                self._buf += chunk[pos : min(end, pos + MAX_LINE_LEN + 2 - len(self._buf))]
                if len(self._buf) > MAX_LINE_LEN + 1:
                    out.append(FrameError("too_long", f"no line end within {MAX_LINE_LEN} bytes"))
                    self._buf = b""
                    self._skipping = True
            if nl < 0:
                return out
            if not self._skipping:
                line = self._buf[:-1] if self._buf.endswith(b"\r") else self._buf
                result = (
                    FrameError("too_long", f"{len(line)} bytes, at most {MAX_LINE_LEN}")
                    if len(line) > MAX_LINE_LEN
                    else type(self)._parse(line)
                )
                if result is not None:
                    out.append(result)
            self._buf = b""
            self._skipping = False
            pos = nl + 1

    def flush(self) -> list[FrameError]:
        """End of stream: report an unfinished line (as ``truncated``) and reset."""
        errors = [FrameError("truncated", f"{len(self._buf)} bytes at end of stream")] if self._buf else []
        self._buf = b""
        self._skipping = False
        return errors


class JsonLinesStream(_LineStream):
    """Incremental decoder of newline-delimited JSON objects (see :func:`parse_json_line`)."""

    __slots__ = ()
    _parse = staticmethod(parse_json_line)


class KeyValueStream(_LineStream):
    """Incremental decoder of ``key=value`` lines (see :func:`parse_key_value_line`)."""

    __slots__ = ()
    _parse = staticmethod(parse_key_value_line)
