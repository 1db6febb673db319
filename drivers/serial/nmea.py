"""Parser for NMEA 0183 position sentences (GGA and RMC) from GNSS receivers.

A sentence is one line of printable ASCII (NMEA 0183 4.11, section 5.3)::

    $<talker><type>,<field>,...,<field>*<HH><CR><LF>

``talker`` is two letters (``GP`` GPS, ``GL`` GLONASS, ``GA`` Galileo, ``GN``
combined, ...) and is accepted whatever it is; ``HH`` is the XOR of every
character between ``$`` and ``*``, in upper- or lower-case hex.  The checksum
is required here.  The standard caps a sentence at 82 characters including
``$`` and ``<CR><LF>``; receivers in high-precision modes exceed that a
little, so the limit is applied to the sentence *without* its line ending.

Only ``GGA`` (fix data) and ``RMC`` (recommended minimum) are decoded; every
other well-formed sentence is ``unsupported``.  Latitudes and longitudes come
out as signed decimal degrees (north and east positive), empty fields as
``None``.  A ``GGA`` with fix quality 0 or an ``RMC`` with status ``V``
decodes to ``FrameError("no_fix")``.

Nothing here does I/O and nothing raises on any input.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass

from drivers.reading import FrameError, Measurement
from drivers.serial.framing import MAX_GARBAGE_RUN, BytesLike, count_garbage, end_garbage
from drivers.serial.framing import as_bytes as _as_bytes

__all__ = [
    "KNOT_MPS",
    "MAX_GARBAGE_RUN",
    "MAX_SENTENCE_LEN",
    "BytesLike",
    "GgaFix",
    "NmeaStream",
    "RmcFix",
    "checksum",
    "parse_sentence",
]

MAX_SENTENCE_LEN = 82
"""Longest accepted sentence, ``$`` to checksum, without the line ending."""

"""Text outside sentences is reported as one ``garbage`` error per run: when a
sentence ends the run, or as soon as the run reaches this many bytes."""

KNOT_MPS = 1852 / 3600
"""One knot (nautical mile per hour) in m/s."""


_SENTENCE = re.compile(r"\$([A-Z0-9]{1,10}),([\x20-\x7e]*)\*([0-9A-Fa-f]{2})")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SIGNED = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_TIME = re.compile(r"([0-9]{2})([0-9]{2})([0-9]{2})(?:\.([0-9]{1,6}))?")
_DATE = re.compile(r"([0-9]{2})([0-9]{2})([0-9]{2})")
_DELIMS = re.compile(rb"[$\n]")

_GGA_FIELDS = 14
_RMC_FIELDS = (11, 12, 13)  # NMEA 2.3 adds the mode indicator, 4.1 the navigational status


class _FieldError(ValueError):
    """Internal: a field that does not parse; becomes ``FrameError("bad_field")``."""


@dataclass(frozen=True, slots=True)
class GgaFix:
    """A ``GGA`` sentence: time, position and quality of a fix."""

    talker: str
    time: dt.time | None
    """UTC time of the fix (no date in GGA)."""
    latitude: float | None
    longitude: float | None
    fix_quality: int
    """1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning, ... (never 0 here)."""
    satellites: int | None
    hdop: float | None
    altitude: float | None
    """Antenna altitude above mean sea level, in metres."""
    geoid_separation: float | None
    """Geoid height above the WGS84 ellipsoid, in metres."""

    def measurements(self) -> tuple[Measurement, ...]:
        """Position, altitude, satellites and HDOP; empty fields are left out."""
        return _present(
            ("latitude", self.latitude, "°"),
            ("longitude", self.longitude, "°"),
            ("altitude", self.altitude, "m"),
            ("satellites", None if self.satellites is None else float(self.satellites), None),
            ("hdop", self.hdop, None),
        )


@dataclass(frozen=True, slots=True)
class RmcFix:
    """An ``RMC`` sentence with status ``A`` (valid)."""

    talker: str
    timestamp: dt.datetime | None
    """UTC date and time of the fix; ``None`` when either field is empty."""
    status: str
    """``A`` (valid); ``V`` sentences decode to ``FrameError("no_fix")``."""
    latitude: float | None
    longitude: float | None
    speed_knots: float | None
    course: float | None
    """Course over ground, degrees true."""
    magnetic_variation: float | None
    """Degrees, east positive."""

    @property
    def speed_mps(self) -> float | None:
        """Speed over ground in m/s."""
        return None if self.speed_knots is None else self.speed_knots * KNOT_MPS

    def measurements(self) -> tuple[Measurement, ...]:
        """Position, speed (m/s) and course; empty fields are left out."""
        return _present(
            ("latitude", self.latitude, "°"),
            ("longitude", self.longitude, "°"),
            ("speed", self.speed_mps, "m/s"),
            ("course", self.course, "°"),
        )


def _present(*items: tuple[str, float | None, str | None]) -> tuple[Measurement, ...]:
    return tuple(Measurement(metric, value, unit) for metric, value, unit in items if value is not None)


def checksum(body: str) -> int:
    """XOR of the characters of ``body`` (the text between ``$`` and ``*``)."""
    value = 0
    for ch in body.encode("ascii", "replace"):
        value ^= ch
    return value


# ------------------------------------------------------------------ fields


def _float(text: str, name: str, *, signed: bool = False) -> float | None:
    if not text:
        return None
    if not (_SIGNED if signed else _DECIMAL).fullmatch(text):
        raise _FieldError(f"{name} {text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise _FieldError(f"{name} {text!r} is out of range")
    return value


def _int(text: str, name: str) -> int | None:
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        raise _FieldError(f"{name} {text!r} is not an integer")
    return int(text)


def _time(text: str) -> dt.time | None:
    if not text:
        return None
    m = _TIME.fullmatch(text)
    if m is None:
        raise _FieldError(f"time {text!r} is not hhmmss[.sss]")
    hh, mm, ss = int(m[1]), int(m[2]), int(m[3])
    if hh > 23 or mm > 59 or ss > 59:  # a leap second (60) is rejected too: datetime cannot hold it
        raise _FieldError(f"time {text!r} out of range")
    micro = int(m[4].ljust(6, "0")) if m[4] else 0
    return dt.time(hh, mm, ss, micro, tzinfo=dt.UTC)


def _date(text: str) -> dt.date | None:
    if not text:
        return None
    m = _DATE.fullmatch(text)
    if m is None:
        raise _FieldError(f"date {text!r} is not ddmmyy")
    day, month, yy = int(m[1]), int(m[2]), int(m[3])
    # Two-digit years: GPS time starts in 1980, so 80..99 are 19xx and the rest 20xx.
    year = 1900 + yy if yy >= 80 else 2000 + yy
    try:
        return dt.date(year, month, day)
    except ValueError:
        raise _FieldError(f"date {text!r} out of range") from None


def _coordinate(value: str, hemisphere: str, *, lon: bool) -> float | None:
    """``ddmm.mmmm`` / ``dddmm.mmmm`` plus ``N``/``S`` or ``E``/``W`` as signed degrees."""
    name = "longitude" if lon else "latitude"
    if not value and not hemisphere:
        return None
    positive, negative = ("E", "W") if lon else ("N", "S")
    if hemisphere not in (positive, negative):
        raise _FieldError(f"{name} hemisphere {hemisphere!r}")
    if not _DECIMAL.fullmatch(value):
        raise _FieldError(f"{name} {value!r} is not a number")
    whole, _, fraction = value.partition(".")
    if not 3 <= len(whole) <= (5 if lon else 4):  # at least one degree digit and two minute digits
        raise _FieldError(f"{name} {value!r} is not {'dddmm' if lon else 'ddmm'}.mmmm")
    degrees = int(whole[:-2])
    minutes = float(f"{whole[-2:]}.{fraction or '0'}")
    result = degrees + minutes / 60
    if minutes >= 60 or result > (180 if lon else 90):
        raise _FieldError(f"{name} {value!r} out of range")
    return -result if hemisphere == negative else result


# ---------------------------------------------------------------- sentences


def _gga(talker: str, f: list[str]) -> GgaFix | FrameError:
    if len(f) != _GGA_FIELDS:
        raise _FieldError(f"GGA has {len(f)} fields, expected {_GGA_FIELDS}")
    quality = _int(f[5], "fix quality")
    if quality is None:
        raise _FieldError("fix quality is empty")
    if quality == 0:
        return FrameError("no_fix", f"{talker}GGA fix quality 0")
    for unit in (f[9], f[11]):
        if unit not in ("M", ""):
            raise _FieldError(f"altitude unit {unit!r}")
    return GgaFix(
        talker=talker,
        time=_time(f[0]),
        latitude=_coordinate(f[1], f[2], lon=False),
        longitude=_coordinate(f[3], f[4], lon=True),
        fix_quality=quality,
        satellites=_int(f[6], "satellites"),
        hdop=_float(f[7], "hdop"),
        altitude=_float(f[8], "altitude", signed=True),
        geoid_separation=_float(f[10], "geoid separation", signed=True),
    )


def _rmc(talker: str, f: list[str]) -> RmcFix | FrameError:
    if len(f) not in _RMC_FIELDS:
        raise _FieldError(f"RMC has {len(f)} fields, expected 11 to 13")
    status = f[1]
    if status == "V":
        return FrameError("no_fix", f"{talker}RMC status V")
    if status != "A":
        raise _FieldError(f"status {status!r}")
    fix_time = _time(f[0])
    fix_date = _date(f[8])
    variation = _float(f[9], "magnetic variation")
    if variation is not None or f[10]:
        if f[10] not in ("E", "W") or variation is None:
            raise _FieldError(f"magnetic variation {f[9]!r} {f[10]!r}")
        if f[10] == "W":
            variation = -variation
    return RmcFix(
        talker=talker,
        timestamp=None if fix_time is None or fix_date is None else dt.datetime.combine(fix_date, fix_time),
        status=status,
        latitude=_coordinate(f[2], f[3], lon=False),
        longitude=_coordinate(f[4], f[5], lon=True),
        speed_knots=_float(f[6], "speed"),
        course=_float(f[7], "course"),
        magnetic_variation=variation,
    )


def _as_text(sentence: object) -> str | None:
    if isinstance(sentence, str):
        return sentence
    if isinstance(sentence, bytes | bytearray | memoryview):
        data = _as_bytes(sentence)
        # Non-ASCII bytes become U+FFFD, which the printable-ASCII check rejects as bad_format.
        return None if data is None else data.decode("ascii", "replace")
    return None


def parse_sentence(sentence: str | BytesLike) -> GgaFix | RmcFix | FrameError:
    """Decode one sentence; a trailing ``CR LF`` or ``LF`` is ignored.

    Error reasons, checked in this order: ``bad_input`` (neither text nor
    bytes), ``too_long`` (over :data:`MAX_SENTENCE_LEN`), ``bad_format`` (not
    printable ASCII, or not ``$<address>,...*HH``), ``bad_checksum``,
    ``unsupported`` (a sentence type other than GGA and RMC), ``no_fix``,
    ``bad_field`` (wrong field count or a value that does not parse).
    """
    text = _as_text(sentence)
    if text is None:
        return FrameError("bad_input", f"expected str or bytes, got {type(sentence).__name__}")
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    if len(text) > MAX_SENTENCE_LEN:
        return FrameError("too_long", f"{len(text)} characters, at most {MAX_SENTENCE_LEN}")
    if not _PRINTABLE.fullmatch(text):
        return FrameError("bad_format", "not printable ASCII")
    m = _SENTENCE.fullmatch(text)
    if m is None:
        return FrameError("bad_format", "not $<address>,<fields>*HH")
    address, fields_text, stored = m[1], m[2], int(m[3], 16)
    computed = checksum(f"{address},{fields_text}")
    if computed != stored:
        return FrameError("bad_checksum", f"computed {computed:02X}, sentence has {stored:02X}")
    kind = address[2:] if len(address) == 5 and not address.startswith("P") else ""
    if kind not in ("GGA", "RMC"):
        return FrameError("unsupported", address)
    talker = address[:2]
    fields = fields_text.split(",")
    try:
        return _gga(talker, fields) if kind == "GGA" else _rmc(talker, fields)
    except _FieldError as exc:
        return FrameError("bad_field", f"{address}: {exc}")


class NmeaStream:
    """Incremental decoder of an NMEA 0183 byte stream.

    Every ``$`` starts a sentence and ``LF`` ends it (a ``CR`` before it is
    dropped).  :meth:`feed` accepts reads of any size, split anywhere, and
    returns what the read completed, in stream order:

    * a :class:`GgaFix` / :class:`RmcFix`, or the sentence's error from
      :func:`parse_sentence`; ``unsupported`` sentences are also counted in
      :attr:`unsupported`;
    * text outside sentences (a partial line after connecting, noise, a
      sentence cut short by the next ``$``) is skipped and reported once per
      run as ``FrameError("garbage", "<n> bytes skipped")`` (``CR``/``LF`` are
      not counted, so blank lines are silent), when a sentence ends the run or
      when the run reaches :data:`MAX_GARBAGE_RUN` bytes;
    * a sentence that grows past :data:`MAX_SENTENCE_LEN` without ending is
      reported once as ``too_long`` and dropped up to the next ``LF`` or ``$``.

    At most ``MAX_SENTENCE_LEN + 1`` bytes are held between calls.  Never
    raises.
    """

    __slots__ = ("_buf", "_garbage", "_skipping", "unsupported")

    def __init__(self) -> None:
        self._buf = b""  # the current sentence, from its "$"; empty outside sentences
        self._skipping = False  # inside a sentence already reported as too_long
        self._garbage = 0
        self.unsupported = 0
        """Well-formed sentences of a type other than GGA/RMC seen so far."""

    @property
    def buffered(self) -> int:
        """Bytes held back as the start of an unfinished sentence."""
        return len(self._buf)

    @property
    def pending_garbage(self) -> int:
        """Skipped bytes of the current garbage run, not reported yet."""
        return self._garbage

    def feed(self, data: BytesLike) -> list[GgaFix | RmcFix | FrameError]:
        """Decode one read; see the class docstring for what comes out."""
        chunk = _as_bytes(data)
        if chunk is None:
            return [FrameError("bad_input", f"expected bytes, got {type(data).__name__}")]
        out: list[GgaFix | RmcFix | FrameError] = []
        pos = 0
        n = len(chunk)
        while pos <= n:
            m = _DELIMS.search(chunk, pos)
            end = n if m is None else m.start()
            self._consume(chunk[pos:end], out)
            if m is None:
                break
            if chunk[end] == 0x0A:  # LF
                if self._buf:
                    self._end_run(out)
                    result = parse_sentence(self._buf)
                    if isinstance(result, FrameError) and result.reason == "unsupported":
                        self.unsupported += 1
                    out.append(result)
                self._buf = b""
                self._skipping = False
            else:  # "$": a new sentence; an unfinished one before it is garbage
                self._drop_buf(out)
                self._skipping = False
                self._buf = b"$"
            pos = end + 1
        return out

    def flush(self) -> list[FrameError]:
        """End of stream: report the pending garbage run and an unfinished
        sentence (as ``truncated``), then reset (:attr:`unsupported` is kept)."""
        out: list[GgaFix | RmcFix | FrameError] = []
        self._end_run(out)
        errors = [e for e in out if isinstance(e, FrameError)]
        if self._buf:
            errors.append(FrameError("truncated", f"{len(self._buf)} bytes at end of stream"))
        self._buf = b""
        self._skipping = False
        return errors

    def _consume(self, segment: bytes, out: list[GgaFix | RmcFix | FrameError]) -> None:
        """Text between delimiters: part of the current sentence, or garbage."""
        if not segment or self._skipping:
            return
        if not self._buf:
            self._count_garbage(len(segment) - segment.count(b"\r"), out)
            return
        self._buf += segment[: MAX_SENTENCE_LEN + 2 - len(self._buf)]  # the rest would be dropped anyway
        if len(self._buf) > MAX_SENTENCE_LEN + 1:  # room for the CR of a CR LF
            self._end_run(out)
            out.append(FrameError("too_long", f"no line end within {MAX_SENTENCE_LEN} characters"))
            self._buf = b""
            self._skipping = True

    def _drop_buf(self, out: list[GgaFix | RmcFix | FrameError]) -> None:
        if self._buf:
            self._count_garbage(len(self._buf) - self._buf.count(b"\r"), out)
            self._buf = b""

    def _count_garbage(self, count: int, out: list[GgaFix | RmcFix | FrameError]) -> None:
        self._garbage = count_garbage(self._garbage + count, out)

    def _end_run(self, out: list[GgaFix | RmcFix | FrameError]) -> None:
        self._garbage = end_garbage(self._garbage, out)


