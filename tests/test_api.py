"""The HTTP API against a running ``iotgw demo`` (simulated serial, BLE and MQTT devices, real TCP),
its OpenAPI description fuzzed with schemathesis, Prometheus' text format, and bearer-token access."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import iotgw
from http_helpers import DemoWithHttp, get
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.alerts import AlertLog
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.destinations import forward_filters
from gateway.errors import ConfigError, GatewayError
from gateway.http.auth import authorized, is_loopback, read_token
from gateway.http.views import LearnedCatalog
from pipeline.catalog import Catalog
from pipeline.model import AGGREGATE_TYPE, ALERT_TYPE, COMMAND_ACK_TYPE, READING_TYPE
from pipeline.store import StoreReader
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate
from pipeline.traffic import TrafficLearner

DEVICES = {"pm-1": "serial", "t-1": "ble", "co2-1": "mqtt"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoWithHttp]:
    running = DemoWithHttp(tmp_path_factory.mktemp("demo"))
    yield running
    rc, _, err = running.stop()
    assert rc == 0, err
    assert "Traceback" not in err


# -- health --------------------------------------------------------------------------------------------


def test_healthz_and_readyz(demo: DemoWithHttp) -> None:
    assert get(demo.base + "/healthz").json() == {"status": "ok", "checks": {}}
    ready = get(demo.base + "/readyz")
    assert ready.status == 200
    assert ready.json() == {"status": "ok", "checks": {"broker": "up", "pipeline": "up", "store": "up"}}


# -- devices, latest, series -----------------------------------------------------------------------------


def test_devices_with_transport_metrics_and_battery(demo: DemoWithHttp) -> None:
    devices = {d["device_id"]: d for d in get(demo.base + "/api/v1/devices").json()}
    assert {k: d["transport"] for k, d in devices.items()} == DEVICES
    assert devices["t-1"]["battery_pct"] == 97.0  # the simulated BTHome sensor reports 97 %
    assert devices["pm-1"]["battery_pct"] is None
    assert set(devices["pm-1"]["metrics"]) == {"pm2_5", "pm10"}
    for d in devices.values():
        assert datetime.fromisoformat(d["last_seen"]) > datetime.now(UTC) - timedelta(minutes=5)
    rows = list(csv.DictReader(io.StringIO(get(demo.base + "/api/v1/devices?format=csv").text)))
    assert {r["device_id"]: r["transport"] for r in rows} == DEVICES
    assert next(r for r in rows if r["device_id"] == "t-1")["battery_pct"] == "97.0"


def test_latest_matches_the_store(demo: DemoWithHttp) -> None:
    latest = get(demo.base + "/api/v1/latest").json()
    with StoreReader(demo.data_dir) as store:
        series = {(d.device_id, m) for d in store.devices() for m in d.metrics}
    assert {(v["device_id"], v["metric"]) for v in latest} == series
    only = get(demo.base + "/api/v1/latest?device=co2-1").json()
    assert {v["metric"] for v in only} == {"co2", "temperature"}
    assert all(v["unit"] for v in only)


def test_series_raw_and_bucketed_agree_with_the_store(demo: DemoWithHttp) -> None:
    to = get(demo.base + "/api/v1/latest?device=t-1").json()[0]["ts"]  # a fixed end: the demo keeps writing
    query = f"device=t-1&metric=temperature&from=2000-01-01T00:00:00Z&to={to}"
    raw = get(f"{demo.base}/api/v1/series?{query}").json()
    assert raw["unit"] == "°C"
    assert raw["agg"] is None
    assert raw["bucket_ms"] is None
    with StoreReader(demo.data_dir) as store:
        found = store.series("t-1", "temperature", until_ms=int(datetime.fromisoformat(to).timestamp() * 1000))
    assert found is not None
    assert [p["value"] for p in raw["points"]] == [v for _, v in found[1]]

    counted = get(f"{demo.base}/api/v1/series?{query}&bucket=5s&agg=count").json()
    assert counted["bucket_ms"] == 5000
    assert sum(p["value"] for p in counted["points"]) == len(raw["points"])
    means = get(f"{demo.base}/api/v1/series?{query}&bucket=5s&agg=mean").json()["points"]
    lows = get(f"{demo.base}/api/v1/series?{query}&bucket=5s&agg=min").json()["points"]
    highs = get(f"{demo.base}/api/v1/series?{query}&bucket=5s&agg=max").json()["points"]
    lasts = get(f"{demo.base}/api/v1/series?{query}&bucket=5s&agg=last").json()["points"]
    assert len(means) == len(lows) == len(highs) == len(lasts) == len(counted["points"])
    for lo, mean, hi, last in zip(lows, means, highs, lasts, strict=True):
        assert lo["value"] <= mean["value"] <= hi["value"]
        assert lo["value"] <= last["value"] <= hi["value"]
    assert lasts[-1]["value"] == raw["points"][-1]["value"]

    auto = get(f"{demo.base}/api/v1/series?device=t-1&metric=temperature&from=-1h&bucket=auto&points=60").json()
    assert auto["bucket_ms"] == 60_000  # 1 h / 60 points
    text = get(f"{demo.base}/api/v1/series?{query}&format=csv").text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["ts", "value"]
    assert [float(r[1]) for r in rows[1:]] == [p["value"] for p in raw["points"]]


def test_relative_time_range(demo: DemoWithHttp) -> None:
    recent = get(f"{demo.base}/api/v1/series?device=pm-1&metric=pm2_5&from=-10m&to=now").json()
    assert recent["points"]
    empty = get(f"{demo.base}/api/v1/series?device=pm-1&metric=pm2_5&from=-30d&to=-20d").json()
    assert empty["points"] == []


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("metric=co2", "device"),
        ("device=co2-1", "metric"),
        ("device=co2-1&metric=co2&from=yesterday", "from"),
        ("device=co2-1&metric=co2&to=2026-11-28T10:00:00", "to"),  # no offset
        ("device=co2-1&metric=co2&from=-1h&to=-2h", "from"),
        ("device=co2-1&metric=co2&agg=median", "agg"),
        ("device=co2-1&metric=co2&bucket=5", "bucket"),
        ("device=co2-1&metric=co2&points=0", "points"),
        ("device=co2-1&metric=co2&format=xml", "format"),
    ],
    ids=["no-device", "no-metric", "bad-from", "naive-to", "reversed", "bad-agg", "bad-bucket", "bad-points",
         "bad-format"],
)
def test_bad_parameters_are_400_problems_naming_the_parameter(
    demo: DemoWithHttp, query: str, parameter: str
) -> None:
    answer = get(f"{demo.base}/api/v1/series?{query}")
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["parameter"] == parameter
    assert problem["status"] == 400
    assert problem["detail"].startswith(f"{parameter}: ")


def test_unknown_series_and_path_are_404_problems(demo: DemoWithHttp) -> None:
    answer = get(f"{demo.base}/api/v1/series?device=nope&metric=co2")
    assert answer.status == 404
    assert "nope/co2" in answer.json()["detail"]
    assert get(demo.base + "/api/v2/devices").json()["status"] == 404


# -- alerts, catalog, stats, metrics ---------------------------------------------------------------------


def test_alerts_catalog_and_stats(demo: DemoWithHttp) -> None:
    assert get(demo.base + "/api/v1/alerts?limit=5").json() == {"active": [], "recent": []}  # no backbone: no drops
    assert get(demo.base + "/api/v1/alerts?limit=0").json()["parameter"] == "limit"

    deadline = time.monotonic() + 60  # producers are learned from traffic, written every few seconds
    while True:
        types = {t["type"]: t for t in get(demo.base + "/api/v1/catalog").json()["types"]}
        reading = types[READING_TYPE]
        if {"driver:pm-1", "driver:t-1"} <= set(reading["producers"]):
            break
        assert time.monotonic() < deadline, reading
        time.sleep(0.5)
    assert reading["topic"].startswith("telemetry/valid/")
    assert "value" in reading["schema"]["properties"]
    doc = get(demo.base + "/api/v1/catalog/asyncapi.json").json()
    assert doc["asyncapi"] == "3.0.0"
    for ref in _refs(doc):  # every reference resolves
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, ref
            node = node[part]

    stats = get(demo.base + "/api/v1/stats").json()
    assert set(stats["stages"]) == {"collect", "clean", "define", "store", "analyze", "liveness"}
    assert stats["stored"] > 0
    assert stats["stages"]["clean"]["rejected"].get("out_of_range", 0) >= 0
    assert {"depth", "max", "high_water"} <= set(stats["queue"])


def test_metrics_parse_as_prometheus_text(demo: DemoWithHttp) -> None:
    before = get(demo.base + "/api/v1/stats").json()  # counters only grow: the scrape after sees at least these
    answer = get(demo.base + "/metrics")
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    stage_in = {s.labels["stage"]: s.value for s in families["iotgw_stage_in"].samples if s.name.endswith("_total")}
    assert set(stage_in) == {"collect", "clean", "define", "store", "analyze", "liveness"}
    assert stage_in["collect"] > 0
    assert families["iotgw_stored_readings"].samples[0].value > 0
    errors = {(s.labels["driver"], s.labels["reason"]): s.value for s in families["iotgw_driver_errors"].samples
              if s.name.endswith("_total")}
    for driver, d in before["drivers"].items():
        for reason, count in d["errors"].items():
            assert errors[(driver, reason)] >= count
    readings = {s.labels["driver"]: s.value for s in families["iotgw_driver_readings"].samples
                if s.name.endswith("_total")}
    assert set(readings) == set(before["drivers"]) == {"serial:pm-1", "ble"}
    assert all(readings[k] >= before["drivers"][k]["readings"] > 0 for k in readings)
    assert families["iotgw_queue_capacity"].samples[0].value == 1000
    limits = {s.labels["limit"] for s in families["iotgw_broker_limit_hits"].samples if s.name.endswith("_total")}
    assert limits == set(before["broker"]["limits"])  # every bound of [broker], counted
    assert families["iotgw_broker_clients"].samples[0].value >= 1  # the demo's MQTT sensor
    changes = {(s.labels["stage"], s.labels["change"]) for s in families["iotgw_alert_changes"].samples
               if s.name.endswith("_total")}
    assert changes == {(stage, change) for stage in ("analyze", "liveness")
                       for change in ("raised", "cleared", "record_failures")}
    assert families["iotgw_devices_silent"].samples[0].value == before["liveness"]["silent"]
    assert all(name.startswith("iotgw_") for name in families)  # a private registry: no process_/python_ metrics


# -- OpenAPI and fuzzing -----------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_errors_and_conforming_responses(demo: DemoWithHttp) -> None:
    """Fuzz every operation of /openapi.json against the running gateway (limited examples: ~60 s)."""
    schema = schemathesis.openapi.from_url(demo.base + "/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results)  # the description itself is valid
    assert len(operations) == 14  # 10, and the event portal's 4
    seen: set[tuple[str, int]] = set()
    for operation in operations:
        examples = 40 if operation.path == "/api/v1/series" else 8

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case[Any]) -> None:
            response = case.call_and_validate(base_url=demo.base, checks=checks, timeout=30)
            seen.add((case.operation.path, response.status_code))

        fuzz()
    # the fuzzer did reach the handlers: every operation answered, and the series query refused bad input
    assert {path for path, _ in seen} == {op.path for op in operations}
    assert ("/api/v1/series", 400) in seen
    assert ("/api/v1/stats", 200) in seen


# -- access: loopback, tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("gw.example", False)],  # noqa: S104
)
def test_which_binds_need_a_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_bind_without_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"enabled": True, "host": "0.0.0.0"}})  # noqa: S104
    assert info.value.problems == [
        "http: host '0.0.0.0' is not a loopback address (or require_token is set): configure a bearer token "
        "(token, token_file or token_env)"
    ]
    # a token satisfies it; a disabled API needs none
    parse_config({"http": {"enabled": True, "host": "0.0.0.0", "token": "s3cret-0123456789"}})  # noqa: S104
    parse_config({"http": {"host": "0.0.0.0"}})  # noqa: S104
    # --http-port turns the API on: the same check, the same kind of message
    with pytest.raises(ConfigError) as info:
        parse_config({"http": {"host": "10.0.0.1"}}).with_overrides(http_port=8080)
    assert info.value.problems[0].startswith("http: host '10.0.0.1' is not a loopback address")
    with pytest.raises(ConfigError, match="token_file"):
        parse_config({"http": {"enabled": True, "host": "10.0.0.1", "token_file": "/nonexistent/token"}})


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n", encoding="utf-8")
    monkeypatch.setenv("IOTGW_TEST_TOKEN", "from-env")
    assert read_token(SecretStr("inline"), path, "IOTGW_TEST_TOKEN") == SecretStr("inline")
    assert read_token(None, path, "IOTGW_TEST_TOKEN") == SecretStr("from-file")
    assert read_token(None, None, "IOTGW_TEST_TOKEN") == SecretStr("from-env")
    assert read_token(None, None, "IOTGW_TEST_UNSET") is None
    with pytest.raises(ValueError, match="cannot read"):
        read_token(None, tmp_path / "missing", None)
    assert authorized("Bearer inline", SecretStr("inline"))
    assert authorized("bearer inline", SecretStr("inline"))
    assert not authorized("Bearer inlinex", SecretStr("inline"))
    assert not authorized("Basic aW5saW5l", SecretStr("inline"))
    assert not authorized(None, SecretStr("inline"))


def _own_address() -> str | None:
    """A non-loopback address of this machine (the one a default route would use), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent for a UDP connect
            address: str = s.getsockname()[0]
        except OSError:
            return None
    return None if is_loopback(address) else address


@pytest.mark.parametrize("where", ["loopback-require_token", "own-address"])
async def test_token_required_401_without_and_200_with(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    host = "127.0.0.1" if where.startswith("loopback") else _own_address()
    if host is None:
        pytest.skip("this machine has no non-loopback address")
    token = "t0ken-0123456789-" + where
    config = parse_config({
        "storage": {"data_dir": str(tmp_path)}, "broker": {"port": 0, "allow_anonymous": True},
        "http": {"enabled": True, "host": host, "port": 0, "token": token, "require_token": where != "own-address"},
    })
    caplog.set_level(logging.DEBUG)
    async with Gateway(config) as gw:
        assert gw.http is not None
        base = gw.http.url.rstrip("/")
        denied = await asyncio.to_thread(get, base + "/api/v1/devices")
        assert denied.status == 401
        assert denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert denied.json()["status"] == 401
        assert (await asyncio.to_thread(get, base + "/metrics", "wrong")).status == 401
        assert (await asyncio.to_thread(get, base + "/api/v1/devices", token)).status == 200
        assert (await asyncio.to_thread(get, base + "/metrics", token)).status == 200
        assert (await asyncio.to_thread(get, base + "/healthz")).status == 200  # liveness stays open
        page = await asyncio.to_thread(get, base + "/")
        assert page.status == 200  # the page holds no data: it asks for the token
        assert b"token" in page.body
        spec = (await asyncio.to_thread(get, base + "/openapi.json", token)).json()
        assert spec["security"] == [{"bearer": []}]
    assert token not in caplog.text


async def test_http_port_in_use_names_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config({"storage": {"data_dir": str(tmp_path)}, "broker": {"port": 0, "allow_anonymous": True},
                               "http": {"enabled": True, "port": port}})
        with pytest.raises(GatewayError, match=rf"HTTP port {port} on 127.0.0.1 is already in use.*\[http\] port"):
            async with Gateway(config):
                pass


def test_alert_log_raises_updates_and_clears() -> None:
    log = AlertLog(keep=3)
    t0 = datetime(2026, 11, 28, tzinfo=UTC)
    log.raise_("A1", "outbox_dropped", "central", detail={"dropped": 5}, now=t0)
    log.raise_("A2", "outbox_dropped", "central", detail={"dropped": 7}, now=t0 + timedelta(seconds=10))
    log.raise_("A3", "outbox_dropped", "archive", detail={"dropped": 1}, now=t0 + timedelta(seconds=10))
    assert [(a.id, a.detail["dropped"]) for a in log.active()] == [("A3", 1), ("A1", 7)]
    log.clear_others("outbox_dropped", {"archive"}, now=t0 + timedelta(seconds=20))
    assert [a.id for a in log.active()] == ["A3"]
    recent = log.recent(10)
    assert [a.id for a in recent] == ["A3", "A1"]
    assert recent[1].cleared_at == t0 + timedelta(seconds=20)


async def test_catalog_consumers_come_from_forward_filters(tmp_path: Path) -> None:
    """The catalog the API shows lists each forward destination as a consumer of what it forwards."""
    config = parse_config({"site": "s1", "storage": {"data_dir": str(tmp_path)}, "forward": [
        {"name": "central", "type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topics": ["telemetry/valid/#", "alert/#"]},
        {"name": "stream", "type": "nats", "url": "nats://127.0.0.1:4222", "topics": ["telemetry/agg/>"]},
    ]})
    catalog = Catalog(TopicTemplate(DEFAULT_TEMPLATE))
    async with TrafficLearner(catalog, tmp_path, gateway_id="gw", flush_interval_s=3600) as learner:
        for consumer, topic_filter in forward_filters(config):  # as the gateway does at start
            learner.subscribed(consumer, topic_filter)
        await learner.flush()
        view = LearnedCatalog(tmp_path, lambda: catalog, site="s1", host="127.0.0.1", port=lambda: 1883)
        types = {t.type: t for t in view.types()}
        doc = view.asyncapi()

    def consumers(type_: str) -> tuple[str, ...]:
        return tuple(c.split(" ")[0] for c in types[type_].consumers)

    assert consumers(READING_TYPE) == ("forward:central",)
    assert consumers(AGGREGATE_TYPE) == ("forward:stream",)
    assert consumers(f"{ALERT_TYPE} (outbox_dropped)") == ("forward:central",)
    assert consumers(COMMAND_ACK_TYPE) == ()
    reading = doc["channels"][f"{READING_TYPE}_1.0"]
    assert reading["address"] == "telemetry/valid/{version}/{site}/{device_class}/{device_id}/{metric}"
    assert {"device_class", "device_id", "metric"} <= set(reading["parameters"])
    assert [c["client"] for c in reading["x-iotgw-consumers"]] == ["forward:central"]


def test_run_with_http_port_on_a_public_host_without_token_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[http]\nhost = "0.0.0.0"\n', encoding="utf-8")
    result = iotgw("run", "--config", str(config), "--data-dir", str(tmp_path), "--http-port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("http: host '0.0.0.0' is not a loopback address")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []
