"""SDS011 frame parser, stream decoder and simulated-firmware encoder."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import DecodeError
from drivers.reading import FrameError, Measurement
from drivers.serial.sds011 import (
    FRAME_LEN,
    MAX_GARBAGE_RUN,
    Sds011Frame,
    Sds011Stream,
    encode_command,
    parse_frame,
)
from firmware_sim.sds011 import encode_frame

# Hand-built from the datasheet layout
#   AA C0 PM25_lo PM25_hi PM10_lo PM10_hi ID_lo ID_hi CHECKSUM AB
# PM2.5 = 12.3 -> 123 = 0x007B -> 7B 00
# PM10  = 45.6 -> 456 = 0x01C8 -> C8 01
# ID 0xA1B2 (low byte first)   -> B2 A1
# checksum = 0x7B + 0x00 + 0xC8 + 0x01 + 0xB2 + 0xA1
#          = 123 + 0 + 200 + 1 + 178 + 161 = 663 = 0x297 -> 0x97
FRAME_12_3 = bytes.fromhex("AA C0 7B 00 C8 01 B2 A1 97 AB")
# The datasheet's sample frame: PM2.5 0x04D4 = 1236 -> 123.6, PM10 0x0A3A =
# 2618 -> 261.8, ID bytes A1 60 -> 0x60A1; checksum D4+04+3A+0A+A1+60 =
# 212+4+58+10+161+96 = 541 = 0x21D -> 0x1D
FRAME_DATASHEET = bytes.fromhex("AA C0 D4 04 3A 0A A1 60 1D AB")
# A reply to "set data reporting mode" (command 02): 02+01+01+00+A1+60 =
# 2+1+1+0+161+96 = 261 = 0x105 -> 0x05
REPLY = bytes.fromhex("AA C5 02 01 01 00 A1 60 05 AB")
# PM2.5 = 1.0 -> 10 = 0x0A, PM10 = 2.0 -> 20 = 0x14, ID 0x0001:
# 0x0A + 0x14 + 0x01 = 0x1F
FRAME_1_2 = bytes.fromhex("AA C0 0A 00 14 00 01 00 1F AB")

FRAME_12_3_DECODED = Sds011Frame(pm2_5=12.3, pm10=45.6, device_id=0xA1B2)
FRAME_1_2_DECODED = Sds011Frame(pm2_5=1.0, pm10=2.0, device_id=1)

Out = list[Sds011Frame | FrameError]


def reasons(out: Out) -> list[str]:
    return [x.reason if isinstance(x, FrameError) else "frame" for x in out]


def feed_chunks(chunks: list[bytes]) -> tuple[Out, Sds011Stream]:
    stream = Sds011Stream()
    out: Out = []
    for chunk in chunks:
        out += stream.feed(chunk)
        assert stream.buffered < FRAME_LEN
    return out, stream


def feed_split(data: bytes, cuts: list[int]) -> Out:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return feed_chunks([data[a:b] for a, b in itertools.pairwise(bounds)])[0]


# --------------------------------------------------------------- parse_frame


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param(FRAME_12_3, FRAME_12_3_DECODED, id="hand-12.3-45.6"),
        pytest.param(
            FRAME_DATASHEET,
            Sds011Frame(pm2_5=123.6, pm10=261.8, device_id=0x60A1),
            id="datasheet-sample",
        ),
        pytest.param(FRAME_1_2, FRAME_1_2_DECODED, id="small-values"),
        pytest.param(
            bytes.fromhex("AA C0 00 00 00 00 00 00 00 AB"),
            Sds011Frame(pm2_5=0.0, pm10=0.0, device_id=0),
            id="all-zero",
        ),
        pytest.param(
            # 9999 = 0x270F; 0x0F+0x27+0x0F+0x27+0xFF+0xFF = 15+39+15+39+255+255
            # = 618 = 0x26A -> 0x6A
            bytes.fromhex("AA C0 0F 27 0F 27 FF FF 6A AB"),
            Sds011Frame(pm2_5=999.9, pm10=999.9, device_id=0xFFFF),
            id="max",
        ),
    ],
)
def test_parse_frame_known_vectors(frame: bytes, expected: Sds011Frame) -> None:
    assert parse_frame(frame) == expected
    assert parse_frame(bytearray(frame)) == expected
    assert parse_frame(memoryview(frame)) == expected


def test_measurements() -> None:
    assert FRAME_12_3_DECODED.measurements() == (
        Measurement("pm2_5", 12.3, "µg/m³"),
        Measurement("pm10", 45.6, "µg/m³"),
    )


def _with(frame: bytes, index: int, value: int) -> bytes:
    return frame[:index] + bytes([value]) + frame[index + 1 :]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param(FRAME_12_3[:9], "truncated", id="9-bytes"),
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(FRAME_12_3 + b"\x00", "bad_length", id="11-bytes"),
        pytest.param(_with(FRAME_12_3, 0, 0xAB), "bad_header", id="bad-header"),
        pytest.param(_with(FRAME_12_3, 1, 0xC1), "unsupported", id="command-C1"),
        pytest.param(_with(FRAME_12_3, 9, 0xAA), "bad_tail", id="bad-tail"),
        pytest.param(_with(FRAME_12_3, 8, 0x98), "bad_checksum", id="bad-checksum"),
        pytest.param(_with(FRAME_12_3, 2, 0x7C), "bad_checksum", id="flipped-data"),
        pytest.param(_with(_with(FRAME_12_3, 8, 0), 9, 0), "bad_tail", id="tail-checked-first"),
        pytest.param(REPLY, "reply", id="command-reply"),
        pytest.param("AA C0", "bad_input", id="str"),
        pytest.param(None, "bad_input", id="none"),
    ],
)
def test_parse_frame_errors(frame: bytes, reason: str) -> None:
    result = parse_frame(frame)
    assert isinstance(result, FrameError)
    assert result.reason == reason
    assert result.detail


def test_parse_frame_released_memoryview() -> None:
    view = memoryview(bytearray(FRAME_12_3))
    view.release()
    assert parse_frame(view) == FrameError("bad_input", "expected bytes, got memoryview")


# ------------------------------------------------------------------- encoder


def test_encoder_matches_hand_vector() -> None:
    assert encode_frame(12.3, 45.6) == FRAME_12_3
    assert encode_frame(123.6, 261.8, 0x60A1) == FRAME_DATASHEET


@pytest.mark.parametrize(
    ("pm2_5", "pm10", "expected"),
    [
        pytest.param(12.34, 45.56, (12.3, 45.6), id="rounded-to-0.1"),
        pytest.param(-5.0, 0.04, (0.0, 0.0), id="clamped-low"),
        pytest.param(1500.0, 999.96, (999.9, 999.9), id="clamped-high"),
        pytest.param(math.inf, -math.inf, (999.9, 0.0), id="infinite"),
    ],
)
def test_encoder_rounds_and_clamps(pm2_5: float, pm10: float, expected: tuple[float, float]) -> None:
    decoded = parse_frame(encode_frame(pm2_5, pm10))
    assert isinstance(decoded, Sds011Frame)
    assert (decoded.pm2_5, decoded.pm10) == expected


def test_encoder_corrupt_checksum() -> None:
    frame = encode_frame(12.3, 45.6, corrupt_checksum=True)
    assert frame[:8] == FRAME_12_3[:8]
    assert frame[9] == 0xAB
    result = parse_frame(frame)
    assert isinstance(result, FrameError)
    assert result.reason == "bad_checksum"


@pytest.mark.parametrize(
    ("pm2_5", "pm10", "device_id", "match"),
    [
        pytest.param(math.nan, 1.0, 1, "NaN", id="nan"),
        pytest.param(1.0, 1.0, 0x10000, "uint16", id="id-too-big"),
        pytest.param(1.0, 1.0, -1, "uint16", id="id-negative"),
    ],
)
def test_encoder_rejects(pm2_5: float, pm10: float, device_id: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_frame(pm2_5, pm10, device_id)


pm_values = st.floats(min_value=0.0, max_value=999.9, allow_nan=False)
device_ids = st.integers(min_value=0, max_value=0xFFFF)


@given(pm2_5=pm_values, pm10=pm_values, device_id=device_ids)
def test_encoder_parser_round_trip(pm2_5: float, pm10: float, device_id: int) -> None:
    decoded = parse_frame(encode_frame(pm2_5, pm10, device_id))
    assert isinstance(decoded, Sds011Frame)
    assert decoded.device_id == device_id
    assert abs(decoded.pm2_5 - pm2_5) <= 0.05 + 1e-9
    assert abs(decoded.pm10 - pm10) <= 0.05 + 1e-9


# -------------------------------------------------------------------- stream

SPLIT_STREAM = b"\x01\x02" + FRAME_12_3 + b"\x03" + FRAME_1_2 + REPLY + FRAME_12_3
SPLIT_EXPECTED: Out = [
    FrameError("garbage", "2 bytes skipped"),
    FRAME_12_3_DECODED,
    FrameError("garbage", "1 bytes skipped"),
    FRAME_1_2_DECODED,
    FRAME_12_3_DECODED,
]


@pytest.mark.parametrize("cut", [pytest.param(k, id=f"split@{k}") for k in range(len(SPLIT_STREAM) + 1)])
def test_stream_split_at_every_byte_boundary(cut: int) -> None:
    out, stream = feed_chunks([SPLIT_STREAM[:cut], SPLIT_STREAM[cut:]])
    assert out == SPLIT_EXPECTED
    assert stream.replies == 1
    assert stream.buffered == 0


def test_stream_byte_by_byte() -> None:
    out, stream = feed_chunks([bytes([b]) for b in SPLIT_STREAM])
    assert out == SPLIT_EXPECTED
    assert stream.replies == 1


G = b"\x10\x20\x30"  # garbage that cannot start a frame


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(G + FRAME_12_3, ["garbage", "frame"], id="before"),
        pytest.param(FRAME_12_3 + G + FRAME_1_2, ["frame", "garbage", "frame"], id="between"),
        pytest.param(
            G + FRAME_12_3 + G + G + FRAME_1_2 + G + FRAME_12_3,
            ["garbage", "frame", "garbage", "frame", "garbage", "frame"],
            id="one-error-per-run",
        ),
        pytest.param(
            b"\xaa\x00\xaa\xaa\x01" + FRAME_12_3,
            ["garbage", "frame"],
            id="stray-AA-are-garbage",
        ),
        pytest.param(FRAME_12_3 + G, ["frame"], id="after-pending-until-flush"),
        pytest.param(REPLY, [], id="reply-emits-nothing"),
    ],
)
def test_stream_garbage(data: bytes, expected: list[str]) -> None:
    out, _ = feed_chunks([data])
    assert reasons(out) == expected
    # Chunking never changes the outcome.
    assert reasons(feed_split(data, list(range(0, len(data), 3)))) == expected


def test_stream_garbage_counts_bytes() -> None:
    out, _ = feed_chunks([b"\xaa\x00\xaa\xaa\x01" + FRAME_12_3])
    assert out == [FrameError("garbage", "5 bytes skipped"), FRAME_12_3_DECODED]


def test_stream_flush_reports_pending_garbage_and_partial_frame() -> None:
    stream = Sds011Stream()
    assert stream.feed(FRAME_12_3 + G + FRAME_1_2[:4]) == [FRAME_12_3_DECODED]
    assert stream.pending_garbage == len(G)
    assert stream.buffered == 4
    assert stream.flush() == [
        FrameError("garbage", "3 bytes skipped"),
        FrameError("truncated", "4 bytes at end of stream"),
    ]
    assert (stream.buffered, stream.pending_garbage) == (0, 0)
    assert stream.flush() == []
    assert stream.feed(FRAME_1_2) == [FRAME_1_2_DECODED]


def test_stream_long_garbage_run_is_reported_in_chunks() -> None:
    noise = bytes([0x55]) * (2 * MAX_GARBAGE_RUN + 7)
    stream = Sds011Stream()
    out: Out = []
    for i in range(0, len(noise), 100):
        out += stream.feed(noise[i : i + 100])
    assert out == [FrameError("garbage", f"{MAX_GARBAGE_RUN} bytes skipped")] * 2
    assert stream.feed(FRAME_12_3) == [
        FrameError("garbage", "7 bytes skipped"),
        FRAME_12_3_DECODED,
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            encode_frame(5.0, 6.0, corrupt_checksum=True) + FRAME_12_3,
            ["bad_checksum", "frame"],
            id="bad-checksum-then-good",
        ),
        pytest.param(
            _with(FRAME_1_2, 9, 0x00) + FRAME_12_3,
            ["bad_tail", "frame"],
            id="bad-tail-then-good",
        ),
        pytest.param(
            FRAME_1_2[:5] + FRAME_12_3,
            ["truncated", "frame"],
            id="truncated-by-next-frame",
        ),
        pytest.param(
            # A lone AA cannot be told from noise.
            FRAME_1_2[:1] + FRAME_12_3,
            ["garbage", "frame"],
            id="lone-header-byte-then-frame",
        ),
        pytest.param(
            # A false header 3 bytes before a real frame: the candidate
            # overlaps the real frame, which must still be found.
            b"\xaa\xc0\x00" + FRAME_12_3,
            ["truncated", "frame"],
            id="false-header-overlapping-frame",
        ),
        pytest.param(
            b"\xaa\xc0\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a" + FRAME_12_3,
            ["bad_tail", "garbage", "frame"],
            id="false-header-then-more-garbage",
        ),
        pytest.param(
            _with(REPLY, 8, 0x06) + FRAME_12_3,
            ["bad_checksum", "frame"],
            id="corrupt-reply",
        ),
    ],
)
def test_stream_recovers(data: bytes, expected: list[str]) -> None:
    out, _ = feed_chunks([data])
    assert reasons(out) == expected
    assert out[-1] == FRAME_12_3_DECODED
    assert reasons(feed_split(data, list(range(1, len(data), 2)))) == expected


def test_stream_garbage_after_rejected_candidate_counts_only_new_bytes() -> None:
    data = b"\xaa\xc0\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a" + FRAME_12_3
    out, _ = feed_chunks([data])
    # The 8 bytes after the candidate's header belong to the rejected
    # candidate and are not garbage; 0x09 0x0A are.
    assert out[1] == FrameError("garbage", "2 bytes skipped")


def test_stream_bad_input() -> None:
    stream = Sds011Stream()
    assert reasons(stream.feed("text")) == ["bad_input"]  # type: ignore[arg-type]
    assert stream.feed(FRAME_12_3) == [FRAME_12_3_DECODED]


# ---------------------------------------------------------------- properties


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_stream_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    stream = Sds011Stream()
    for chunk in chunks:
        for item in stream.feed(chunk):
            assert isinstance(item, Sds011Frame | FrameError)
        assert stream.buffered < FRAME_LEN
        assert stream.pending_garbage < MAX_GARBAGE_RUN
    for error in stream.flush():
        assert isinstance(error, FrameError)


@settings(max_examples=200)
@given(st.lists(st.sampled_from([0xAA, 0xC0, 0xC5, 0xAB, 0x00, 0x01]), max_size=120))
def test_stream_never_raises_on_header_heavy_noise(data: list[int]) -> None:
    stream = Sds011Stream()
    stream.feed(bytes(data))
    assert stream.buffered < FRAME_LEN
    stream.flush()


no_aa_garbage = st.binary(max_size=20).map(lambda b: b.replace(b"\xaa", b""))
frame_args = st.tuples(pm_values, pm_values, device_ids)


@settings(max_examples=150)
@given(
    parts=st.lists(st.tuples(no_aa_garbage, frame_args), max_size=12),
    tail=no_aa_garbage,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=15),
)
def test_stream_finds_every_frame_among_garbage(
    parts: list[tuple[bytes, tuple[float, float, int]]],
    tail: bytes,
    cuts: list[int],
) -> None:
    data = b""
    expected: Out = []
    for garbage, (pm2_5, pm10, device_id) in parts:
        frame = encode_frame(pm2_5, pm10, device_id)
        data += garbage + frame
        if garbage:
            expected.append(FrameError("garbage", f"{len(garbage)} bytes skipped"))
        parsed = parse_frame(frame)
        assert isinstance(parsed, Sds011Frame)
        expected.append(parsed)
    data += tail
    stream = Sds011Stream()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    out: Out = []
    for a, b in itertools.pairwise(bounds):
        out += stream.feed(data[a:b])
    assert out == expected
    assert stream.flush() == ([FrameError("garbage", f"{len(tail)} bytes skipped")] if tail else [])


# Host -> sensor command frames, as printed in the SDS011 control protocol's examples.
@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        pytest.param("sleep", {}, "AA B4 06 01 00 00 00 00 00 00 00 00 00 00 00 FF FF 05 AB", id="sleep"),
        pytest.param("work", {}, "AA B4 06 01 01 00 00 00 00 00 00 00 00 00 00 FF FF 06 AB", id="work"),
        pytest.param("set_period", {"minutes": 1}, "AA B4 08 01 01 00 00 00 00 00 00 00 00 00 00 FF FF 08 AB",
                     id="period-1-min"),
    ],
)
def test_command_frames_match_the_datasheet(name: str, args: dict[str, object], expected: str) -> None:
    assert encode_command(name, args) == bytes.fromhex(expected)


@pytest.mark.parametrize(
    ("name", "args", "reason"),
    [
        pytest.param("fly", {}, "unsupported_command", id="unknown"),
        pytest.param("set_period", {"minutes": 31}, "invalid_argument", id="period-too-long"),
        pytest.param("set_period", {"minutes": True}, "invalid_argument", id="period-bool"),
        pytest.param("set_period", {}, "invalid_argument", id="period-missing"),
    ],
)
def test_invalid_commands_are_refused_with_a_reason(name: str, args: dict[str, object], reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        encode_command(name, args)
    assert caught.value.reason == reason
