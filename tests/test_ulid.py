"""Event ids: ULIDs, encoded by table (pipeline/model.py), checked against the bit-by-bit definition."""

from __future__ import annotations

import random

import pytest

from pipeline import model
from pipeline.model import _UlidGenerator, new_event_id, ulid_time_ms

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def reference(value: int) -> str:
    """26 characters, 5 bits each, most significant first (the ULID spec)."""
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def test_encoding_matches_the_definition() -> None:
    rng = random.Random(7)
    values = [0, 1, (1 << 128) - 1, 1 << 80, (1 << 80) - 1] + [rng.getrandbits(rng.choice((8, 64, 127, 128)))
                                                              for _ in range(20_000)]
    for value in values:
        assert model._encode(value) == reference(value)


@pytest.mark.parametrize("start", [0, (1 << 20) - 3, (1 << 40) - 2, (1 << 79) - 3], ids=["zero", "tail-carry",
                                                                                        "head-carry", "top"])
def test_ids_in_one_millisecond_count_up_across_carries(start: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _UlidGenerator()
    monkeypatch.setattr(generator, "_random", lambda: start)
    ids = [generator.new(1_700_000_000_000) for _ in range(8)]
    assert ids == [reference((1_700_000_000_000 << 80) | (start + i)) for i in range(8)]


def test_random_parts_differ_and_leave_room_to_count() -> None:
    generator = _UlidGenerator()
    parts = [generator._random() for _ in range(1000)]  # across a refill of the drawn bytes
    assert len(set(parts)) == len(parts)
    assert all(0 <= p < 2**79 for p in parts)


def test_ids_are_monotonic_and_carry_their_time() -> None:
    ids = [new_event_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert ulid_time_ms(_UlidGenerator().new(4_102_444_800_000)) == 4_102_444_800_000
