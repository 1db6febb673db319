"""NMEA 0183 GGA/RMC sentence parser and line stream."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.reading import FrameError, Measurement
from drivers.serial.nmea import (
    MAX_GARBAGE_RUN,
    MAX_SENTENCE_LEN,
    GgaFix,
    NmeaStream,
    RmcFix,
    checksum,
    parse_sentence,
)
from drivers.serial.protocols import FrameStream

# The classic examples (e.g. gpsinformation.org).  Checksums verified by hand-XOR below and in
# test_known_checksums: 0x47 and 0x6A.
GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
# A real receiver's output (west longitude, 3-decimal seconds, NMEA 2.3 RMC with mode field).
GGA_WEST = "$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76"
RMC_WEST = "$GPRMC,092750.000,A,5321.6802,N,00630.3372,W,0.02,31.66,280511,,,A*43"
GSV = "$GPGSV,3,1,11,10,63,137,17,07,61,098,15,05,59,290,20,08,54,157,30*70"
GSA = "$GPGSA,A,3,10,07,05,02,29,04,08,13,,,,,1.72,1.03,1.38*0A"
# What receivers send before they have a fix.
GGA_NO_FIX = "$GPGGA,,,,,,0,00,99.99,,,,,,*48"
RMC_NO_FIX = "$GPRMC,,V,,,,,,,,,,N*53"

LAT = 48 + 7.038 / 60  # 4807.038 N = 48° 07.038'
LON = 11 + 31.0 / 60  # 01131.000 E = 11° 31.000'

GGA_FIX = GgaFix(
    talker="GP",
    time=dt.time(12, 35, 19, tzinfo=dt.UTC),
    latitude=LAT,
    longitude=LON,
    fix_quality=1,
    satellites=8,
    hdop=0.9,
    altitude=545.4,
    geoid_separation=46.9,
)
RMC_FIX = RmcFix(
    talker="GP",
    timestamp=dt.datetime(1994, 3, 23, 12, 35, 19, tzinfo=dt.UTC),
    status="A",
    latitude=LAT,
    longitude=LON,
    speed_knots=22.4,
    course=84.4,
    magnetic_variation=-3.1,
)

Out = list[GgaFix | RmcFix | FrameError]


def xor(body: str) -> int:
    """Independent of the module's checksum(): fold XOR over the characters."""
    return functools.reduce(lambda acc, ch: acc ^ ord(ch), body, 0)


def sentence(body: str) -> str:
    """``$body*HH`` with a correct checksum."""
    return f"${body}*{xor(body):02X}"


def reasons(out: Out) -> list[str]:
    return [x.reason if isinstance(x, FrameError) else type(x).__name__ for x in out]


def feed_all(chunks: list[bytes]) -> tuple[Out, NmeaStream]:
    stream = NmeaStream()
    out: Out = []
    for chunk in chunks:
        out += stream.feed(chunk)
        assert stream.buffered <= MAX_SENTENCE_LEN + 1
    return out, stream


def test_protocol_conformance() -> None:
    stream: FrameStream = NmeaStream()
    assert stream.feed(f"{GGA}\r\n".encode()) == [GGA_FIX]


# ------------------------------------------------------------------ checksums


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(GGA, 0x47, id="gga-classic"),
        pytest.param(RMC, 0x6A, id="rmc-classic"),
        pytest.param(GGA_WEST, 0x76, id="gga-west"),
        pytest.param(RMC_WEST, 0x43, id="rmc-west"),
        pytest.param(GSV, 0x70, id="gsv"),
        pytest.param(GGA_NO_FIX, 0x48, id="gga-no-fix"),
        pytest.param(RMC_NO_FIX, 0x53, id="rmc-no-fix"),
    ],
)
def test_known_checksums(text: str, expected: int) -> None:
    body, _, stored = text[1:].partition("*")
    assert int(stored, 16) == expected
    assert xor(body) == expected
    assert checksum(body) == expected


# ------------------------------------------------------------ parse_sentence


def test_classic_gga() -> None:
    fix = parse_sentence(GGA)
    assert fix == GGA_FIX
    assert isinstance(fix, GgaFix)
    assert fix.measurements() == (
        Measurement("latitude", LAT, "°"),
        Measurement("longitude", LON, "°"),
        Measurement("altitude", 545.4, "m"),
        Measurement("satellites", 8.0, None),
        Measurement("hdop", 0.9, None),
    )


def test_classic_rmc() -> None:
    fix = parse_sentence(RMC)
    assert fix == RMC_FIX
    assert isinstance(fix, RmcFix)
    assert fix.speed_mps == pytest.approx(22.4 * 1852 / 3600)  # 11.5236 m/s
    assert fix.measurements() == (
        Measurement("latitude", LAT, "°"),
        Measurement("longitude", LON, "°"),
        Measurement("speed", pytest.approx(11.52356, abs=1e-5), "m/s"),  # type: ignore[arg-type]
        Measurement("course", 84.4, "°"),
    )


def test_real_receiver_west_and_fractional_seconds() -> None:
    gga = parse_sentence(GGA_WEST)
    assert isinstance(gga, GgaFix)
    assert gga.latitude == pytest.approx(53 + 21.6802 / 60)
    assert gga.longitude == pytest.approx(-(6 + 30.3372 / 60))
    assert gga.time == dt.time(9, 27, 50, tzinfo=dt.UTC)
    rmc = parse_sentence(RMC_WEST)
    assert isinstance(rmc, RmcFix)
    assert rmc.timestamp == dt.datetime(2011, 5, 28, 9, 27, 50, tzinfo=dt.UTC)
    assert rmc.magnetic_variation is None
    assert rmc.longitude == gga.longitude


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"{GGA}\r\n", id="crlf"),
        pytest.param(f"{GGA}\n", id="lf"),
        pytest.param(GGA.encode(), id="bytes"),
        pytest.param(bytearray(GGA.encode()), id="bytearray"),
    ],
)
def test_gga_input_forms(text: str | bytes) -> None:
    assert parse_sentence(text) == GGA_FIX


def test_lower_case_checksum_hex() -> None:
    assert parse_sentence(RMC[:-2] + "6a") == RMC_FIX


@pytest.mark.parametrize("talker", ["GP", "GN", "GL", "GA", "BD"])
def test_any_talker(talker: str) -> None:
    gga = parse_sentence(sentence(f"{talker}GGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"))
    assert gga == GgaFix(**{**{f: getattr(GGA_FIX, f) for f in GgaFix.__slots__}, "talker": talker})
    rmc = parse_sentence(sentence(f"{talker}RMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"))
    assert isinstance(rmc, RmcFix)
    assert rmc.talker == talker


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        pytest.param("GNGGA,235959.99,0000.000,S,00000.000,W,2,12,,,,,,,", "latitude", -0.0, id="zero-south"),
        pytest.param("GNGGA,000000,9000.000,S,18000.000,W,1,12,,,,,,,", "longitude", -180.0, id="lon-minus-180"),
        pytest.param(
            "GNGGA,000000,4717.11399,N,00833.91590,E,4,08,1.01,-12.5,M,48.0,M,1.0,0000",
            "altitude",
            -12.5,
            id="negative-altitude-rtk",
        ),
        pytest.param("GNGGA,000000,,,,,6,,,,,,,,", "latitude", None, id="dead-reckoning-no-position"),
        pytest.param(
            "GNGGA,123519.5,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,",
            "time",
            dt.time(12, 35, 19, 500000, tzinfo=dt.UTC),
            id="half-second",
        ),
    ],
)
def test_gga_fields(body: str, field: str, value: object) -> None:
    fix = parse_sentence(sentence(body))
    assert isinstance(fix, GgaFix)
    assert getattr(fix, field) == value


def test_gga_empty_fields_are_omitted_from_measurements() -> None:
    fix = parse_sentence(sentence("GNGGA,000000,4807.038,N,01131.000,E,1,,,,,,,,"))
    assert isinstance(fix, GgaFix)
    assert [m.metric for m in fix.measurements()] == ["latitude", "longitude"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "GPRMC,123519,A,4807.038,N,01131.000,E,,,230394,,",
            dt.datetime(1994, 3, 23, 12, 35, 19, tzinfo=dt.UTC),
            id="no-speed",
        ),
        pytest.param("GPRMC,123519,A,4807.038,N,01131.000,E,0.0,,,,", None, id="no-date"),
        pytest.param("GPRMC,,A,4807.038,N,01131.000,E,0.0,,230394,,", None, id="no-time"),
        pytest.param(
            "GPRMC,235959,A,4807.038,N,01131.000,E,0.0,,311279,,",
            dt.datetime(2079, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
            id="yy-79-is-2079",
        ),
        pytest.param(
            "GPRMC,235959,A,4807.038,N,01131.000,E,0.0,,311280,,",
            dt.datetime(1980, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
            id="yy-80-is-1980",
        ),
        pytest.param(
            "GNRMC,000000,A,4807.038,N,01131.000,E,0.0,,010180,,,A,V",
            dt.datetime(1980, 1, 1, tzinfo=dt.UTC),
            id="nmea-4.1-13-fields",
        ),
    ],
)
def test_rmc_timestamp(body: str, expected: dt.datetime | None) -> None:
    fix = parse_sentence(sentence(body))
    assert isinstance(fix, RmcFix)
    assert fix.timestamp == expected


def test_rmc_without_speed_has_no_speed_measurement() -> None:
    fix = parse_sentence(sentence("GPRMC,123519,A,4807.038,N,01131.000,E,,,230394,,"))
    assert isinstance(fix, RmcFix)
    assert fix.speed_mps is None
    assert [m.metric for m in fix.measurements()] == ["latitude", "longitude"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param(GGA_NO_FIX, "no_fix", id="gga-quality-0"),
        pytest.param(RMC_NO_FIX, "no_fix", id="rmc-status-V"),
        pytest.param(GSV, "unsupported", id="gsv"),
        pytest.param(GSA, "unsupported", id="gsa"),
        pytest.param(sentence("PUBX,00,081350.00,4717.113210,N"), "unsupported", id="proprietary"),
        pytest.param(sentence("GPGGAX,1"), "unsupported", id="long-address"),
        pytest.param(GGA[:-2] + "48", "bad_checksum", id="gga-bad-checksum"),
        pytest.param(RMC.replace("4807", "4808"), "bad_checksum", id="rmc-corrupted-field"),
        pytest.param(GGA[:-3], "bad_format", id="no-checksum"),
        pytest.param(GGA[1:], "bad_format", id="no-dollar"),
        pytest.param(GGA[:-1], "bad_format", id="one-hex-digit"),
        pytest.param("$GPGGA*56", "bad_format", id="no-fields"),
        pytest.param(GGA.replace("M", "\u00b5", 1), "bad_format", id="non-ascii"),
        pytest.param(GGA.encode().replace(b"M", b"\xb5", 1), "bad_format", id="non-ascii-bytes"),
        pytest.param(GGA.replace(",", "\t", 1), "bad_format", id="control-char"),
        pytest.param("", "bad_format", id="empty"),
        pytest.param("$GPGGA," + "0" * 80 + "*00", "too_long", id="too-long"),
        pytest.param(
            sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,"), "bad_field", id="gga-13-fields"
        ),
        pytest.param(
            sentence("GPGGA,123519,4807.038,N,01131.000,E,,08,0.9,545.4,M,46.9,M,,"),
            "bad_field",
            id="gga-empty-quality",
        ),
        pytest.param(
            sentence("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field", id="bad-hemisphere"
        ),
        pytest.param(
            sentence("GPGGA,123519,4807.038,,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
            "bad_field",
            id="missing-hemisphere",
        ),
        pytest.param(
            sentence("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
            "bad_field",
            id="latitude-over-90",
        ),
        pytest.param(
            sentence("GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field", id="minutes-over-60"
        ),
        pytest.param(
            sentence("GPGGA,123519,48.07038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field", id="decimal-degrees"
        ),
        pytest.param(
            sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,nan,545.4,M,46.9,M,,"), "bad_field", id="hdop-nan"
        ),
        pytest.param(
            sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,F,46.9,M,,"),
            "bad_field",
            id="altitude-in-feet",
        ),
        pytest.param(
            sentence("GPGGA,246060,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field", id="bad-time"
        ),
        pytest.param(
            sentence("GPGGA,235960,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), "bad_field", id="leap-second"
        ),
        pytest.param(
            sentence("GPRMC,123519,X,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"),
            "bad_field",
            id="rmc-bad-status",
        ),
        pytest.param(
            sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,300294,003.1,W"),
            "bad_field",
            id="rmc-30-february",
        ),
        pytest.param(
            sentence("GPRMC,123519,A,4807.038,N,01131.000,E,-1.0,084.4,230394,,"), "bad_field", id="rmc-negative-speed"
        ),
        pytest.param(
            sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,"),
            "bad_field",
            id="rmc-variation-without-direction",
        ),
        pytest.param(
            sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394"), "bad_field", id="rmc-9-fields"
        ),
        pytest.param(42, "bad_input", id="int"),
        pytest.param(None, "bad_input", id="none"),
    ],
)
def test_parse_errors(text: str, reason: str) -> None:
    result = parse_sentence(text)
    assert isinstance(result, FrameError), result
    assert result.reason == reason
    assert result.detail


def test_length_limit_is_inclusive() -> None:
    body = "GPGSA," + "1" * (MAX_SENTENCE_LEN - 10)  # "$" + body + "*HH" = 82 characters
    assert len(sentence(body)) == MAX_SENTENCE_LEN
    assert parse_sentence(sentence(body)).reason == "unsupported"  # type: ignore[union-attr]
    assert parse_sentence(sentence(body + "1")).reason == "too_long"  # type: ignore[union-attr]


# -------------------------------------------------------------------- stream

STREAM = f"{GGA}\r\n{GSV}\r\n{RMC}\r\n\r\n{GGA_NO_FIX}\n{RMC_WEST}\r\n".encode()
STREAM_REASONS = ["GgaFix", "unsupported", "RmcFix", "no_fix", "RmcFix"]


def test_stream_whole() -> None:
    out, stream = feed_all([STREAM])
    assert reasons(out) == STREAM_REASONS
    assert out[0] == GGA_FIX
    assert out[2] == RMC_FIX
    assert stream.unsupported == 1
    assert stream.buffered == 0
    assert stream.flush() == []


def test_stream_every_split_point() -> None:
    whole, _ = feed_all([STREAM])
    for cut in range(len(STREAM) + 1):
        out, stream = feed_all([STREAM[:cut], STREAM[cut:]])
        assert out == whole, cut
        assert stream.unsupported == 1


def test_stream_byte_by_byte() -> None:
    out, _ = feed_all([STREAM[k : k + 1] for k in range(len(STREAM))])
    assert reasons(out) == STREAM_REASONS


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(f"07.038,N,01131.000,E*47\r\n{GGA}\r\n", ["garbage", "GgaFix"], id="joined-mid-sentence"),
        pytest.param(f"{GGA[:30]}{RMC}\r\n", ["garbage", "RmcFix"], id="cut-short-by-next-dollar"),
        pytest.param(f"\x00\xff noise \r\nmore\r\n{RMC}\n", ["garbage", "RmcFix"], id="garbage-lines-one-run"),
        pytest.param(f"\r\n\n\r\n{GGA}\n\n", ["GgaFix"], id="blank-lines-silent"),
        pytest.param(f"{GGA[:-2]}00\r\n{GGA}\r\n", ["bad_checksum", "GgaFix"], id="bad-checksum-then-good"),
        pytest.param(f"$GPGGA,{'9' * 200}\r\n{GGA}\r\n", ["too_long", "GgaFix"], id="too-long-line"),
        pytest.param(f"$GPGGA,{'9' * 200}{RMC}\r\n", ["too_long", "RmcFix"], id="too-long-then-dollar"),
        pytest.param(f"{GGA}\r{RMC}\r\n", ["garbage", "RmcFix"], id="cr-only-is-not-a-line-end"),
    ],
)
def test_stream_resync(data: str, expected: list[str]) -> None:
    raw = data.encode("latin-1")
    assert reasons(feed_all([raw])[0]) == expected
    assert reasons(feed_all([raw[k : k + 1] for k in range(len(raw))])[0]) == expected


def test_garbage_count_ignores_line_endings() -> None:
    out, _ = feed_all([f"abc\r\n\r\nde\n{GGA}\n".encode()])
    assert out == [FrameError("garbage", "5 bytes skipped"), GGA_FIX]


def test_garbage_run_reported_at_limit() -> None:
    stream = NmeaStream()
    out = stream.feed(b"x" * (MAX_GARBAGE_RUN * 2 + 3))
    assert out == [FrameError("garbage", f"{MAX_GARBAGE_RUN} bytes skipped")] * 2
    assert stream.pending_garbage == 3
    assert stream.flush() == [FrameError("garbage", "3 bytes skipped")]


def test_unterminated_line_is_bounded_and_reported_once() -> None:
    stream = NmeaStream()
    out = stream.feed(b"$GPGGA,")
    for _ in range(100):
        out += stream.feed(b"1" * 50)
        assert stream.buffered <= MAX_SENTENCE_LEN + 1
    assert reasons(out) == ["too_long"]
    assert stream.feed(f"\r\n{GGA}\r\n".encode()) == [GGA_FIX]


def test_flush_reports_partial_sentence() -> None:
    stream = NmeaStream()
    assert stream.feed(GGA[:20].encode()) == []
    assert stream.flush() == [FrameError("truncated", "20 bytes at end of stream")]
    assert stream.feed(f"{GGA}\n".encode()) == [GGA_FIX]


def test_stream_bad_input() -> None:
    stream = NmeaStream()
    assert reasons(stream.feed("text")) == ["bad_input"]  # type: ignore[arg-type]
    assert stream.feed(memoryview(f"{GGA}\n".encode())) == [GGA_FIX]


# ---------------------------------------------------------------- properties


@settings(max_examples=80)
@given(st.lists(st.binary(max_size=100), max_size=20))
def test_stream_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    stream = NmeaStream()
    for chunk in chunks:
        for item in stream.feed(chunk):
            assert isinstance(item, GgaFix | RmcFix | FrameError)
        assert stream.buffered <= MAX_SENTENCE_LEN + 1
        assert stream.pending_garbage < MAX_GARBAGE_RUN
    stream.flush()


nmea_alphabet = st.sampled_from(list("$*,\r\nGPNRMCA0123456789.NSEWV"))


@settings(max_examples=80)
@given(st.lists(nmea_alphabet, max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_stream_never_raises_on_nmea_like_noise_and_split_invariant(chars: list[str], cuts: list[int]) -> None:
    data = "".join(chars).encode()
    whole, _ = feed_all([data])
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    split, _ = feed_all([data[a:b] for a, b in itertools.pairwise(bounds)])
    assert split == whole


@settings(max_examples=80)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=90))
def test_parse_sentence_never_raises(text: str) -> None:
    assert isinstance(parse_sentence(text), GgaFix | RmcFix | FrameError)


@settings(max_examples=80)
@given(st.lists(st.text(alphabet="0123456789.-NSEWAVM", max_size=10), min_size=14, max_size=14))
def test_gga_field_fuzz_never_raises(fields: list[str]) -> None:
    fields[5] = fields[5] or "1"
    result = parse_sentence(sentence("GNGGA," + ",".join(fields)))
    assert isinstance(result, GgaFix | FrameError)
    if isinstance(result, GgaFix):
        for m in result.measurements():
            assert math.isfinite(m.value)
        assert result.latitude is None or -90 <= result.latitude <= 90
        assert result.longitude is None or -180 <= result.longitude <= 180


@settings(max_examples=80)
@given(
    lat=st.tuples(st.integers(0, 89), st.integers(0, 599_999), st.sampled_from("NS")),
    lon=st.tuples(st.integers(0, 179), st.integers(0, 599_999), st.sampled_from("EW")),
)
def test_coordinate_round_trip(lat: tuple[int, int, str], lon: tuple[int, int, str]) -> None:
    (lat_deg, lat_min, ns), (lon_deg, lon_min, ew) = lat, lon
    body = (
        f"GNGGA,000000,{lat_deg:02d}{lat_min // 10000:02d}.{lat_min % 10000:04d},{ns},"
        f"{lon_deg:03d}{lon_min // 10000:02d}.{lon_min % 10000:04d},{ew},1,08,0.9,1.0,M,0.0,M,,"
    )
    fix = parse_sentence(sentence(body))
    assert isinstance(fix, GgaFix)
    assert fix.latitude == pytest.approx((lat_deg + lat_min / 600_000) * (1 if ns == "N" else -1))
    assert fix.longitude == pytest.approx((lon_deg + lon_min / 600_000) * (1 if ew == "E" else -1))
