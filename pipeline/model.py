"""The canonical event: one reading from one device, as it leaves the define stage.

A reading is serialised as a CloudEvents 1.0 structured-mode JSON document whose ``data`` is the
reading itself. Event ids are ULIDs: 26 Crockford base32 characters, sortable by creation time
(millisecond prefix) and monotonic within a process, so sorting by id sorts by gateway time.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CLOUDEVENTS_SPEC = "1.0"
READING_TYPE = "io.iotgw.telemetry.reading.v1"
AGGREGATE_TYPE = "io.iotgw.telemetry.aggregate.v1"
REJECT_TYPE = "io.iotgw.telemetry.rejected.v1"
ALERT_TYPE = "io.iotgw.alert.raised.v1"
ALERT_CLEARED_TYPE = "io.iotgw.alert.cleared.v1"
COMMAND_ACK_TYPE = "io.iotgw.command.ack.v1"

MAX_SEQ = 2**63 - 1  # SQLite's INTEGER
Transport = Literal["serial", "ble", "mqtt"]


class Quality(StrEnum):
    """Flags that qualify a reading without rejecting it."""

    DEVICE_TIME_MISSING = "device_time_missing"  # no device timestamp: receive time used
    GATEWAY_TIME = "gateway_time"  # the reading's time is the gateway's, not the device's
    CLOCK_CORRECTED = "clock_corrected"  # the device's clock was too far off: receive time used


_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits -> 2 characters
_RAND_BITS = 80
_RAND_MASK = (1 << _RAND_BITS) - 1
_TAIL_BITS = 20  # the low part of the random bits, encoded afresh for every id


def _encode(value: int, pairs: int = 13) -> str:
    """The low ``2 * pairs`` characters of ``value`` in Crockford base32 (13 pairs: a whole 128-bit ULID)."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(10 * pairs - 10, -1, -10)])


class _UlidGenerator:
    """Monotonic ULIDs: same millisecond -> random part incremented, never repeated.

    Within a millisecond only the last characters change, so the head (time and the high random bits)
    is encoded once and kept: an id then costs two table lookups (under load, ids come in runs).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0
        self._head = ""
        self._entropy = b""  # random bytes drawn ahead: one getrandom call for 400 milliseconds' ids
        self._taken = 0
        os.register_at_fork(after_in_child=self._forget_entropy)  # a child must not repeat its parent's

    def _forget_entropy(self) -> None:
        self._entropy, self._taken = b"", 0

    def _random(self) -> int:
        """79 random bits (room to increment within the 80)."""
        if self._taken + 10 > len(self._entropy):
            self._entropy, self._taken = os.urandom(4000), 0
        start = self._taken
        self._taken = start + 10
        return int.from_bytes(self._entropy[start:start + 10], "big") >> 1

    def new(self, now_ms: int | None = None) -> str:
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            if ms <= self._last_ms:
                ms = self._last_ms
                rand = (self._last_rand + 1) & _RAND_MASK
                if rand >> _TAIL_BITS != self._last_rand >> _TAIL_BITS:  # a carry into the head
                    self._head = _encode((ms << (_RAND_BITS - _TAIL_BITS)) | (rand >> _TAIL_BITS), 11)
            else:
                rand = self._random()
                self._head = _encode((ms << (_RAND_BITS - _TAIL_BITS)) | (rand >> _TAIL_BITS), 11)
            self._last_ms, self._last_rand = ms, rand
            head = self._head
        return head + _PAIRS[(rand >> 10) & 1023] + _PAIRS[rand & 1023]


_ulids = _UlidGenerator()


def new_event_id(now_ms: int | None = None) -> str:
    """A new ULID (26 characters, time-sortable, unique within and across processes)."""
    return _ulids.new(now_ms)


def ulid_time_ms(event_id: str) -> int:
    """The millisecond timestamp encoded in a ULID."""
    value = 0
    for char in event_id[:10]:
        value = value * 32 + _CROCKFORD.index(char)
    return value


class Reading(BaseModel):
    """One validated measurement. Frozen: a reading is a fact, never edited after define."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=26, max_length=26, description="ULID, time-sortable")
    site: str = Field(min_length=1)
    device_id: str = Field(min_length=1, max_length=128)
    device_class: str = Field(min_length=1)
    transport: Transport
    metric: str = Field(min_length=1, max_length=128)
    value: float = Field(allow_inf_nan=False, description="a finite number")
    unit: str | None = None
    # Checked by pydantic-core itself (no Python validator on the hot path): finite, time zone aware.
    device_ts: AwareDatetime | None = Field(default=None, description="time the device reported")
    received_at: AwareDatetime = Field(description="time the gateway received the reading")
    seq: int | None = Field(default=None, ge=0, le=MAX_SEQ, description="device sequence or packet id")
    quality: tuple[Quality, ...] = ()

    @property
    def ts(self) -> datetime:
        """The reading's time: the device's when it sent one, else the gateway's."""
        return self.device_ts or self.received_at

    def to_cloudevent(self, topic: str) -> dict[str, Any]:
        """CloudEvents 1.0 structured-mode envelope with this reading as ``data``."""
        return cloudevent(
            event_id=self.id,
            source=f"/iotgw/{self.site}/{self.device_id}",
            type_=READING_TYPE,
            subject=topic,
            time=self.ts,
            data=self.model_dump(mode="json"),
        )


def cloudevent(
    *, event_id: str, source: str, type_: str, subject: str, time: datetime, data: dict[str, Any]
) -> dict[str, Any]:
    """A CloudEvents 1.0 structured JSON envelope (``datacontenttype`` is always JSON)."""
    return {
        "specversion": CLOUDEVENTS_SPEC,
        "id": event_id,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


def utc_from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)
