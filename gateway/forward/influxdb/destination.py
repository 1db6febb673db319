"""InfluxDB sink: valid readings (and, when enabled, agg events) written as points through the
InfluxDB v2 write API (``POST /api/v2/write``) with influxdb-client.

It is a forward destination like the others, so the outbox gives it store-and-forward: a batch
leaves the outbox only once the server answered 2xx; while the server is down or overloaded (a
connection error, 5xx, 429) the batch stays and the forwarder retries with backoff. InfluxDB writes
are idempotent per series and timestamp, so a batch sent again after a lost answer does not add
points.

Every point carries an explicit timestamp: the device's time when the reading has one, else the
gateway's receive time (a server stamps points without one with their arrival time, which after an
outage is wrong by the length of the outage). The mapping from a reading to a point is a small pure
function (:func:`reading_point`, :func:`aggregate_point`) of the reading's fields, so an event
catalog can later supply the measurement, tags and fields per event type.

Events that cannot become a point (not a reading or an aggregate, no numeric value, no time) and
points the server refuses as malformed (400, 413, 422: found by halving the batch until one event is
left, and only while the server still takes the last point it took, so a 400 about the request
itself drops nothing) raise :class:`UnsendableEventError`: the forwarder drops them from the outbox,
counted and alerted, instead of retrying them forever. 401, 403 and 404 (token, org or bucket wrong) keep the
data queued: fixing the config must not lose it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi
from influxdb_client.rest import ApiException
from urllib3.exceptions import HTTPError

from gateway.errors import GatewayError
from gateway.forward.base import DestinationUnavailableError, InboundMessage, OutboundEvent, UnsendableEventError
from gateway.forward.influxdb.settings import INFLUX_DEFAULT_TAGS
from pipeline.model import AGGREGATE_TYPE, READING_TYPE
from pipeline.retry import StateLog, backoff_delay, stop_task
from pipeline.topics import TopicTemplate

log = logging.getLogger(__package__)  # "gateway.forward.<type>", the name operators filter on

Precision = Literal["s", "ms", "us", "ns"]
NS_PER: Mapping[str, int] = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
DEFAULT_TAGS: tuple[str, ...] = INFLUX_DEFAULT_TAGS
PAYLOAD_REFUSED = (400, 413, 422)  # the batch itself is wrong (malformed, too large, field type conflict)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PROBE_CAP_S = 10.0
_MAX_SHAPES = 16384  # series remembered per mapping (a gateway has far fewer)
_WRITE_PRECISION: Mapping[str, Any] = {p: p for p in NS_PER}  # influxdb-client's WritePrecision values are these


class InfluxMappingError(GatewayError):
    """An event that has no form as a point; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _PayloadRefusedError(GatewayError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class _RefusedEventError(UnsendableEventError):
    def __init__(self, event: OutboundEvent, refused: _PayloadRefusedError) -> None:
        super().__init__(event, f"the server refused it: {refused}")
        self.status = refused.status


# -- the mapping: pure functions of a reading's fields ----------------------------------------------


class Series(NamedTuple):
    """What names a series: the fields a reading (or an aggregate of one series) carries. (Immutable
    tuples, like :class:`PointSpec`: one is made per event, and a tuple is the cheapest to make.)"""

    site: str
    device_class: str
    device_id: str
    metric: str
    unit: str | None = None
    transport: str | None = None


@dataclass(frozen=True, slots=True)
class InfluxMapping:
    """Measurement and field names are templates over ``{site}``, ``{device_class}``,
    ``{device_id}``, ``{metric}``; ``tags`` name the series fields (and ``gateway``) that become tags."""

    gateway: str
    measurement: str = "{device_class}"
    field: str = "{metric}"
    tags: tuple[str, ...] = DEFAULT_TAGS
    agg_measurement: str = "{metric}_agg"
    # measurement, tags and field name per series: the same for every reading of a series
    _shapes: dict[Series, tuple[str, tuple[tuple[str, str], ...], str]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)


class PointSpec(NamedTuple):
    measurement: str
    tags: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, float | int], ...]
    time_ns: int


def _names(series: Series) -> dict[str, str]:
    return {"site": series.site, "device_class": series.device_class, "device_id": series.device_id,
            "metric": series.metric}


def _tags(series: Series, mapping: InfluxMapping) -> tuple[tuple[str, str], ...]:
    values = {**_names(series), "gateway": mapping.gateway, "unit": series.unit or "",
              "transport": series.transport or ""}
    return tuple((tag, values[tag]) for tag in mapping.tags if values[tag])  # InfluxDB has no empty tags


def reading_point(series: Series, value: float, time_ns: int, mapping: InfluxMapping) -> PointSpec:
    """One reading: ``measurement`` (default the device class), one field (default the metric)."""
    shape = mapping._shapes.get(series)
    if shape is None:
        names = _names(series)
        shape = mapping.measurement.format(**names), _tags(series, mapping), mapping.field.format(**names)
        if len(mapping._shapes) >= _MAX_SHAPES:
            mapping._shapes.clear()
        mapping._shapes[series] = shape
    measurement, tags, field_name = shape
    return PointSpec(measurement, tags, ((field_name, float(value)),), time_ns)


def aggregate_point(series: Series, stats: Mapping[str, float], time_ns: int, mapping: InfluxMapping) -> PointSpec:
    """One aggregate of a series: fields ``mean``, ``min``, ``max`` (floats) and ``count`` (integer)."""
    fields: tuple[tuple[str, float | int], ...] = (
        ("mean", float(stats["mean"])), ("min", float(stats["min"])), ("max", float(stats["max"])),
        ("count", int(stats["count"])),
    )
    return PointSpec(mapping.agg_measurement.format(**_names(series)), _tags(series, mapping), fields, time_ns)


def time_ns(value: datetime) -> int:
    """Exact nanoseconds since the epoch (no float rounding)."""
    delta = value - _EPOCH
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1000


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _when(*candidates: object) -> int:
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            try:
                stamp = datetime.fromisoformat(candidate)
            except ValueError:
                raise InfluxMappingError("bad_time", f"{candidate!r} is not an ISO 8601 time") from None
            if stamp.tzinfo is None:
                raise InfluxMappingError("bad_time", f"{candidate!r} has no time zone")
            return time_ns(stamp)
    raise InfluxMappingError("no_time", "the event carries no time")


def event_point(payload: bytes, topic: str, template: TopicTemplate, mapping: InfluxMapping, *,
                aggregates: bool) -> PointSpec:
    """The point for one forwarded event (a reading or agg CloudEvent)."""
    try:
        event = json.loads(payload.decode())  # str: json need not guess the encoding
    except ValueError as exc:  # UnicodeDecodeError too
        raise InfluxMappingError("not_json", str(exc)) from None
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        raise InfluxMappingError("not_an_event", "not a CloudEvent with an object as data")
    data: dict[str, Any] = event["data"]
    kind = event.get("type")
    if kind == READING_TYPE:
        value = _number(data.get("value"))
        if value is None:
            raise InfluxMappingError("no_numeric_value", f"value {data.get('value')!r}")
        series = _series(data, topic, template)
        # The reading's own time: the device's when it sent one, else when the gateway received it.
        return reading_point(series, value, _when(data.get("device_ts"), data.get("received_at"), event.get("time")),
                             mapping)
    if kind == AGGREGATE_TYPE:
        if not aggregates:
            raise InfluxMappingError("aggregates_off", "an agg event, but aggregates = false")
        stats = {k: _number(data.get(k)) for k in ("mean", "min", "max", "count")}
        if any(v is None for v in stats.values()):
            raise InfluxMappingError("no_numeric_value", "an aggregate without mean, min, max and count")
        return aggregate_point(_series(data, topic, template), {k: v for k, v in stats.items() if v is not None},
                               _when(data.get("to"), event.get("time")), mapping)
    raise InfluxMappingError("not_a_reading", f"event type {kind!r} is neither a reading nor an aggregate")


def _series(data: Mapping[str, Any], topic: str, template: TopicTemplate) -> Series:
    """From the event's data; what it lacks (an aggregate has no site or class) from its topic."""
    get = data.get
    site, device_class, device_id, metric = get("site"), get("device_class"), get("device_id"), get("metric")
    if not (site and device_class and device_id and metric and isinstance(site, str)
            and isinstance(device_class, str) and isinstance(device_id, str) and isinstance(metric, str)):
        fields = template.parse(topic)

        def text(name: str, value: object) -> str:
            if isinstance(value, str) and value:
                return value
            from_topic = getattr(fields, name, "") if fields is not None else ""
            if not from_topic:
                raise InfluxMappingError("no_series", f"no {name} in the event or its topic {topic!r}")
            return str(from_topic)

        site, device_class = text("site", site), text("device_class", device_class)
        device_id, metric = text("device_id", device_id), text("metric", metric)
    unit, transport = get("unit"), get("transport")
    return Series(site, device_class, device_id, metric, unit if isinstance(unit, str) else None,
                  transport if isinstance(transport, str) else None)


_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})


def _tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    return escaped + " " if escaped.endswith("\\") else escaped  # a trailing backslash must not escape the ','


def _field_value(value: float | int) -> str:
    if isinstance(value, int):
        return f"{value}i"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text  # a float without a decimal point is still a float


@functools.lru_cache(maxsize=16384)
def _series_key(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    """``measurement,tag=value,...`` escaped: a gateway has few series, so this is computed once each."""
    escaped = "".join(f",{key.translate(_ESCAPE_KEY)}={_tag_value(value)}" for key, value in sorted(tags))
    return measurement.translate(_ESCAPE_MEASUREMENT) + escaped


@functools.lru_cache(maxsize=4096)
def _field_key(key: str) -> str:
    return key.translate(_ESCAPE_KEY)


def line_protocol(spec: PointSpec, precision: Precision) -> str:
    """The line for a point at ``precision``, byte for byte what influxdb-client's ``Point`` writes
    (tags and fields sorted, the same escaping; a test holds the two together), without building a
    ``Point`` per reading."""
    if len(spec.fields) == 1:
        ((key, value),) = spec.fields
        fields = f"{_field_key(key)}={_field_value(value)}"
    else:
        fields = ",".join(f"{_field_key(key)}={_field_value(value)}" for key, value in sorted(spec.fields))
    return f"{_series_key(spec.measurement, spec.tags)} {fields} {spec.time_ns // NS_PER[precision]}"


def client_point(spec: PointSpec, precision: Precision = "ms") -> Point:
    """The same point as influxdb-client's ``Point``: for code that writes with the client itself, and
    the reference :func:`line_protocol` is tested against."""
    point = Point(spec.measurement)  # type: ignore[no-untyped-call]
    for key, value in spec.tags:
        point.tag(key, value)  # type: ignore[no-untyped-call]
    for key, field_value in spec.fields:
        point.field(key, field_value)  # type: ignore[no-untyped-call]
    point.time(spec.time_ns // NS_PER[precision], write_precision=precision)  # type: ignore[no-untyped-call]
    return point


# -- the destination ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    url: str
    bucket: str
    mapping: InfluxMapping
    template: TopicTemplate
    org: str = ""
    token: str | None = None
    gzip: bool = True
    precision: Precision = "ms"
    timeout_s: float = 10.0
    aggregates: bool = False


@dataclass(slots=True)
class InfluxStats:
    points_written: int = 0
    writes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by reason: unmappable or refused by the server


class InfluxDestination:
    """``[[forward]] type = "influxdb"``: batches of events written as line protocol in one request."""

    def __init__(self, name: str, settings: InfluxSettings) -> None:
        self.name = name
        self.settings = settings
        self.stats = InfluxStats()
        self._client: InfluxDBClient | None = None
        self._write_api: WriteApi | None = None
        self._up = False
        self._closed = False
        self._probe: asyncio.Task[None] | None = None
        self._canary: str | None = None  # the last line the server took
        self._state = StateLog(log, f"forward {name} ({settings.url})")

    @property
    def connected(self) -> bool:
        return self._up and not self._closed

    async def start(self) -> None:
        """Build the client (no I/O) and look for the server in the background."""
        s = self.settings
        # retries=False: the outbox and the forwarder retry (with backoff), urllib3 must not hide an outage.
        self._client = InfluxDBClient(url=s.url, token=s.token or "", org=s.org or "-", timeout=int(s.timeout_s * 1000),
                                      enable_gzip=s.gzip, retries=False)
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._watch()

    async def close(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        await stop_task(probe)
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    def inbound(self) -> AsyncIterator[InboundMessage]:
        """Nothing ever comes back from a time-series database: the iterator ends at once."""
        return _no_inbound()

    async def submit(self, batch: Sequence[OutboundEvent]) -> asyncio.Future[int]:
        """Send ``batch`` while the batches before it are still being mapped or written (see
        :class:`~gateway.forward.base.Pipelined`): points are ordered by their timestamps, and a write is
        idempotent, so batches need not reach the server in order, and one written again changes nothing."""
        if not self.connected:
            raise DestinationUnavailableError(f"{self.name}: not connected")
        return asyncio.ensure_future(self.send(batch))

    async def send(self, batch: Sequence[OutboundEvent]) -> int:
        lines, unmappable = await asyncio.to_thread(self._lines, batch)  # a 5,000-event batch: off the loop
        if not lines and unmappable is not None:
            self._reject(unmappable.reason)
            raise UnsendableEventError(batch[0], str(unmappable))
        try:
            return await self._write_prefix(batch[: len(lines)], lines)
        except _RefusedEventError as exc:  # counted here: only the first of a batch reaches the forwarder
            self._reject(f"refused_{exc.status}")
            raise

    def _lines(self, batch: Sequence[OutboundEvent]) -> tuple[list[str], InfluxMappingError | None]:
        """The lines of the events up to the first that cannot be mapped (which comes first in the next
        batch), and why that one cannot."""
        s = self.settings
        lines: list[str] = []
        for event in batch:
            try:
                spec = event_point(event.payload, event.topic, s.template, s.mapping, aggregates=s.aggregates)
            except InfluxMappingError as exc:
                return lines, exc
            lines.append(line_protocol(spec, s.precision))
        return lines, None

    async def _write_prefix(self, events: Sequence[OutboundEvent], lines: Sequence[str]) -> int:
        """How many from the start the server took. A refused batch is halved until the refused
        event is found: alone and first, it is unsendable; else what precedes it counts as sent."""
        try:
            await self._write(lines)
            return len(lines)
        except _PayloadRefusedError as exc:
            if len(lines) == 1:
                if await self._refuses_anything():
                    raise DestinationUnavailableError(
                        f"{self.name}: the server refuses even a point it took before ({exc}): not the data, "
                        "the request (org? bucket? precision?)"
                    ) from None
                raise _RefusedEventError(events[0], exc) from None
        mid = len(lines) // 2
        head = await self._write_prefix(events[:mid], lines[:mid])
        if head < mid:
            return head
        try:
            return mid + await self._write_prefix(events[mid:], lines[mid:])
        except (UnsendableEventError, DestinationUnavailableError):
            return mid  # the head is written; the rest comes first in the next batch

    async def _refuses_anything(self) -> bool:
        """Before an event is declared unsendable: does the server still take the last line it took?
        (Points are idempotent, so writing it again changes nothing.) If not, a 400 says something
        about the request, and dropping events one by one would empty the outbox for nothing."""
        if self._canary is None:
            return False
        try:
            await self._write((self._canary,))
        except _PayloadRefusedError:
            return True
        return False

    async def _write(self, lines: Sequence[str]) -> None:
        api = self._write_api
        if api is None or self._closed:
            raise DestinationUnavailableError(f"{self.name}: not started")
        s = self.settings
        try:
            await asyncio.to_thread(api.write, s.bucket, s.org or "-", "\n".join(lines), _WRITE_PRECISION[s.precision])
        except ApiException as exc:
            status = int(exc.status or 0)
            detail = _body(exc)
            if status in PAYLOAD_REFUSED:
                raise _PayloadRefusedError(status, detail) from None
            raise DestinationUnavailableError(f"{self.name}: HTTP {status} {exc.reason or ''}: {detail}") from None
        except (HTTPError, OSError) as exc:  # refused, reset, timed out: look for the server again
            self._lost(f"{type(exc).__name__}: {exc}")
            raise DestinationUnavailableError(f"{self.name}: {type(exc).__name__}") from None
        self.stats.writes += 1
        self.stats.points_written += len(lines)
        self._canary = lines[-1]

    def _reject(self, reason: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    def _lost(self, reason: str) -> None:
        self._state.down(reason)
        self._up = False
        self._watch()

    def _watch(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._find_server(),
                                                                 name=f"influxdb-probe-{self.name}")

    async def _find_server(self) -> None:
        """Ping (``GET /ping``) with random, exponential, capped waits until the server answers."""
        attempt = 0
        while not self._closed and self._client is not None:
            if await asyncio.to_thread(self._client.ping):
                self._state.up()
                self._up = True
                return
            if attempt == 0:
                self._state.down("no answer to ping")
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, cap_s=_PROBE_CAP_S))


def _body(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return str(body or "")[:300]


async def _no_inbound() -> AsyncIterator[InboundMessage]:
    return
    yield  # an async generator that ends at once
