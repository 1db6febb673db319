"""Every serial stream decoder in the registry, fed arbitrary bytes split anywhere: frames or counted
errors come out, never an exception, and what is held between reads stays bounded. (Each protocol's
own test file fuzzes its parser in more depth; this one guards the registry as a whole, so a protocol
added later is covered without a new test.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.reading import FrameError
from drivers.serial.protocols import PROTOCOLS

HOLD_LIMIT = 1024  # bytes: larger than any one frame or line of any protocol


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.binary(max_size=200), max_size=20))
def test_stream_returns_frames_or_errors_and_never_raises(protocol: str, chunks: list[bytes]) -> None:
    stream = PROTOCOLS[protocol]()
    for chunk in chunks:
        for item in stream.feed(chunk):
            if isinstance(item, FrameError):
                assert item.reason
                assert item.reason.isidentifier()
            else:
                for m in item.measurements():
                    assert isinstance(m.value, float)
        assert getattr(stream, "buffered", 0) <= HOLD_LIMIT


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=600), cut=st.integers(0, 600))
def test_a_split_read_decodes_like_one_read(protocol: str, data: bytes, cut: int) -> None:
    whole = PROTOCOLS[protocol]().feed(data)
    split = PROTOCOLS[protocol]()
    parts = [*split.feed(data[:cut]), *split.feed(data[cut:])]
    assert [type(x) for x in parts if not isinstance(x, FrameError)] == [
        type(x) for x in whole if not isinstance(x, FrameError)]
