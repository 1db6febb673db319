"""collect's JSON parsing (:func:`pipeline.collect.parse_json`): pydantic-core's parser first, ``json.loads``
for what it refuses. Whatever the payload, the result, or the exception, is the one ``json.loads`` gives:
edge cases from the JSON grammar and encodings, then hypothesis over documents and mangled bytes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import from_json
from test_stages import raw

from pipeline.collect import CollectStage, parse_json
from pipeline.stage import Emitter
from pipeline.topics import TopicTemplate


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down, dict keys in the same order, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def outcome(parse: Any, payload: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(payload)
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


def assert_like_json_loads(payload: bytes) -> None:
    mine, reference = outcome(parse_json, payload), outcome(json.loads, payload)
    assert mine[0] == reference[0]
    assert same(mine[1], reference[1]) if mine[0] == "ok" else mine[1] == reference[1]


EDGES = [
    pytest.param(b'{"value": NaN, "b": Infinity, "c": -Infinity}', id="nan-infinity"),
    pytest.param(b'{"value": 1e400, "b": -1e400, "c": 5e-324, "d": 2.4703282292062328e-324}', id="float-limits"),
    pytest.param(b'{"value": -0.0, "b": -0, "c": 0.1, "d": 123456789012345678901234567890.5}', id="float-forms"),
    pytest.param(b'{"value": ' + b"9" * 4300 + b"}", id="int-4300-digits"),
    pytest.param(b'{"value": ' + b"9" * 4301 + b"}", id="int-4301-digits"),
    pytest.param(b'{"value": -' + b"9" * 4300 + b"}", id="negative-int-4300-digits"),
    pytest.param(b'{"value": 1e99999999999999999999}', id="exponent-huge"),
    pytest.param(b'{"a": 1, "value": 2, "a": 3}', id="duplicate-keys"),
    pytest.param(b'\xef\xbb\xbf{"value": 1}', id="utf8-bom"),
    pytest.param('{"value": 1}'.encode("utf-16"), id="utf16"),
    pytest.param('{"value": 1}'.encode("utf-32-le"), id="utf32"),
    pytest.param(b'{"value": "\xff"}', id="invalid-utf8"),
    pytest.param(b'{"value": "\xc0\xaf"}', id="overlong-utf8"),
    pytest.param(b'{"value": "\xed\xa0\x80"}', id="surrogate-in-utf8"),
    pytest.param(b'{"value": "\\ud800"}', id="lone-surrogate-escape"),
    pytest.param(b'{"value": "\\ud83d\\ude00", "\\u00e9": "\\u0000"}', id="escapes"),
    pytest.param(b'{"value": "\x01"}', id="control-character"),
    pytest.param(b'{"value": 1} x', id="trailing-data"),
    pytest.param(b'{"value": 1}\x00', id="trailing-nul"),
    pytest.param(b'{"value": 1}\n \t\r', id="trailing-whitespace"),
    pytest.param(b'\x0c{"value": 1}', id="form-feed"),
    pytest.param(b'\xc2\xa0{"value": 1}', id="no-break-space"),
    pytest.param(b'{"value": 1,}', id="trailing-comma"),
    pytest.param(b'{"value": 01}', id="leading-zero"),
    pytest.param(b'{"value": .5}', id="bare-fraction"),
    pytest.param(b'{"value": +1}', id="plus-sign"),
    pytest.param(b'{"value": -NaN}', id="minus-nan"),
    pytest.param(b'{"value": nan}', id="lowercase-nan"),
    pytest.param(b'{"value": Infinit}', id="truncated-infinity"),
    pytest.param(b"[" * 300 + b"]" * 300, id="nesting-300"),
    pytest.param(b'{"a": ' * 3000 + b"1" + b"}" * 3000, id="nesting-3000"),
    pytest.param(b"", id="empty"),
    pytest.param(b"[1, 2]", id="array"),
    pytest.param(b'"value"', id="string"),
    pytest.param(b"null", id="null"),
]


@pytest.mark.parametrize("payload", EDGES)
def test_parse_json_answers_as_json_loads(payload: bytes) -> None:
    assert_like_json_loads(payload)


def test_pydantic_core_refuses_what_only_json_loads_takes() -> None:
    """The fallback is what keeps these: if pydantic-core took them itself, this test says so."""
    for payload in (b'\xef\xbb\xbf{"value": 1}', '{"value": 1}'.encode("utf-16"), b'{"value": "\\ud800"}',
                    b"[" * 300 + b"]" * 300):
        with pytest.raises(ValueError):  # noqa: PT011 (pydantic-core's one error type)
            from_json(payload)
        json.loads(payload)


@pytest.mark.parametrize("payload", [b'{"value": 1', b'\xef\xbb\xbf{"value": 1}', b'{"value": "\\ud800"}'])
async def test_collect_reports_json_loads_verdict(payload: bytes) -> None:
    stage = CollectStage(TopicTemplate(), {})
    emit = Emitter()
    out = await stage.process([raw(payload)], emit)
    verdict = outcome(json.loads, payload)
    if verdict[0] == "ok":
        assert len(out) == 1
        assert emit.rejects == []
    else:
        assert out == []
        assert [(r.reason, r.detail) for r in emit.rejects] == [("invalid_json", verdict[1][:200])]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(JSON, st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]), st.booleans())
def test_documents_parse_as_json_loads_parses_them(value: Any, encoding: str, ascii_only: bool) -> None:
    assert_like_json_loads(json.dumps(value, ensure_ascii=ascii_only).encode(encoding, "surrogatepass"))


@settings(max_examples=400, deadline=None)
@given(JSON, st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), max_size=3))
def test_mangled_documents_get_json_loads_verdict(value: Any, edits: list[tuple[int, bytes]]) -> None:
    payload = bytearray(json.dumps({"value": value}, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    for offset, replacement in edits:
        at = offset % (len(payload) + 1)
        payload[at:at + len(replacement)] = replacement
    assert_like_json_loads(bytes(payload))
