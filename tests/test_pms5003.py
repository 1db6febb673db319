"""PMS5003 frame parser and stream decoder."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.reading import FrameError, Measurement
from drivers.serial.pms5003 import (
    FRAME_LEN,
    MAX_GARBAGE_RUN,
    Pms5003Frame,
    Pms5003Stream,
    parse_frame,
)
from drivers.serial.protocols import FrameStream

# Hand-built from the datasheet layout (13 big-endian uint16 words after "42 4D 00 1C"):
#   PM1.0/2.5/10 CF=1     = 5, 8, 10          -> 00 05  00 08  00 0A
#   PM1.0/2.5/10 atm      = 5, 8, 10          -> 00 05  00 08  00 0A
#   >0.3/0.5/1.0 um       = 1101, 322, 51     -> 04 4D  01 42  00 33
#   >2.5/5.0/10 um        = 4, 1, 0           -> 00 04  00 01  00 00
#   reserved              = 0x9700            -> 97 00
# checksum = 0x42 + 0x4D + 0x00 + 0x1C + 5 + 8 + 10 + 5 + 8 + 10 + 0x04 + 0x4D + 0x01 + 0x42
#            + 0x33 + 4 + 1 + 0x97
#          = 66 + 77 + 28 + 5 + 8 + 10 + 5 + 8 + 10 + 4 + 77 + 1 + 66 + 51 + 4 + 1 + 151
#          = 572 = 0x023C -> 02 3C
# (the data deliberately contains the bytes 4D and 42, which must not confuse resync)
FRAME = bytes.fromhex("42 4D 00 1C 00 05 00 08 00 0A 00 05 00 08 00 0A 04 4D 01 42 00 33 00 04 00 01 00 00 97 00 02 3C")
DECODED = Pms5003Frame(5, 8, 10, 5, 8, 10, 1101, 322, 51, 4, 1, 0, 0x9700)

# All-zero data: checksum = 0x42 + 0x4D + 0x1C = 66 + 77 + 28 = 171 = 0x00AB
ZERO = bytes.fromhex("42 4D 00 1C" + "00" * 26 + "00 AB")
ZERO_DECODED = Pms5003Frame(*([0] * 13))

# CF=1 values differ from atmospheric ones: PM2.5 CF=1 = 0x0123 = 291, PM2.5 atm = 0x0100 = 256,
# everything else 0.  checksum = 171 + 0x01 + 0x23 + 0x01 = 171 + 1 + 35 + 1 = 208 = 0x00D0
CF_DIFFERS = bytes.fromhex("42 4D 00 1C 00 00 01 23 00 00 00 00 01 00" + "00" * 16 + "00 D0")

# Datasheet reply to "change to passive mode" (42 4D E1 00 00 01 70):
# checksum = 0x42 + 0x4D + 0x00 + 0x04 + 0xE1 + 0x00 = 66 + 77 + 4 + 225 = 372 = 0x0174
REPLY = bytes.fromhex("42 4D 00 04 E1 00 01 74")

Out = list[Pms5003Frame | FrameError]


def _with(frame: bytes, index: int, value: int) -> bytes:
    return frame[:index] + bytes([value]) + frame[index + 1 :]


def _frame(words: list[int]) -> bytes:
    body = b"\x42\x4d\x00\x1c" + b"".join(w.to_bytes(2, "big") for w in words)
    return body + (sum(body) & 0xFFFF).to_bytes(2, "big")


def reasons(out: Out) -> list[str]:
    return [x.reason if isinstance(x, FrameError) else "frame" for x in out]


def feed_all(chunks: list[bytes]) -> tuple[Out, Pms5003Stream]:
    stream = Pms5003Stream()
    out: Out = []
    for chunk in chunks:
        out += stream.feed(chunk)
        assert stream.buffered < FRAME_LEN
    return out, stream


def test_protocol_conformance() -> None:
    stream: FrameStream = Pms5003Stream()
    assert stream.feed(FRAME) == [DECODED]


# --------------------------------------------------------------- parse_frame


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param(FRAME, DECODED, id="hand-built"),
        pytest.param(ZERO, ZERO_DECODED, id="all-zero"),
        pytest.param(CF_DIFFERS, Pms5003Frame(0, 291, 0, 0, 256, 0, 0, 0, 0, 0, 0, 0, 0), id="cf1-vs-atm"),
        pytest.param(_frame([0xFFFF] * 13), Pms5003Frame(*([0xFFFF] * 13)), id="max-checksum-wraps"),
    ],
)
def test_parse_frame_known_vectors(frame: bytes, expected: Pms5003Frame) -> None:
    assert parse_frame(frame) == expected
    assert parse_frame(bytearray(frame)) == expected
    assert parse_frame(memoryview(frame)) == expected


def test_helper_matches_hand_vector() -> None:
    assert _frame([5, 8, 10, 5, 8, 10, 1101, 322, 51, 4, 1, 0, 0x9700]) == FRAME


def test_measurements_use_atmospheric_values() -> None:
    assert DECODED.measurements() == (
        Measurement("pm1_0", 5.0, "µg/m³"),
        Measurement("pm2_5", 8.0, "µg/m³"),
        Measurement("pm10", 10.0, "µg/m³"),
        Measurement("particles_0_3um", 1101.0, "#/0.1L"),
        Measurement("particles_0_5um", 322.0, "#/0.1L"),
        Measurement("particles_1_0um", 51.0, "#/0.1L"),
        Measurement("particles_2_5um", 4.0, "#/0.1L"),
        Measurement("particles_5_0um", 1.0, "#/0.1L"),
        Measurement("particles_10um", 0.0, "#/0.1L"),
    )
    cf = parse_frame(CF_DIFFERS)
    assert isinstance(cf, Pms5003Frame)
    assert cf.measurements()[1] == Measurement("pm2_5", 256.0, "µg/m³")


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param(FRAME[:31], "truncated", id="31-bytes"),
        pytest.param(FRAME[:3], "truncated", id="3-bytes"),
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(FRAME + b"\x00", "bad_length", id="33-bytes"),
        pytest.param(_with(FRAME, 0, 0x41), "bad_header", id="bad-start-1"),
        pytest.param(_with(FRAME, 1, 0x4E), "bad_header", id="bad-start-2"),
        pytest.param(_with(FRAME, 3, 0x1D), "bad_frame_length", id="length-29"),
        pytest.param(_with(FRAME, 2, 0x01), "bad_frame_length", id="length-284"),
        pytest.param(_with(FRAME, 31, 0x3D), "bad_checksum", id="bad-checksum"),
        pytest.param(_with(FRAME, 9, 0x0B), "bad_checksum", id="flipped-data"),
        pytest.param(REPLY, "reply", id="command-reply"),
        pytest.param(_with(REPLY, 7, 0x75), "bad_checksum", id="reply-bad-checksum"),
        pytest.param(REPLY[:7], "truncated", id="reply-7-bytes"),
        pytest.param("42 4D", "bad_input", id="str"),
        pytest.param(None, "bad_input", id="none"),
    ],
)
def test_parse_frame_errors(frame: bytes, reason: str) -> None:
    result = parse_frame(frame)
    assert isinstance(result, FrameError)
    assert result.reason == reason
    assert result.detail


def test_parse_frame_released_memoryview() -> None:
    view = memoryview(bytearray(FRAME))
    view.release()
    assert parse_frame(view) == FrameError("bad_input", "expected bytes, got memoryview")


# -------------------------------------------------------------------- stream


def test_stream_every_split_point() -> None:
    data = FRAME + ZERO + REPLY + CF_DIFFERS
    whole, stream = feed_all([data])
    assert reasons(whole) == ["frame", "frame", "frame"]
    assert stream.replies == 1
    for cut in range(len(data) + 1):
        out, stream = feed_all([data[:cut], data[cut:]])
        assert out == whole, cut
        assert stream.replies == 1


def test_stream_byte_by_byte() -> None:
    data = b"\x00\x42" + FRAME + FRAME
    out, stream = feed_all([data[k : k + 1] for k in range(len(data))])
    assert out == [FrameError("garbage", "2 bytes skipped"), DECODED, DECODED]
    assert stream.buffered == 0
    assert stream.flush() == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"\x01\x02\x03" + FRAME, ["garbage", "frame"], id="leading-garbage"),
        pytest.param(FRAME[5:] + FRAME, ["garbage", "frame"], id="joined-mid-frame"),
        pytest.param(FRAME[:20] + FRAME, ["truncated", "frame"], id="cut-short-by-next-header"),
        pytest.param(_with(FRAME, 31, 0) + FRAME, ["bad_checksum", "frame"], id="bad-checksum-then-good"),
        pytest.param(_with(FRAME, 3, 0x99) + FRAME, ["bad_frame_length", "garbage", "frame"], id="bad-length"),
        pytest.param(REPLY + FRAME, ["frame"], id="reply-is-silent"),
        pytest.param(b"\x42\x42\x4d" + FRAME[2:], ["garbage", "frame"], id="doubled-start-byte"),
    ],
)
def test_stream_resync(data: bytes, expected: list[str]) -> None:
    assert reasons(feed_all([data])[0]) == expected
    # ... and the same, fed one byte at a time
    assert reasons(feed_all([data[k : k + 1] for k in range(len(data))])[0]) == expected


def test_bad_length_candidate_bytes_not_counted_twice() -> None:
    # The rejected header's 4 bytes are quiet; the 28 bytes after them are garbage.
    out, _ = feed_all([_with(FRAME, 3, 0x99) + FRAME])
    assert out == [
        FrameError("bad_frame_length", "length field 153, expected 28 (or 4 for a reply)"),
        FrameError("garbage", "28 bytes skipped"),
        DECODED,
    ]


def test_stream_finds_frame_inside_rejected_candidate() -> None:
    # A frame cut after 10 bytes, then a whole frame: the whole one starts inside the bogus candidate.
    out, stream = feed_all([FRAME[:10] + FRAME + FRAME])
    assert reasons(out) == ["truncated", "frame", "frame"]
    assert stream.flush() == []


def test_garbage_run_reported_at_limit() -> None:
    stream = Pms5003Stream()
    out = stream.feed(b"\x00" * (MAX_GARBAGE_RUN * 2 + 5))
    assert out == [FrameError("garbage", f"{MAX_GARBAGE_RUN} bytes skipped")] * 2
    assert stream.pending_garbage == 5
    assert stream.flush() == [FrameError("garbage", "5 bytes skipped")]


def test_flush_reports_partial_frame() -> None:
    stream = Pms5003Stream()
    assert stream.feed(FRAME[:12]) == []
    assert stream.buffered == 12
    assert stream.flush() == [FrameError("truncated", "12 bytes at end of stream")]
    assert stream.buffered == 0
    assert stream.feed(FRAME) == [DECODED]


def test_stream_bad_input() -> None:
    stream = Pms5003Stream()
    assert reasons(stream.feed("text")) == ["bad_input"]  # type: ignore[arg-type]
    assert stream.feed(bytearray(FRAME)) == [DECODED]


# ---------------------------------------------------------------- properties


@settings(max_examples=80)
@given(st.lists(st.binary(max_size=70), max_size=30))
def test_stream_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    stream = Pms5003Stream()
    for chunk in chunks:
        for item in stream.feed(chunk):
            assert isinstance(item, Pms5003Frame | FrameError)
        assert stream.buffered < FRAME_LEN
        assert stream.pending_garbage < MAX_GARBAGE_RUN
    for error in stream.flush():
        assert isinstance(error, FrameError)


@settings(max_examples=80)
@given(st.lists(st.sampled_from([0x42, 0x4D, 0x00, 0x1C, 0x04, 0x01]), max_size=200))
def test_stream_never_raises_on_header_heavy_noise(data: list[int]) -> None:
    stream = Pms5003Stream()
    stream.feed(bytes(data))
    assert stream.buffered < FRAME_LEN
    stream.flush()


@settings(max_examples=80)
@given(st.binary(max_size=80))
def test_parse_frame_never_raises(data: bytes) -> None:
    assert isinstance(parse_frame(data), Pms5003Frame | FrameError)


no_42_garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\x42", b""))
words = st.lists(st.integers(min_value=0, max_value=0xFFFF), min_size=13, max_size=13)


@settings(max_examples=80)
@given(
    parts=st.lists(st.tuples(no_42_garbage, words), max_size=8),
    tail=no_42_garbage,
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=15),
)
def test_stream_finds_every_frame_among_garbage(
    parts: list[tuple[bytes, list[int]]], tail: bytes, cuts: list[int]
) -> None:
    data = b""
    expected: Out = []
    for garbage, values in parts:
        data += garbage + _frame(values)
        if garbage:
            expected.append(FrameError("garbage", f"{len(garbage)} bytes skipped"))
        expected.append(Pms5003Frame(*values))
    data += tail
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    out, stream = feed_all([data[a:b] for a, b in itertools.pairwise(bounds)])
    assert out == expected
    assert stream.flush() == ([FrameError("garbage", f"{len(tail)} bytes skipped")] if tail else [])
