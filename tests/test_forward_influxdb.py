"""The InfluxDB sink against a real server of the InfluxDB v2 write API: VictoriaMetrics (Debian's
``victoria-metrics``), started by a fixture on a loopback port; points are read back through its
export API. VictoriaMetrics does not check org, bucket or token (any value is accepted), stores
millisecond timestamps, and names a series ``measurement_field`` with the tags as labels.

The gateway runs in-process; devices publish to its embedded broker over TCP with paho.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import until
from peers import (
    ExportedSeries,
    VictoriaMetrics,
    free_port,
    mqtt_publish,
    victoria_metrics_fixture,  # noqa: F401  (pytest fixture)
)

from gateway.app import Gateway
from gateway.config import GatewayConfig, InfluxForward, parse_config
from gateway.errors import ConfigError
from gateway.forward.base import DestinationUnavailableError, OutboundEvent, UnsendableEventError
from gateway.forward.influxdb.destination import (
    InfluxDestination,
    InfluxMapping,
    InfluxMappingError,
    InfluxSettings,
    PointSpec,
    Series,
    client_point,
    event_point,
    line_protocol,
    reading_point,
)
from gateway.forward.registry import build_destination
from pipeline.model import ALERT_TYPE, Reading, new_event_id
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate

RAW = "telemetry/raw/1.0/s1/environment/{device}/{metric}"
VALID = "telemetry/valid/1.0/s1/environment/{device}/{metric}"
TEMPLATE = TopicTemplate(DEFAULT_TEMPLATE)
MAPPING = InfluxMapping(gateway="gw-a")
T = TypeVar("T")


def gateway_config(tmp_path: Path, influx: dict[str, Any], **pipeline: Any) -> GatewayConfig:
    return parse_config({
        "site": "s1", "gateway_id": "gw-a", "broker": {"port": free_port(), "allow_anonymous": True},
        "storage": {"data_dir": str(tmp_path / "gw")}, "pipeline": {"max_latency_s": 0.05, **pipeline},
        "forward": [{"name": "tsdb", "type": "influxdb", "bucket": "b", "org": "o", "token": "t", **influx}],
    })


def _tsdb(gw: Gateway) -> dict[str, Any]:
    stats: dict[str, Any] = gw.stats()["forward"]["destinations"]["tsdb"]
    return stats


def _rfc3339(ms: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")


def _readings(device: str, metric: str, start_ms: int, count: int, value0: float = 20.0) -> list[tuple[str, str]]:
    """``count`` readings 10 ms apart with device timestamps; value = value0 + i / 4. The sequence number
    follows the time (the clean stage drops a repeated one as a duplicate)."""
    return [
        (RAW.format(device=device, metric=metric),
         json.dumps({"value": value0 + i / 4, "unit": "C", "ts": _rfc3339(start_ms + 10 * i),
                     "seq": (start_ms // 10 + i) % 2**31}))
        for i in range(count)
    ]


def _series(exported: list[ExportedSeries], name: str, **labels: str) -> ExportedSeries:
    found = [s for s in exported if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {[(s.name, s.labels) for s in exported]}"
    return found[0]


async def _exported(find: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """Poll the server's export until ``find`` finds something."""
    deadline = time.monotonic() + timeout
    while (found := await asyncio.to_thread(find)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)
    return found


def _start_ms() -> int:
    """A whole second a minute ago: device clocks are plausible, and the values are easy to predict."""
    return (int(time.time()) - 60) * 1000


# -- the mapping (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    PointSpec("environment", (("site", "s1"), ("device_id", "t-1")), (("temperature", 21.5),), 1_700_000_000_123),
    PointSpec("air quality", (("site", "a,b=c d"), ("unit", "µg/m³")), (("pm2 5", 12.0),), 0),
    PointSpec("m,x", (("tag", "ends\\"),), (("count", 7), ("mean", 1e-07), ("max", -3.25)), 42),
    PointSpec("m", (), (("f=x", 1e21),), 1),
], ids=["plain", "spaces-commas-unicode", "trailing-backslash-int", "no-tags-exponent"])
def test_line_protocol_is_what_influxdb_client_writes(spec: PointSpec) -> None:
    for precision in ("s", "ms", "us", "ns"):
        reference = client_point(spec, precision).to_line_protocol()  # type: ignore[no-untyped-call]
        assert line_protocol(spec, precision) == reference


def _reading_event(**changes: Any) -> bytes:
    reading = Reading(
        id=new_event_id(), site="s1", device_id="t-1", device_class="environment", transport="mqtt",
        metric="temperature", value=21.5, unit="C", device_ts=datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC),
        received_at=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
    ).model_copy(update=changes)
    return json.dumps(reading.to_cloudevent(VALID.format(device="t-1", metric="temperature"))).encode()


def test_a_reading_maps_to_measurement_tags_field_and_its_own_time() -> None:
    topic = VALID.format(device="t-1", metric="temperature")
    spec = event_point(_reading_event(), topic, TEMPLATE, MAPPING, aggregates=False)
    assert spec == PointSpec(
        "environment",
        (("site", "s1"), ("gateway", "gw-a"), ("device_class", "environment"), ("device_id", "t-1"), ("unit", "C")),
        (("temperature", 21.5),),
        1_767_323_045_678_901_000,  # the device's time, to the microsecond
    )
    assert line_protocol(spec, "ms").endswith(" 1767323045678")
    no_device_time = event_point(_reading_event(device_ts=None), topic, TEMPLATE, MAPPING, aggregates=False)
    assert no_device_time.time_ns == 1_767_323_046_000_000_000  # else the gateway's receive time
    custom = InfluxMapping(gateway="gw-a", measurement="{site}_{metric}", field="value", tags=("device_id",))
    assert reading_point(Series("s1", "environment", "t-1", "temperature"), 1.0, 5, custom) == PointSpec(
        "s1_temperature", (("device_id", "t-1"),), (("value", 1.0),), 5)


def test_an_aggregate_maps_to_mean_min_max_count_with_the_series_from_its_topic() -> None:
    topic = "telemetry/agg/1.0/s1/environment/t-1/temperature"
    event = {"specversion": "1.0", "id": new_event_id(), "type": "io.iotgw.telemetry.aggregate.v1",
             "time": "2026-01-02T03:04:05Z",
             "data": {"device_id": "t-1", "metric": "temperature", "unit": "C", "count": 3, "mean": 2.0, "min": 1.0,
                      "max": 3.0, "from": "2026-01-02T03:04:00+00:00", "to": "2026-01-02T03:04:05.5+00:00"}}
    spec = event_point(json.dumps(event).encode(), topic, TEMPLATE, MAPPING, aggregates=True)
    assert spec.measurement == "temperature_agg"
    assert dict(spec.tags) == {"site": "s1", "gateway": "gw-a", "device_class": "environment", "device_id": "t-1",
                               "unit": "C"}
    assert dict(spec.fields) == {"mean": 2.0, "min": 1.0, "max": 3.0, "count": 3}
    assert spec.time_ns == 1_767_323_045_500_000_000  # the end of the window
    with pytest.raises(InfluxMappingError) as off:
        event_point(json.dumps(event).encode(), topic, TEMPLATE, MAPPING, aggregates=False)
    assert off.value.reason == "aggregates_off"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "not_json"),
    (b"[1, 2]", "not_an_event"),
    (json.dumps({"type": ALERT_TYPE, "data": {"alert": "x"}}).encode(), "not_a_reading"),
    (json.dumps({"type": "io.iotgw.telemetry.reading.v1", "data": {"value": "high"}}).encode(), "no_numeric_value"),
    (json.dumps({"type": "io.iotgw.telemetry.reading.v1", "data": {"value": True}}).encode(), "no_numeric_value"),
    (json.dumps({"type": "io.iotgw.telemetry.reading.v1", "data": {"value": 1, "site": "s1", "device_class": "e",
                 "device_id": "d", "metric": "m"}}).encode(), "no_time"),
    (json.dumps({"type": "io.iotgw.telemetry.reading.v1", "data": {"value": 1, "site": "s1", "device_class": "e",
                 "device_id": "d", "metric": "m", "received_at": "yesterday"}}).encode(), "bad_time"),
], ids=["not-json", "not-an-object", "alert", "text-value", "bool-value", "no-time", "bad-time"])
def test_events_without_a_point_form_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InfluxMappingError) as refused:
        event_point(payload, "elsewhere", TEMPLATE, MAPPING, aggregates=True)
    assert refused.value.reason == reason


def test_config_defaults_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = gateway_config(tmp_path, {"url": "http://127.0.0.1:8086"})
    forward = config.forward[0]
    assert isinstance(forward, InfluxForward)
    defaults = (forward.batch_size, forward.precision, forward.gzip, forward.measurement, forward.aggregates)
    assert defaults == (5000, "ms", True, "{device_class}", False)
    gw = Gateway(config)
    assert gw.destinations.forwarder is not None
    assert [f.pattern for f in gw.destinations.forwarder.routes["tsdb"].filters] == ["telemetry/valid/+/+/+/+/+"]
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("IOTGW_TEST_TOKEN", "from-env")
    sources = [({"token_file": str(token_file)}, "from-file"), ({"token_env": "IOTGW_TEST_TOKEN"}, "from-env")]
    for source, token in sources:
        cfg = gateway_config(tmp_path, {"url": "https://influx.example:8086", "token": None, **source}).forward[0]
        dest = build_destination(cfg, "gw-a")
        assert isinstance(dest, InfluxDestination)
        assert dest.settings.token == token
    problems = {
        "url": "ftp://x", "measurement": "{room}", "batch_size": 50_001, "tags": ["room"], "token_env": "X",
    }
    for key, value in problems.items():
        with pytest.raises(ConfigError) as error:
            gateway_config(tmp_path, {"url": "http://127.0.0.1:8086", key: value})
        assert error.value.problems[0].startswith("forward[0]"), error.value.problems
    missing = gateway_config(tmp_path, {"url": "http://h:1", "token": None, "token_env": "IOTGW_NO_SUCH_VAR"})
    with pytest.raises(ConfigError, match="token_env: IOTGW_NO_SUCH_VAR is not set"):
        build_destination(missing.forward[0], "gw-a")


# -- against VictoriaMetrics ---------------------------------------------------------------------------


async def test_readings_land_with_values_tags_and_device_timestamps(
    tmp_path: Path, victoria_metrics: VictoriaMetrics
) -> None:
    config = gateway_config(tmp_path, {"url": victoria_metrics.url, "aggregates": True},
                            analyze={"windows": ["1s"], "grace_s": 0.1})
    start = _start_ms()
    async with Gateway(config) as gw:
        await until(lambda: _tsdb(gw)["connected"], 15, "the server found")
        url = f"mqtt://127.0.0.1:{gw.broker.port}"
        before_ms = int(time.time() * 1000)
        messages = [*_readings("t-1", "temperature", start, 40), *_readings("t-2", "humidity", start + 5, 30, 50.0),
                    (RAW.format(device="t-3", metric="temperature"), json.dumps({"value": -4.5, "unit": "C"}))]
        await asyncio.to_thread(mqtt_publish, url, messages)

        def all_40_aggregated() -> ExportedSeries | None:  # the last aggregate of t-1 covers all 40 readings
            found = [s for s in victoria_metrics.export('{__name__="temperature_agg_count",device_id="t-1"}')
                     if 40.0 in s.values]
            return found[0] if found else None

        agg_done = await _exported(all_40_aggregated, "the aggregate of all 40 readings")

        def readings_landed() -> list[ExportedSeries] | None:
            found = victoria_metrics.export('{__name__=~"environment_.*"}')
            return found if sum(len(s.values) for s in found) >= 71 else None

        exported = await _exported(readings_landed, "71 readings")
        after_ms = int(time.time() * 1000)
        assert _tsdb(gw)["dropped"] == 0
    t1 = _series(exported, "environment_temperature", device_id="t-1")
    assert t1.labels == {"site": "s1", "gateway": "gw-a", "device_class": "environment", "device_id": "t-1",
                         "unit": "C"}
    assert t1.timestamps == [start + 10 * i for i in range(40)]
    assert t1.values == [20.0 + i / 4 for i in range(40)]
    t2 = _series(exported, "environment_humidity", device_id="t-2")
    assert t2.timestamps == [start + 5 + 10 * i for i in range(30)]
    assert t2.values == [50.0 + i / 4 for i in range(30)]
    t3 = _series(exported, "environment_temperature", device_id="t-3")  # no device time: the receive time
    assert t3.values == [-4.5]
    assert before_ms <= t3.timestamps[0] <= after_ms
    final = await asyncio.to_thread(victoria_metrics.export, '{__name__=~"temperature_agg_.*",device_id="t-1"}')
    at = agg_done.timestamps[agg_done.values.index(40.0)]
    last = {s.name: s.values[s.timestamps.index(at)] for s in final}
    assert last == {"temperature_agg_count": 40.0, "temperature_agg_min": 20.0, "temperature_agg_max": 29.75,
                    "temperature_agg_mean": pytest.approx(sum(20.0 + i / 4 for i in range(40)) / 40)}
    assert at == start + 1000  # an aggregate is stamped with the end of its (1 s) window


async def test_an_outage_delays_writes_and_loses_none(tmp_path: Path, victoria_metrics: VictoriaMetrics) -> None:
    config = gateway_config(tmp_path, {"url": victoria_metrics.url, "batch_size": 50})
    start = _start_ms()
    async with Gateway(config) as gw:
        await until(lambda: _tsdb(gw)["connected"], 15, "the server found")
        url = f"mqtt://127.0.0.1:{gw.broker.port}"
        await asyncio.to_thread(mqtt_publish, url, _readings("o-1", "temperature", start, 100))
        await until(lambda: _tsdb(gw)["delivered"] == 100, 30, "the first 100 delivered")
        # The outage: SIGTERM, because VictoriaMetrics killed with SIGKILL loses series it registered
        # seconds before, even after /internal/force_flush (its own durability, not the gateway's).
        await asyncio.to_thread(victoria_metrics.stop)
        await asyncio.to_thread(mqtt_publish, url, _readings("o-1", "temperature", start + 1000, 300))
        await until(lambda: _tsdb(gw)["depth"] == 300 and not _tsdb(gw)["connected"], 30, "300 queued")
        failures = _tsdb(gw)["send_failures"]
        await asyncio.sleep(2)
        assert _tsdb(gw)["send_failures"] - failures <= 3  # no hammering: it waits for the server
        assert _tsdb(gw)["delivered"] == 100
        await asyncio.to_thread(victoria_metrics.start)  # same port, same storage
        await until(lambda: _tsdb(gw)["delivered"] == 400, 60, "the backlog delivered")
        assert _tsdb(gw)["depth"] == 0
        assert _tsdb(gw)["dropped"] == 0
    exported = await asyncio.to_thread(victoria_metrics.export)
    series = _series(exported, "environment_temperature", device_id="o-1")
    expected = [start + 10 * i for i in range(100)] + [start + 1000 + 10 * i for i in range(300)]
    assert sorted(set(series.timestamps)) == expected  # every point, each at its own time
    # A batch resent because its answer was lost would repeat points with the same timestamp (InfluxDB
    # overwrites them; VictoriaMetrics keeps both). The server stopped between batches: none here.
    assert len(series.timestamps) == 400


async def test_an_unmappable_event_is_dropped_counted_and_does_not_block_the_queue(
    tmp_path: Path, victoria_metrics: VictoriaMetrics
) -> None:
    config = gateway_config(tmp_path, {"url": victoria_metrics.url})
    start = _start_ms()
    async with Gateway(config) as gw:
        await until(lambda: _tsdb(gw)["connected"], 15, "the server found")
        url = f"mqtt://127.0.0.1:{gw.broker.port}"
        # Anyone may publish on a valid-stage topic of the embedded broker: this is no reading.
        bogus = (VALID.format(device="u-1", metric="temperature"), json.dumps({"hello": "world"}))
        await asyncio.to_thread(mqtt_publish, url, [*_readings("u-1", "temperature", start, 5), bogus,
                                                    *_readings("u-1", "temperature", start + 50, 5)])
        await until(lambda: _tsdb(gw)["delivered"] == 10 and _tsdb(gw)["dropped"] == 1, 30, "10 delivered, 1 drop")
        assert gw.destinations.forwarder is not None
        dest = gw.destinations.forwarder.routes["tsdb"].destination
        assert isinstance(dest, InfluxDestination)
        assert dest.stats.rejected == {"not_an_event": 1}
        assert _tsdb(gw)["depth"] == 0
    exported = await asyncio.to_thread(victoria_metrics.export)
    assert _series(exported, "environment_temperature", device_id="u-1").timestamps == [
        start + 10 * i for i in range(10)]


# -- on the wire -----------------------------------------------------------------------------------------


class _Recorder:
    """A TCP relay on loopback that records what the client sends (to look at the HTTP request)."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.sent = bytearray()
        self._upstream = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _Recorder:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if record:
                        self.sent += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def _outbound(payloads: list[bytes], topic: str) -> list[OutboundEvent]:
    return [OutboundEvent(i + 1, new_event_id(), topic, "t-1", p, 0) for i, p in enumerate(payloads)]


def _settings(url: str, **changes: Any) -> InfluxSettings:
    return InfluxSettings(url=url, bucket="b", mapping=MAPPING, template=TEMPLATE, org="o", token="t",  # noqa: S106  (a test token)
                          **changes)


async def test_writes_are_gzip_compressed_on_the_wire(victoria_metrics: VictoriaMetrics) -> None:
    topic = VALID.format(device="t-1", metric="temperature")
    base = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    events = _outbound([_reading_event(value=float(i), device_ts=base + timedelta(milliseconds=i)) for i in range(3)],
                       topic)
    async with _Recorder(victoria_metrics.port) as recorder:
        dest = InfluxDestination("tsdb", _settings(f"http://127.0.0.1:{recorder.port}"))
        await dest.start()
        try:
            await until(lambda: dest.connected, 15, "ping")
            assert await dest.send(events) == 3
        finally:
            await dest.close()
    head, _, body = bytes(recorder.sent).rpartition(b"POST /api/v2/write")[2].partition(b"\r\n\r\n")
    headers = head.decode().lower()
    assert "content-encoding: gzip" in headers
    assert "authorization: token t" in headers
    assert gzip.decompress(body).decode().splitlines() == [
        f"environment,device_class=environment,device_id=t-1,gateway=gw-a,site=s1,unit=C temperature={v} "
        f"{1767323045678 + v}" for v in (0, 1, 2)]
    series = _series(await asyncio.to_thread(victoria_metrics.export), "environment_temperature")
    assert (series.values, series.timestamps) == ([0.0, 1.0, 2.0], [1767323045678 + v for v in (0, 1, 2)])


# -- server answers VictoriaMetrics never gives ----------------------------------------------------------


class _RefusingServer(http.server.ThreadingHTTPServer):
    """A FAKE write endpoint, because no real server here refuses lines: VictoriaMetrics answers 204 to
    malformed ones, and Debian's influxdb (1.6) has no v2 write API. It answers ``status`` to a write
    whose body holds ``refuse``, else 204, and records the lines it took."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.refusing = True
        self.refuse_all = False
        self.taken: list[str] = []
        self.requests = 0
        self.request_times: list[float] = []
        super().__init__(("127.0.0.1", 0), _RefusingHandler)


class _RefusingHandler(http.server.BaseHTTPRequestHandler):
    server: _RefusingServer

    def do_GET(self) -> None:
        self.send_response(204)  # /ping
        self.end_headers()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        lines = body.decode().splitlines()
        self.server.requests += 1
        self.server.request_times.append(time.monotonic())
        if self.server.refusing and (self.server.refuse_all or any("refuse" in line for line in lines)):
            self.send_response(self.server.status)
            self.end_headers()
            self.wfile.write(b'{"code":"invalid","message":"refused"}')
            return
        self.server.taken += lines
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def refusing() -> Iterator[list[_RefusingServer]]:
    made: list[_RefusingServer] = []
    yield made
    for server in made:
        server.shutdown()
        server.server_close()


def _serve(status: int, made: list[_RefusingServer]) -> _RefusingServer:
    server = _RefusingServer(status)
    made.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def test_a_refused_line_is_found_and_only_it_is_unsendable(refusing: list[_RefusingServer]) -> None:
    server = _serve(400, refusing)
    topic = "telemetry/valid/1.0/s1/environment/{}/temperature"
    payloads = [_reading_event(device_id=f"d{i}") for i in range(8)]
    payloads[5] = _reading_event(device_id="refuse")
    events = [OutboundEvent(i + 1, new_event_id(), topic.format(f"d{i}"), "", p, 0) for i, p in enumerate(payloads)]
    dest = InfluxDestination("tsdb", _settings(f"http://127.0.0.1:{server.server_address[1]}"))
    await dest.start()
    try:
        await until(lambda: dest.connected, 15, "ping")
        assert await dest.send(events) == 5  # the five before the refused one
        with pytest.raises(UnsendableEventError) as unsendable:
            await dest.send(events[5:])
        assert unsendable.value.event is events[5]
        assert await dest.send(events[6:]) == 2
        server.refuse_all = True  # a 400 about the request (a wrong org, say), not about a line
        with pytest.raises(DestinationUnavailableError, match="refuses even a point it took before"):
            await dest.send(events[6:])
    finally:
        await dest.close()
    taken = [line.split("device_id=")[1].split(",")[0] for line in server.taken]
    # Each in order; the last line taken is written again (idempotent) before an event is declared unsendable.
    assert list(dict.fromkeys(taken)) == ["d0", "d1", "d2", "d3", "d4", "d6", "d7"]
    assert dest.stats.rejected == {"refused_400": 1}


@pytest.mark.parametrize("status", [429, 503, 401, 404])
async def test_overload_server_errors_and_auth_keep_the_batch(refusing: list[_RefusingServer], status: int) -> None:
    server = _serve(status, refusing)
    events = _outbound([_reading_event(device_id="refuse")], VALID.format(device="refuse", metric="temperature"))
    dest = InfluxDestination("tsdb", _settings(f"http://127.0.0.1:{server.server_address[1]}"))
    await dest.start()
    try:
        await until(lambda: dest.connected, 15, "ping")
        with pytest.raises(DestinationUnavailableError, match=f"HTTP {status}"):
            await dest.send(events)
    finally:
        await dest.close()
    assert server.requests == 1  # no retry inside the client: the forwarder retries with backoff
    assert dest.stats.rejected == {}


async def test_a_server_that_is_not_there_is_unavailable_and_looked_for() -> None:
    dest = InfluxDestination("tsdb", _settings(f"http://127.0.0.1:{free_port()}", timeout_s=2))
    await dest.start()
    try:
        await asyncio.sleep(0.3)
        assert not dest.connected
        with pytest.raises(DestinationUnavailableError):
            await dest.send(_outbound([_reading_event()], VALID.format(device="t-1", metric="temperature")))
    finally:
        await dest.close()


async def test_the_forwarder_backs_off_while_the_server_is_overloaded(
    tmp_path: Path, refusing: list[_RefusingServer]
) -> None:
    server = _serve(503, refusing)
    config = gateway_config(tmp_path, {"url": f"http://127.0.0.1:{server.server_address[1]}"})
    async with Gateway(config) as gw:
        await until(lambda: _tsdb(gw)["connected"], 15, "ping")
        url = f"mqtt://127.0.0.1:{gw.broker.port}"
        await asyncio.to_thread(mqtt_publish, url, _readings("refuse", "temperature", _start_ms(), 3))
        await until(lambda: server.requests >= 4, 30, "four attempts")
        first, *_, fourth = server.request_times[:4]
        assert fourth - first >= 0.4 + 0.8 + 1.6  # exponential waits between attempts, not a busy loop
        assert _tsdb(gw)["delivered"] == 0
        server.refusing = False  # the server recovers
        await until(lambda: _tsdb(gw)["delivered"] == 3, 30, "delivery after the overload")
    assert len(server.taken) == 3
