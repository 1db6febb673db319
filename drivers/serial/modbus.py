"""The pure part of Modbus RTU polling: which requests to send for a register map, what the words
of a reply mean, and why a reply that pymodbus could not use was bad. No I/O here; the framing and
the transaction itself are pymodbus's (:mod:`drivers.serial.modbus_driver`).

A register map is a list of :class:`RegisterSpec` (metric name, address, holding or input,
``uint16``/``int16``/``uint32``/``int32``/``float32``, word order, scale, unit).
:func:`plan_blocks` merges registers of one kind whose address ranges touch into one read request
(at most :data:`MAX_BLOCK_WORDS` words, the Modbus limit), so an energy meter's voltage, current,
power and energy are one round trip.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from drivers.reading import FrameError, Measurement
from drivers.serial.framing import as_bytes

__all__ = [
    "MAX_BLOCK_WORDS",
    "Block",
    "RegisterSpec",
    "classify_reply",
    "crc16",
    "decode_block",
    "plan_blocks",
]

MAX_BLOCK_WORDS = 125  # the largest read (function 3 or 4) a Modbus device must answer
RegisterKind = Literal["holding", "input"]
RegisterType = Literal["uint16", "int16", "uint32", "int32", "float32"]
WORDS: dict[str, int] = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}
_STRUCT: dict[str, str] = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}
FUNCTION = {"holding": 3, "input": 4}


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    name: str
    address: int
    kind: RegisterKind = "holding"
    type: RegisterType = "uint16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    unit: str | None = None

    @property
    def words(self) -> int:
        return WORDS[self.type]

    @property
    def end(self) -> int:
        """One past the last register address."""
        return self.address + self.words


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers of ``kind`` from ``address``, holding ``registers``."""

    kind: RegisterKind
    address: int
    count: int
    registers: tuple[RegisterSpec, ...]


def plan_blocks(registers: Sequence[RegisterSpec], *, max_words: int = MAX_BLOCK_WORDS) -> list[Block]:
    """Group registers into as few reads as possible: contiguous ranges of one kind, at most
    ``max_words`` each. Overlapping registers are the config's job to refuse; here they simply
    share a block."""
    blocks: list[Block] = []
    for kind in ("holding", "input"):
        run: list[RegisterSpec] = []
        for spec in sorted((r for r in registers if r.kind == kind), key=lambda r: r.address):
            if run and (spec.address > max(r.end for r in run) or spec.end - run[0].address > max_words):
                blocks.append(_block(run))
                run = []
            run.append(spec)
        if run:
            blocks.append(_block(run))
    return blocks


def _block(run: list[RegisterSpec]) -> Block:
    start = run[0].address
    return Block(run[0].kind, start, max(r.end for r in run) - start, tuple(run))


def decode_block(block: Block, words: Sequence[int]) -> list[Measurement | FrameError]:
    """The measurements of one reply's register words, in register order; a value that is not a
    finite number is a ``non_finite`` error, a reply of the wrong size one ``bad_length`` error."""
    if len(words) != block.count or not all(isinstance(w, int) and 0 <= w <= 0xFFFF for w in words):
        return [FrameError("bad_length", f"{len(words)} registers, expected {block.count}")]
    out: list[Measurement | FrameError] = []
    for spec in block.registers:
        offset = spec.address - block.address
        chunk = list(words[offset:offset + spec.words])
        if spec.word_order == "little":
            chunk.reverse()
        (raw,) = struct.unpack(_STRUCT[spec.type], b"".join(w.to_bytes(2, "big") for w in chunk))
        value = float(raw) * spec.scale
        if not math.isfinite(value):
            out.append(FrameError("non_finite", f"{spec.name}: {value}"))
            continue
        out.append(Measurement(spec.name, value, spec.unit))
    return out


def crc16(data: bytes) -> int:
    """The Modbus RTU CRC (polynomial 0xA001, initial 0xFFFF), as the 16-bit value whose low byte
    goes first on the wire."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def classify_reply(raw: object, unit_id: int, function: int, count: int) -> FrameError:
    """Why the bytes a device sent in answer to a read of ``count`` registers were not a usable
    reply (pymodbus discards such replies and then times out): ``no_reply`` (nothing came),
    ``truncated`` (a start of the right reply, cut short), ``bad_crc`` (the right length and
    address, a wrong CRC), ``wrong_unit`` (another unit answered), ``garbage`` (anything else)."""
    data = as_bytes(raw)
    if data is None:
        return FrameError("bad_input", f"expected bytes, got {type(raw).__name__}")
    if not data:
        return FrameError("no_reply", "no bytes within the timeout")
    expected = 5 + 2 * count
    if data[0] != unit_id:
        return FrameError("wrong_unit", f"unit {data[0]} answered, expected {unit_id}")
    if len(data) >= 2 and data[1] == function | 0x80:
        expected = 5
    elif len(data) >= 2 and data[1] != function:
        return FrameError("garbage", f"function 0x{data[1]:02X} in reply to 0x{function:02X}")
    elif len(data) >= 3 and data[2] != 2 * count:
        return FrameError("garbage", f"byte count {data[2]}, expected {2 * count}")
    if len(data) < expected:
        return FrameError("truncated", f"{len(data)} bytes, expected {expected}")
    frame = data[:expected]
    got = frame[-2] | frame[-1] << 8
    computed = crc16(frame[:-2])
    if got != computed:
        return FrameError("bad_crc", f"computed 0x{computed:04X}, reply has 0x{got:04X}")
    return FrameError("garbage", f"{len(data)} bytes, a valid frame pymodbus did not take")
