"""The ingest journal: replay of what was not done, and recognising a device's resend."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from gateway.journal import Journal
from pipeline.stage import RawMessage

TOPIC = "telemetry/raw/1.0/s1/meter/m-1/power"


def _message(payload: bytes) -> RawMessage:
    return RawMessage(TOPIC, payload, "mqtt:dev-1", datetime.now(UTC))


async def test_not_done_is_replayed_in_order_with_its_ids(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert await journal.open() == []
    first, second, third = _message(b"1"), _message(b"2"), _message(b"3")
    for message in (first, second, third):
        journal.append(message, packet_id=None)
    journal.done([second.event_id])
    await journal.flush()
    await journal.close()

    again = Journal(tmp_path)
    replayed = await again.open()
    await again.close()
    assert [(m.event_id, m.payload) for m in replayed] == [(first.event_id, b"1"), (third.event_id, b"3")]


async def test_a_resend_gets_its_first_id_but_a_reused_packet_id_does_not(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await journal.open()
    original = _message(b'{"value": 1}')
    await journal.append(original, packet_id=7)
    journal.done([original.event_id])
    await journal.flush()
    await journal.close()

    after_restart = Journal(tmp_path)  # what a crash leaves: the mapping survives on disk
    await after_restart.open()
    assert after_restart.resent_id("mqtt:dev-1", 7, TOPIC, b'{"value": 1}') == original.event_id
    # The device rebooted and reused packet id 7 for another message: that is a new event.
    assert after_restart.resent_id("mqtt:dev-1", 7, TOPIC, b'{"value": 2}') is None
    assert after_restart.resent_id("mqtt:other", 7, TOPIC, b'{"value": 1}') is None
    assert after_restart.resends_recognised == 1
    await after_restart.close()
