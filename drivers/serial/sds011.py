"""Frame parser for the Nova Fitness SDS011 particulate-matter sensor.

The sensor talks 9600 8N1 and, in its default active reporting mode, sends one
10-byte data frame per second (datasheet "Laser Dust Sensor Control Protocol")::

    offset  0     1     2        3        4       5       6      7      8    9
            AA    C0    PM25_lo  PM25_hi  PM10_lo PM10_hi ID_lo  ID_hi  CS   AB

``CS`` is the low byte of the sum of the six data bytes (offsets 2..7); both
PM values are little-endian ``uint16`` in units of 0.1 µg/m³.  Replies to
commands sent to the sensor use the same layout with command byte ``C5``.

Command replies (``AA C5 ...``) with a good checksum and tail are *valid*
frames that carry no measurement:

* :func:`parse_frame` has to return something, so it returns
  ``FrameError("reply", ...)`` for them;
* :class:`Sds011Stream` emits nothing for them and only counts them in
  :attr:`Sds011Stream.replies` (they are not errors).

Nothing here does I/O and nothing raises on any input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from drivers.errors import DecodeError
from drivers.reading import FrameError, Measurement
from drivers.serial.framing import MAX_GARBAGE_RUN, BytesLike, HeaderFrameStream
from drivers.serial.framing import as_bytes as _as_bytes
from drivers.serial.framing import bad_input as _bad_input

__all__ = [
    "FRAME_LEN",
    "MAX_GARBAGE_RUN",
    "UNIT",
    "BytesLike",
    "Sds011Frame",
    "Sds011Stream",
    "parse_frame",
]

FRAME_LEN = 10
"""Length in bytes of every SDS011 frame (data and command reply)."""

HEADER = 0xAA
TAIL = 0xAB
CMD_DATA = 0xC0
CMD_REPLY = 0xC5

UNIT = "µg/m³"

"""A run of skipped bytes is reported as one ``garbage`` error when it ends;
a run that reaches this many bytes is reported right away (and a new run
starts), so a line carrying pure noise, e.g. at the wrong baud rate, still
shows up in the error counters instead of staying silent forever."""

_HEADER_BYTE = bytes([HEADER])

"""What the decoders accept (anything else is reported as ``bad_input``)."""


@dataclass(frozen=True, slots=True)
class Sds011Frame:
    """One decoded SDS011 data frame (``AA C0``)."""

    pm2_5: float
    """PM2.5 concentration in µg/m³."""
    pm10: float
    """PM10 concentration in µg/m³."""
    device_id: int
    """Little-endian ``ID_lo | ID_hi << 8``."""

    def measurements(self) -> tuple[Measurement, ...]:
        """The frame as common :class:`Measurement` values."""
        return (
            Measurement("pm2_5", self.pm2_5, UNIT),
            Measurement("pm10", self.pm10, UNIT),
        )




def _decode_at(buf: bytes, i: int) -> Sds011Frame | FrameError:
    """Check and decode the 10 bytes at ``buf[i:i + 10]``.

    The caller guarantees the length and that ``buf[i]`` is the header byte.
    The tail is checked before the checksum.
    """
    tail = buf[i + 9]
    if tail != TAIL:
        return FrameError("bad_tail", f"expected 0xAB, got 0x{tail:02X}")
    computed = sum(buf[i + 2 : i + 8]) & 0xFF
    if computed != buf[i + 8]:
        return FrameError("bad_checksum", f"computed 0x{computed:02X}, frame has 0x{buf[i + 8]:02X}")
    cmd = buf[i + 1]
    if cmd == CMD_REPLY:
        return FrameError("reply", f"command reply 0x{buf[i + 2]:02X}")
    if cmd != CMD_DATA:
        return FrameError("unsupported", f"command byte 0x{cmd:02X}")
    return Sds011Frame(
        pm2_5=(buf[i + 2] | buf[i + 3] << 8) / 10,
        pm10=(buf[i + 4] | buf[i + 5] << 8) / 10,
        device_id=buf[i + 6] | buf[i + 7] << 8,
    )


def parse_frame(frame: BytesLike) -> Sds011Frame | FrameError:
    """Decode exactly one 10-byte frame.

    Error reasons: ``truncated`` (shorter than 10 bytes), ``bad_length``
    (longer), ``bad_header`` (first byte not ``AA``), ``unsupported``
    (command byte neither ``C0`` nor ``C5``), ``bad_tail``, ``bad_checksum``,
    ``reply`` (a valid ``AA C5`` command reply), ``bad_input`` (not bytes).
    """
    data = _as_bytes(frame)
    if data is None:
        return _bad_input(frame)
    if len(data) != FRAME_LEN:
        reason = "truncated" if len(data) < FRAME_LEN else "bad_length"
        return FrameError(reason, f"{len(data)} bytes, expected {FRAME_LEN}")
    if data[0] != HEADER:
        return FrameError("bad_header", f"expected 0xAA, got 0x{data[0]:02X}")
    if data[1] not in (CMD_DATA, CMD_REPLY):
        return FrameError("unsupported", f"command byte 0x{data[1]:02X}")
    return _decode_at(data, 0)


def _is_header_at(buf: bytes, k: int) -> bool:
    return buf[k] == HEADER and k + 1 < len(buf) and buf[k + 1] in (CMD_DATA, CMD_REPLY)


class Sds011Stream(HeaderFrameStream[Sds011Frame]):
    """Incremental, resynchronising decoder of an SDS011 byte stream.

    :meth:`feed` accepts reads of any size, split at any byte boundary, and
    returns the frames and errors completed by that read, in stream order:

    * bytes that cannot start a frame are skipped; each contiguous run of
      skipped bytes is reported once, as ``FrameError("garbage", "<n> bytes
      skipped")``, when the run ends (a frame candidate starts) or when it
      reaches :data:`MAX_GARBAGE_RUN` bytes;
    * a candidate (``AA C0`` or ``AA C5``) with a wrong tail or checksum is
      reported as ``bad_tail`` / ``bad_checksum`` -- or as ``truncated`` when
      another header starts inside its 10 bytes, the usual sign of a frame cut
      short -- and decoding resumes at the byte after its ``AA``, so a real
      frame starting inside a bogus candidate is still found.  Bytes of a
      rejected candidate that are then skipped are not counted again as
      garbage;
    * valid command replies (``AA C5``) emit nothing and increment
      :attr:`replies`.

    Only an incomplete frame candidate (at most 9 bytes) is kept between
    calls; :meth:`flush` reports it and any pending garbage run at end of
    stream.  Never raises.
    """

    __slots__ = ()

    HEADER_BYTE = _HEADER_BYTE

    def _second_ok(self, byte: int) -> bool:
        return byte in (CMD_DATA, CMD_REPLY)

    def _total(self, buf: bytes, i: int) -> int:
        return FRAME_LEN

    def _decode(self, buf: bytes, i: int, total: int) -> Sds011Frame | FrameError:
        return _decode_at(buf, i)

    def _reject(self, buf: bytes, i: int, total: int, error: FrameError) -> FrameError:
        return _classify_reject(buf, i, error)



def _classify_reject(buf: bytes, i: int, error: FrameError) -> FrameError:
    """Re-label a rejected candidate as ``truncated`` when a new header starts
    inside its 10 bytes (a frame cut short by the next one)."""
    for k in range(i + 2, i + FRAME_LEN):
        if _is_header_at(buf, k):
            return FrameError("truncated", f"frame cut short after {k - i} bytes ({error.reason})")
    return error


# --------------------------------------------------------------------------
# Commands (host -> sensor): 19-byte frames per the SDS011 control protocol
#   AA B4 <sub-command> <data 2..13> <device id lo hi> <checksum> AB
# checksum = sum of bytes 2..16 & 0xFF; device id FF FF addresses any sensor.
# --------------------------------------------------------------------------

CMD_HOST = 0xB4
COMMAND_FRAME_LEN = 19
_SUB_SLEEP_WORK = 0x06
_SUB_WORKING_PERIOD = 0x08
_SET = 0x01


def _command(sub: int, data: bytes, device_id: int = 0xFFFF) -> bytes:
    body = bytes([sub]) + data.ljust(12, b"\x00") + device_id.to_bytes(2, "little")
    return bytes([HEADER, CMD_HOST]) + body + bytes([sum(body) & 0xFF, TAIL])


def encode_command(name: str, args: Mapping[str, object]) -> bytes:
    """The command frame for ``sleep``, ``work`` or ``set_period`` (``{"minutes": 0..30}``, 0 =
    continuous). Raises :class:`~drivers.errors.DecodeError` (reason ``unsupported_command`` or
    ``invalid_argument``) for anything else: no I/O, like the parser."""
    if name == "sleep":
        return _command(_SUB_SLEEP_WORK, bytes([_SET, 0x00]))
    if name == "work":
        return _command(_SUB_SLEEP_WORK, bytes([_SET, 0x01]))
    if name == "set_period":
        minutes = args.get("minutes")
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not 0 <= minutes <= 30:
            raise DecodeError("invalid_argument", "set_period needs an integer 'minutes' from 0 to 30")
        return _command(_SUB_WORKING_PERIOD, bytes([_SET, minutes]))
    raise DecodeError("unsupported_command", f"SDS011 commands are sleep, work, set_period; not {name!r}")
