"""JSON-lines and key=value line protocols."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.reading import FrameError, Measurement
from drivers.serial.protocols import FrameStream
from drivers.serial.textlines import (
    MAX_LINE_LEN,
    JsonLinesStream,
    KeyValueStream,
    TextFrame,
    parse_json_line,
    parse_key_value_line,
)

Out = list[TextFrame | FrameError]
Stream = JsonLinesStream | KeyValueStream


def frame(*values: tuple[str, float, str | None]) -> TextFrame:
    return TextFrame(tuple(Measurement(*v) for v in values))


def reasons(out: Out) -> list[str]:
    return [x.reason if isinstance(x, FrameError) else "frame" for x in out]


def feed_all(stream: Stream, chunks: list[bytes]) -> Out:
    out: Out = []
    for chunk in chunks:
        out += stream.feed(chunk)
        assert stream.buffered <= MAX_LINE_LEN + 1
    return out


def test_protocol_conformance() -> None:
    json_stream: FrameStream = JsonLinesStream()
    kv_stream: FrameStream = KeyValueStream()
    assert json_stream.feed(b'{"t": 1}\n') == [frame(("t", 1.0, None))]
    assert kv_stream.feed(b"t=1\n") == [frame(("t", 1.0, None))]


def test_measurements() -> None:
    f = frame(("temperature", 21.5, "C"))
    assert f.measurements() == (Measurement("temperature", 21.5, "C"),)


# ---------------------------------------------------------------- JSON lines


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            '{"temperature": 21.5, "humidity": 40}',
            frame(("temperature", 21.5, None), ("humidity", 40.0, None)),
            id="example",
        ),
        pytest.param('  {"a":-1e-3}  ', frame(("a", -0.001, None)), id="whitespace-exponent"),
        pytest.param('{"co2_ppm": 0}', frame(("co2_ppm", 0.0, None)), id="zero"),
        pytest.param('{"_x9": 1E2}', frame(("_x9", 100.0, None)), id="underscore-key"),
    ],
)
def test_json_valid(line: str, expected: TextFrame) -> None:
    assert parse_json_line(line) == expected
    assert parse_json_line(line.encode()) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        pytest.param('{"t": "21.5"}', "non_numeric", id="string-value"),
        pytest.param('{"t": true}', "non_numeric", id="bool"),
        pytest.param('{"t": null}', "non_numeric", id="null"),
        pytest.param('{"t": NaN}', "non_numeric", id="nan"),
        pytest.param('{"t": -Infinity}', "non_numeric", id="infinity"),
        pytest.param('{"t": 1e400}', "non_numeric", id="float-overflow"),
        pytest.param('{"t": 1' + "0" * 400 + "}", "non_numeric", id="huge-int"),
        pytest.param('{"t": [1]}', "non_numeric", id="list-value"),
        pytest.param('{"t": {"v": 1}}', "non_numeric", id="nested-object"),
        pytest.param('{"t": 1, "h": "x"}', "non_numeric", id="one-bad-field-rejects-line"),
        pytest.param('{"t": 1, "t": 2}', "duplicate_key", id="duplicate"),
        pytest.param('{"temp C": 1}', "bad_key", id="space-in-key"),
        pytest.param('{"": 1}', "bad_key", id="empty-key"),
        pytest.param('{"1t": 1}', "bad_key", id="leading-digit"),
        pytest.param("{}", "empty", id="empty-object"),
        pytest.param("[1, 2]", "not_object", id="array"),
        pytest.param("21.5", "not_object", id="bare-number"),
        pytest.param('{"t": 1', "bad_json", id="unclosed"),
        pytest.param("{'t': 1}", "bad_json", id="single-quotes"),
        pytest.param("[" * 100_000, "bad_json", id="deep-nesting"),
        pytest.param(b'{"t": 1}\xff', "invalid_utf8", id="invalid-utf8"),
    ],
)
def test_json_errors(line: str | bytes, reason: str) -> None:
    result = parse_json_line(line)
    assert isinstance(result, FrameError), result
    assert result.reason == reason
    assert result.detail


@pytest.mark.parametrize("line", ["", "   ", "\t"])
def test_json_blank(line: str) -> None:
    assert parse_json_line(line) is None


# ----------------------------------------------------------------- key=value


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            "temperature=21.5 humidity=40", frame(("temperature", 21.5, None), ("humidity", 40.0, None)), id="spaces"
        ),
        pytest.param(
            "a=1,b=2;c=3", frame(("a", 1.0, None), ("b", 2.0, None), ("c", 3.0, None)), id="commas-semicolons"
        ),
        pytest.param(" a=1 ,  b=2 ; ", frame(("a", 1.0, None), ("b", 2.0, None)), id="mixed-padding"),
        pytest.param("temp=21.5C", frame(("temp", 21.5, "C")), id="unit-C"),
        pytest.param(
            "t=-3.5°C hum=40% p=1013.2hPa pm=12µg/m³",
            frame(("t", -3.5, "°C"), ("hum", 40.0, "%"), ("p", 1013.2, "hPa"), ("pm", 12.0, "µg/m³")),
            id="units",
        ),
        pytest.param(
            "x=.5 y=+2. z=1e3", frame(("x", 0.5, None), ("y", 2.0, None), ("z", 1000.0, None)), id="number-forms"
        ),
    ],
)
def test_key_value_valid(line: str, expected: TextFrame) -> None:
    assert parse_key_value_line(line) == expected
    assert parse_key_value_line(line.encode()) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        pytest.param("temp=abc", "non_numeric", id="word"),
        pytest.param("temp=", "non_numeric", id="empty-value"),
        pytest.param("temp=nan", "non_numeric", id="nan"),
        pytest.param("temp=inf", "non_numeric", id="inf"),
        pytest.param("temp=1e999", "non_numeric", id="overflow"),
        pytest.param("temp=21.5.3", "non_numeric", id="two-dots"),
        pytest.param("temp=٢١", "non_numeric", id="non-ascii-digits"),
        pytest.param("temp=21.5 C", "bad_token", id="detached-unit"),
        pytest.param("temp", "bad_token", id="no-equals"),
        pytest.param("=5", "bad_token", id="no-key"),
        pytest.param("temp=1 temp=2", "duplicate_key", id="duplicate"),
        pytest.param("1temp=1", "bad_key", id="leading-digit"),
        pytest.param("té=1", "bad_key", id="non-ascii-key"),
        pytest.param("a=1=2", "non_numeric", id="double-equals"),
        pytest.param(b"a=1 \xc3", "invalid_utf8", id="invalid-utf8"),
    ],
)
def test_key_value_errors(line: str | bytes, reason: str) -> None:
    result = parse_key_value_line(line)
    assert isinstance(result, FrameError), result
    assert result.reason == reason
    assert result.detail


@pytest.mark.parametrize("line", ["", "  ", " ,; "])
def test_key_value_blank(line: str) -> None:
    assert parse_key_value_line(line) is None


# ------------------------------------------------------------------- streams

JSON_STREAM = b'{"t": 21.5}\r\n\r\n{"t": "x"}\n\n{"h": 40}\r\n\xff\xfe\n{"t": 1, "h": 2}\n'
JSON_EXPECTED = ["frame", "non_numeric", "frame", "invalid_utf8", "frame"]
KV_STREAM = b"t=21.5C h=40%\r\n\n  \r\nt=x\nfoo\r\np=1013hPa\n"
KV_EXPECTED = ["frame", "non_numeric", "bad_token", "frame"]

CASES = [
    pytest.param(JsonLinesStream, JSON_STREAM, JSON_EXPECTED, id="json"),
    pytest.param(KeyValueStream, KV_STREAM, KV_EXPECTED, id="key-value"),
]


@pytest.mark.parametrize(("cls", "data", "expected"), CASES)
def test_stream_every_split_point(cls: type[Stream], data: bytes, expected: list[str]) -> None:
    whole = feed_all(cls(), [data])
    assert reasons(whole) == expected
    for cut in range(len(data) + 1):
        assert feed_all(cls(), [data[:cut], data[cut:]]) == whole, cut
    assert feed_all(cls(), [data[k : k + 1] for k in range(len(data))]) == whole


def test_kv_stream_values() -> None:
    out = KeyValueStream().feed(KV_STREAM)
    assert out[0] == frame(("t", 21.5, "C"), ("h", 40.0, "%"))
    assert out[-1] == frame(("p", 1013.0, "hPa"))


@pytest.mark.parametrize("cls", [JsonLinesStream, KeyValueStream])
@pytest.mark.parametrize(
    ("length", "ending", "expected"),
    [
        pytest.param(MAX_LINE_LEN, b"\n", "frame", id="max-lf"),
        pytest.param(MAX_LINE_LEN, b"\r\n", "frame", id="max-crlf"),
        pytest.param(MAX_LINE_LEN + 1, b"\n", "too_long", id="over-lf"),
        pytest.param(MAX_LINE_LEN + 1, b"\r\n", "too_long", id="over-crlf"),
    ],
)
def test_line_length_limit(cls: type[Stream], length: int, ending: bytes, expected: str) -> None:
    line = b'{"t": 1}' if cls is JsonLinesStream else b"t=1"
    data = line.ljust(length) + ending + line + b"\n"  # padded with spaces, which both protocols allow
    assert reasons(feed_all(cls(), [data])) == [expected, "frame"]
    assert reasons(feed_all(cls(), [data[k : k + 7] for k in range(0, len(data), 7)])) == [expected, "frame"]


@pytest.mark.parametrize("cls", [JsonLinesStream, KeyValueStream])
def test_endless_line_reported_once_and_bounded(cls: type[Stream]) -> None:
    stream = cls()
    out = feed_all(stream, [b"x" * 100] * 50)
    assert reasons(out) == ["too_long"]
    assert stream.buffered == 0
    good = b'{"t": 1}\n' if cls is JsonLinesStream else b"t=1\n"
    assert stream.feed(b"still the same line\n" + good) == [frame(("t", 1.0, None))]


@pytest.mark.parametrize("cls", [JsonLinesStream, KeyValueStream])
def test_flush_and_bad_input(cls: type[Stream]) -> None:
    stream = cls()
    assert stream.feed(b"t=") == []
    assert stream.flush() == [FrameError("truncated", "2 bytes at end of stream")]
    assert stream.flush() == []
    assert reasons(stream.feed("t=1\n")) == ["bad_input"]  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("cls", [JsonLinesStream, KeyValueStream])
@settings(max_examples=80)
@given(chunks=st.lists(st.binary(max_size=300), max_size=12))
def test_stream_never_raises_and_stays_bounded(cls: type[Stream], chunks: list[bytes]) -> None:
    stream = cls()
    for item in feed_all(stream, chunks):
        assert isinstance(item, TextFrame | FrameError)
    stream.flush()


line_alphabet = st.sampled_from([*'{}[]":,=; .-+e0123456789tx\r\n', "\xff", "°"])


@pytest.mark.parametrize("cls", [JsonLinesStream, KeyValueStream])
@settings(max_examples=80)
@given(chars=st.lists(line_alphabet, max_size=200), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_stream_split_invariant(cls: type[Stream], chars: list[str], cuts: list[int]) -> None:
    data = "".join(chars).encode("utf-8").replace(b"\xc3\xbf", b"\xff")  # keep some invalid UTF-8
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    assert feed_all(cls(), [data[a:b] for a, b in itertools.pairwise(bounds)]) == feed_all(cls(), [data])


@settings(max_examples=80)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda k: k != "ts"),  # ts: the device clock
        st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**9), 10**9),
        max_size=6,
    )
)
def test_json_round_trip(values: dict[str, float]) -> None:
    out = JsonLinesStream().feed(json.dumps(values).encode() + b"\n")
    if not values:
        assert reasons(out) == ["empty"]
    else:
        assert out == [frame(*((k, float(v), None) for k, v in values.items()))]
