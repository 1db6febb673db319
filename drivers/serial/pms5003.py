"""Frame parser for the Plantower PMS5003 particulate-matter sensor.

The sensor talks 9600 8N1 and, in its default active mode, sends one 32-byte
frame per 200..2300 ms (datasheet "Appendix I: PMS5003 transport protocol")::

    offset  0   1   2..3      4..29                          30..31
            42  4D  00 1C     13 big-endian uint16 data words checksum

The frame length field counts the bytes after it (13 words + checksum = 28).
The data words are, in order: PM1.0, PM2.5, PM10 "CF=1" (standard particle),
PM1.0, PM2.5, PM10 under atmospheric environment (all µg/m³), the numbers of
particles with diameter beyond 0.3, 0.5, 1.0, 2.5, 5.0 and 10 µm in 0.1 L of
air, and a reserved word.  The checksum is the sum of bytes 0..29 as a
big-endian ``uint16``.

In passive mode the sensor answers commands with 8-byte frames of frame length
4 (``42 4D 00 04 <cmd> <data> <checksum>``).  These *replies* carry no
measurement:

* :func:`parse_frame` returns ``FrameError("reply", ...)`` for a valid one;
* :class:`Pms5003Stream` emits nothing for them and only counts them in
  :attr:`Pms5003Stream.replies`.

Nothing here does I/O and nothing raises on any input.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.reading import FrameError, Measurement
from drivers.serial.framing import MAX_GARBAGE_RUN, BytesLike, HeaderFrameStream
from drivers.serial.framing import as_bytes as _as_bytes
from drivers.serial.framing import bad_input as _bad_input

__all__ = [
    "COUNT_UNIT",
    "FRAME_LEN",
    "MAX_GARBAGE_RUN",
    "PM_UNIT",
    "REPLY_LEN",
    "BytesLike",
    "Pms5003Frame",
    "Pms5003Stream",
    "parse_frame",
]

FRAME_LEN = 32
"""Length in bytes of a data frame."""
REPLY_LEN = 8
"""Length in bytes of a command reply frame."""

HEADER = b"\x42\x4d"
_START = 0x42
_START2 = 0x4D
_DATA_FRAME_LENGTH = FRAME_LEN - 4  # the length field of a data frame: 28
_REPLY_FRAME_LENGTH = REPLY_LEN - 4  # ... and of a command reply: 4

PM_UNIT = "µg/m³"
COUNT_UNIT = "#/0.1L"

"""A run of skipped bytes is reported as one ``garbage`` error when it ends, or
as soon as it reaches this many bytes (and a new run starts)."""

"""What the decoders accept (anything else is reported as ``bad_input``)."""


@dataclass(frozen=True, slots=True)
class Pms5003Frame:
    """One decoded PMS5003 data frame; concentrations in µg/m³, counts per 0.1 L."""

    pm1_0_cf1: int
    pm2_5_cf1: int
    pm10_cf1: int
    pm1_0: int
    """PM1.0 under atmospheric environment."""
    pm2_5: int
    """PM2.5 under atmospheric environment."""
    pm10: int
    """PM10 under atmospheric environment."""
    particles_0_3um: int
    particles_0_5um: int
    particles_1_0um: int
    particles_2_5um: int
    particles_5_0um: int
    particles_10um: int
    reserved: int

    def measurements(self) -> tuple[Measurement, ...]:
        """The atmospheric concentrations and the particle counts."""
        return (
            Measurement("pm1_0", float(self.pm1_0), PM_UNIT),
            Measurement("pm2_5", float(self.pm2_5), PM_UNIT),
            Measurement("pm10", float(self.pm10), PM_UNIT),
            Measurement("particles_0_3um", float(self.particles_0_3um), COUNT_UNIT),
            Measurement("particles_0_5um", float(self.particles_0_5um), COUNT_UNIT),
            Measurement("particles_1_0um", float(self.particles_1_0um), COUNT_UNIT),
            Measurement("particles_2_5um", float(self.particles_2_5um), COUNT_UNIT),
            Measurement("particles_5_0um", float(self.particles_5_0um), COUNT_UNIT),
            Measurement("particles_10um", float(self.particles_10um), COUNT_UNIT),
        )




def _u16(buf: bytes, k: int) -> int:
    return buf[k] << 8 | buf[k + 1]


def _total_len(frame_length: int) -> int | None:
    """Total frame size for a length field, or ``None`` when it is not one we know."""
    if frame_length == _DATA_FRAME_LENGTH:
        return FRAME_LEN
    if frame_length == _REPLY_FRAME_LENGTH:
        return REPLY_LEN
    return None


def _bad_frame_length(frame_length: int) -> FrameError:
    return FrameError("bad_frame_length", f"length field {frame_length}, expected 28 (or 4 for a reply)")


def _decode_at(buf: bytes, i: int, total: int) -> Pms5003Frame | FrameError:
    """Check and decode the ``total`` (32 or 8) bytes at ``buf[i:]``.

    The caller guarantees the length, the header and a matching length field.
    """
    end = i + total
    computed = sum(buf[i : end - 2]) & 0xFFFF
    stored = _u16(buf, end - 2)
    if computed != stored:
        return FrameError("bad_checksum", f"computed 0x{computed:04X}, frame has 0x{stored:04X}")
    if total == REPLY_LEN:
        return FrameError("reply", f"command reply 0x{buf[i + 4]:02X}")
    return Pms5003Frame(*(_u16(buf, k) for k in range(i + 4, i + 30, 2)))


def parse_frame(frame: BytesLike) -> Pms5003Frame | FrameError:
    """Decode exactly one frame (32 bytes, or an 8-byte command reply).

    Error reasons: ``truncated`` (shorter than its length field says),
    ``bad_length`` (longer), ``bad_header`` (not ``42 4D``),
    ``bad_frame_length`` (length field neither 28 nor 4), ``bad_checksum``,
    ``reply`` (a valid command reply), ``bad_input`` (not bytes).
    """
    data = _as_bytes(frame)
    if data is None:
        return _bad_input(frame)
    if len(data) < 4:
        return FrameError("truncated", f"{len(data)} bytes, expected {FRAME_LEN}")
    if data[:2] != HEADER:
        return FrameError("bad_header", f"expected 0x424D, got 0x{_u16(data, 0):04X}")
    frame_length = _u16(data, 2)
    total = _total_len(frame_length)
    if total is None:
        return _bad_frame_length(frame_length)
    if len(data) != total:
        reason = "truncated" if len(data) < total else "bad_length"
        return FrameError(reason, f"{len(data)} bytes, expected {total}")
    return _decode_at(data, 0, total)


def _is_header_at(buf: bytes, k: int) -> bool:
    return buf[k] == _START and k + 1 < len(buf) and buf[k + 1] == _START2


class Pms5003Stream(HeaderFrameStream[Pms5003Frame]):
    """Incremental, resynchronising decoder of a PMS5003 byte stream.

    :meth:`feed` accepts reads of any size, split at any byte boundary, and
    returns the frames and errors completed by that read, in stream order:

    * bytes that cannot start a frame are skipped; each contiguous run of
      skipped bytes is reported once, as ``FrameError("garbage", "<n> bytes
      skipped")``, when the run ends (a frame candidate starts) or when it
      reaches :data:`MAX_GARBAGE_RUN` bytes;
    * a candidate (``42 4D``) whose length field is neither 28 nor 4 is
      reported as ``bad_frame_length``; one with a wrong checksum as
      ``bad_checksum`` -- or as ``truncated`` when another header starts inside
      it, the usual sign of a frame cut short.  Decoding then resumes at the
      byte after its ``42``, so a real frame inside a bogus candidate is still
      found; bytes of a rejected candidate are not counted again as garbage;
    * valid command replies emit nothing and increment :attr:`replies`.

    Only an incomplete frame candidate (at most 31 bytes) is kept between
    calls; :meth:`flush` reports it and any pending garbage run at end of
    stream.  Never raises.
    """

    __slots__ = ()

    HEADER_BYTE = bytes([_START])
    LENGTH_AT = 4  # the header and the length field

    def _second_ok(self, byte: int) -> bool:
        return byte == _START2

    def _total(self, buf: bytes, i: int) -> int | FrameError:
        frame_length = _u16(buf, i + 2)
        return _total_len(frame_length) or _bad_frame_length(frame_length)

    def _decode(self, buf: bytes, i: int, total: int) -> Pms5003Frame | FrameError:
        return _decode_at(buf, i, total)

    def _reject(self, buf: bytes, i: int, total: int, error: FrameError) -> FrameError:
        return _classify_reject(buf, i, total, error)



def _classify_reject(buf: bytes, i: int, total: int, error: FrameError) -> FrameError:
    """Re-label a rejected candidate as ``truncated`` when a new header starts inside it."""
    for k in range(i + 2, i + total):
        if _is_header_at(buf, k):
            return FrameError("truncated", f"frame cut short after {k - i} bytes ({error.reason})")
    return error
