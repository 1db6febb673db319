"""The event portal: search, versions side by side, the subscription tester, applications beside learned
traffic, and definitions from the form -- through the HTTP API of a gateway running in-process, and
through its dashboard in a headless Chromium against ``iotgw run`` (the form, the catalog, and
``iotgw catalog --format asyncapi`` afterwards)."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, iotgw
from http_helpers import get
from jsonschema import Draft7Validator
from peers import MqttCollector, mqtt_publish
from test_catalog import assert_valid_asyncapi, asyncapi_schema  # noqa: F401  (a fixture)
from test_dashboard import CHROMIUM, DevTools, browser  # noqa: F401  (a fixture)
from test_http_security import _raw

from gateway.app import Gateway
from gateway.config import load_config, parse_config
from gateway.portal import RecentTopics, with_applications
from gateway.portal.define import definition_toml, field_of
from gateway.portal.types import search, type_records
from pipeline.asyncapi import asyncapi_document
from pipeline.catalog import Catalog
from pipeline.topics import TopicTemplate
from pipeline.traffic import Producer

TEMPERATURE = "com.example.environment.temperature.v1"
HUMIDITY = "com.example.environment.humidity.v1"
V10 = {"name": TEMPERATURE, "version": "1.0", "metric": "temperature", "device_classes": ["environment"],
       "description": "air temperature", "value": {"unit": "°C", "minimum": -40, "maximum": 85}}
V11 = {**V10, "version": "1.1", "description": "air temperature with the sensor's accuracy",
       "fields": {"accuracy": {"type": "number", "unit": "°C", "minimum": 0, "description": "± of value"}}}
BROKEN_V11 = {**V10, "version": "1.1", "fields": {"battery": {"type": "number", "required": True}}}
APPS = [
    {"name": "hvac", "owner": "facilities", "clients": ["mqtt:hvac-controller"], "consumes": [TEMPERATURE]},
    {"name": "archive", "clients": ["mqtt:archiver"], "consumes": [HUMIDITY]},
    {"name": "sensors", "clients": ["mqtt:env-1"], "produces": [TEMPERATURE]},
]


def _settings(portal_file: Path) -> dict[str, Any]:
    humidity = {"name": HUMIDITY, "version": "1.0", "metric": "humidity", "device_classes": ["environment"],
                "value": {"unit": "%", "minimum": 0, "maximum": 100}}
    return {"types": [V10, humidity], "applications": APPS, "portal_file": str(portal_file),
            "flush_interval_s": 0.5}


# -- pure parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "field"), [
    ("event type x.v1 1.1: field 'battery' is new and required; a minor version adds optional fields only",
     "fields.battery.required"),
    ("event type x.v1 1.1: field 'value': unit 'K' differs from 1.0's '°C'", "value.unit"),
    ("event type x.v1 1.1: field 'accuracy': type 'string' differs from 1.0's 'number'", "fields.accuracy.type"),
    ("event type x.v1 1.1: field 'accuracy' of 1.0 is missing (a minor version only adds fields)", "fields"),
    ("event type x.v1 1.1: device class 'env' of 1.0 is missing", "device_classes"),
    ("event type x.v1 1.0 is declared twice", "version"),
    ("event type y.v1 1.0: metric 'temperature' of device class 'environment' at version 1.0 is already covered by "
     "x.v1", "metric"),
    ("version '1.x' must be MAJOR.MINOR, for example 1.0", "version"),
    ("name 'com.ex.a.v2' ends in .v2 but version 1.0 has major 1", "version"),
    ("name 'x' must be dot-separated words ending in .v<MAJOR>", "name"),
], ids=["new-required", "value-unit", "field-type", "field-missing", "device-class", "twice", "overlap",
        "version", "major", "name"])
def test_each_catalog_check_names_its_field(message: str, field: str) -> None:
    assert field_of(message) == field


class _Counted:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, int]] = []

    def published(self, topic: str, origin: str | None, count: int = 1) -> None:
        self.calls.append((topic, origin, count))

    def subscribed(self, client: str, topic_filter: str) -> None: ...

    def unsubscribed(self, client: str, topic_filter: str) -> None: ...


def test_live_topics_count_a_burst_at_once_and_pass_it_on() -> None:
    inner, now = _Counted(), [1.0]
    recent = RecentTopics(inner, limit=2, clock=lambda: now[0])
    recent.published("a/1", "mqtt:x")
    now[0] = 2.0
    recent.published("a/1", "mqtt:x", 4)  # a burst of 4 (the external broker counts each burst's topics once)
    recent.published("b/1", None, 3)
    recent.published("c/1", None)  # over the limit: the oldest topic goes
    assert [(t.topic, t.last_seen_ms, t.messages) for t in recent.topics()] == [("c/1", 2000, 1), ("b/1", 2000, 3)]
    assert inner.calls == [("a/1", "mqtt:x", 1), ("a/1", "mqtt:x", 4), ("b/1", None, 3), ("c/1", None, 1)]


def test_a_definition_is_written_as_the_catalog_file_reads_it(tmp_path: Path) -> None:
    config = parse_config({"catalog": {"types": [V10]}})
    from gateway.config.catalog import CatalogType  # noqa: PLC0415  the model the portal writes

    tricky = CatalogType.model_validate({**V11, "description": 'quotes " and \\ and\nnew lines, ünïcode'})
    path = tmp_path / "portal.toml"
    path.write_text("[[types]]\n" + definition_toml(tricky).split("\n", 1)[1], encoding="utf-8")
    reread = parse_config({"catalog": {"types": [V10], "files": [str(path)]}}).catalog.all_types
    assert reread[1] == tricky
    assert config.catalog.all_types[0].name == TEMPERATURE


def test_search_by_name_field_topic_and_producer() -> None:
    config = parse_config({"catalog": {"types": [V10, V11], "applications": APPS[2:]}})
    catalog = Catalog(TopicTemplate(), config.catalog.all_types)
    records = type_records(catalog, config.catalog, [], [])

    def keys(query: str) -> list[str]:
        return [r.event_type.key for r in search(records, query)]

    assert keys("field:accuracy") == [f"{TEMPERATURE}@1.1"]
    assert keys("name:temperature field:accuracy") == [f"{TEMPERATURE}@1.1"]
    assert keys("topic:telemetry/valid/1.1/s1/environment/env-1/temperature") == [f"{TEMPERATURE}@1.1"]
    assert keys("topic:alert/cleared") == ["io.iotgw.alert.cleared.v1@1.0"]
    assert keys("producer:sensors") == [f"{TEMPERATURE}@1.0", f"{TEMPERATURE}@1.1"]
    assert keys('"air temperature with"') == [f"{TEMPERATURE}@1.1"]
    assert keys("no-such-thing") == []
    assert len(keys("")) == len(catalog.types)


# -- the API ----------------------------------------------------------------------------------------------


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = parse_config({
        "site": "s1", "gateway_id": "gw-p", "storage": {"data_dir": str(tmp_path / "data")},
        "broker": {"port": free_port(), "allow_anonymous": True}, "pipeline": {"max_latency_s": 0.05},
        "http": {"enabled": True, "port": 0}, "catalog": _settings(tmp_path / "portal.toml"),
    })
    async with Gateway(config) as gw:
        yield gw


def _post(base: str, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="POST",  # noqa: S310 (loopback)
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def test_define_a_version_through_the_api(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.http is not None
    base = gateway.http.url.rstrip("/")
    portal_file = tmp_path / "portal.toml"

    status, refused = await asyncio.to_thread(_post, base, "/api/v1/portal/types", BROKEN_V11)
    assert status == 422
    assert refused["errors"] == [{"field": "fields.battery.required", "message": (
        "field 'battery' is new and required; a minor version adds optional fields only (required = false), or "
        "declare a new major version")}]
    status, refused = await asyncio.to_thread(_post, base, "/api/v1/portal/types", {**V11, "version": "one"})
    assert status == 422
    assert [e["field"] for e in refused["errors"]] == ["version"]
    assert not portal_file.exists()  # nothing refused is written

    status, defined = await asyncio.to_thread(_post, base, "/api/v1/portal/types", V11)
    assert status == 201, defined
    assert defined == {"key": f"{TEMPERATURE}@1.1", "type": TEMPERATURE, "version": "1.1", "file": str(portal_file)}
    assert 'version = "1.1"' in portal_file.read_text(encoding="utf-8")
    assert gateway.catalog.get(f"{TEMPERATURE}@1.1") is not None  # applied: the running catalog has it

    types = (await asyncio.to_thread(get, base + "/api/v1/portal/types?q=name:temperature")).json()
    [group] = [g for g in types["types"] if g["name"] == TEMPERATURE]
    assert [v["version"] for v in group["versions"]] == ["1.0", "1.1"]
    assert group["versions"][1]["source"] == str(portal_file)
    assert group["steps"] == [{"before": "1.0", "after": "1.1", "compatible": True, "changes": [
        {"field": "accuracy", "kind": "added", "before": None, "after": "number? [°C] 0.."}]}]
    # defined twice: refused, naming the version
    status, refused = await asyncio.to_thread(_post, base, "/api/v1/portal/types", V11)
    assert (status, refused["errors"][0]["field"]) == (422, "version")
    catalog = (await asyncio.to_thread(get, base + "/api/v1/catalog")).json()
    assert f"{TEMPERATURE}" in {t["type"] for t in catalog["types"]}
    assert sum(1 for t in catalog["types"] if t["type"] == TEMPERATURE) == 2


async def test_forged_definitions_are_refused_and_change_nothing(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.http is not None
    port = gateway.http.port
    own = f"127.0.0.1:{port}"
    body = json.dumps(V11).encode()
    cases = [
        ({"Host": own, "Origin": "http://evil.example", "Content-Type": "application/json"}, 403),
        ({"Host": f"evil.example:{port}", "Content-Type": "application/json"}, 421),  # DNS rebinding
        ({"Host": own, "Content-Type": "text/plain"}, 415),  # what a form of another site can send
        ({"Host": own, "Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Host": own, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, 403),
    ]
    for headers, expected in cases:
        status, _, answer = await asyncio.to_thread(_raw, port, "POST", "/api/v1/portal/types", headers, body)
        assert status == expected, (headers, answer)
    assert not (tmp_path / "portal.toml").exists()
    assert gateway.catalog.get(f"{TEMPERATURE}@1.1") is None
    status, _, _ = await asyncio.to_thread(_raw, port, "POST", "/api/v1/portal/types", {
        "Host": own, "Origin": f"http://{own}", "Content-Type": "application/json"}, body)
    assert status == 201  # the dashboard's own page may


async def test_subscription_tester_and_applications_beside_traffic(gateway: Gateway) -> None:
    assert gateway.http is not None
    base = gateway.http.url.rstrip("/")
    broker = f"mqtt://127.0.0.1:{gateway.broker.port}"
    hvac = await asyncio.to_thread(MqttCollector, broker, ["telemetry/valid/+/s1/environment/#"],
                                   client_id="hvac-controller")
    spy = await asyncio.to_thread(MqttCollector, broker, ["telemetry/valid/+/s1/meter/#"], client_id="spy")
    try:
        await asyncio.to_thread(mqtt_publish, broker, [
            ("telemetry/raw/1.0/s1/environment/env-1/temperature", json.dumps({"value": 21.5})),
            ("telemetry/raw/1.0/s1/meter/m-1/power", json.dumps({"value": 5})),
        ], client_id="env-1")
        await asyncio.to_thread(hvac.wait_for, 1, 10)

        def applications() -> dict[str, Any]:
            return dict((get(base + "/api/v1/portal/applications")).json())

        for _ in range(100):  # learned traffic is written every flush_interval_s
            apps = await asyncio.to_thread(applications)
            hvac_app = next(a for a in apps["applications"] if a["name"] == "hvac")
            if hvac_app["events"][0]["seen"] and apps["undeclared"]:
                break
            await asyncio.sleep(0.2)
        test = (await asyncio.to_thread(
            get, base + "/api/v1/portal/subscriptions?filter=telemetry/valid/>&syntax=auto")).json()
        bad = await asyncio.to_thread(get, base + "/api/v1/portal/subscriptions?filter=a/%23/b")
    finally:
        hvac.close()
        spy.close()
    by_name = {a["name"]: a for a in apps["applications"]}
    assert by_name["hvac"]["events"] == [{"type": TEMPERATURE, "role": "consumes", "seen": True,
                                          "seen_by": ["mqtt:hvac-controller"]}]
    assert by_name["archive"]["events"][0]["seen"] is False  # declared, never seen
    assert by_name["sensors"]["events"][0]["seen"] is True
    undeclared = {(u["client"], u["role"], u["type"]) for u in apps["undeclared"]}
    assert ("mqtt:spy", "consumes", "io.iotgw.telemetry.reading.v1") in undeclared  # seen, declared by no one
    assert ("mqtt:env-1", "produces", "io.iotgw.telemetry.reading.v1") in undeclared  # sensors declare temperature
    assert not any(u[0].startswith(("driver:", "gateway:")) for u in undeclared)
    assert test["syntax"] == "smf"
    assert {t["type"] for t in test["types"]} >= {TEMPERATURE, HUMIDITY, "io.iotgw.telemetry.reading.v1"}
    live = {t["topic"]: t["type"] for t in test["topics"]}
    assert live["telemetry/valid/1.0/s1/environment/env-1/temperature"] == f"{TEMPERATURE}@1.0"
    assert live["telemetry/valid/1.0/s1/meter/m-1/power"] == "io.iotgw.telemetry.reading.v1@1.0"
    assert not any(topic.startswith("telemetry/raw/") for topic in live)
    assert (bad.status, bad.json()["parameter"]) == (400, "filter")

    doc = (await asyncio.to_thread(get, base + "/api/v1/catalog/asyncapi.json")).json()
    assert [a["name"] for a in doc["x-iotgw-applications"]["applications"]] == ["hvac", "archive", "sensors"]
    channel = doc["channels"][f"{TEMPERATURE}_1.0"]
    assert (channel["x-iotgw-declared-producers"], channel["x-iotgw-declared-consumers"]) == (["sensors"], ["hvac"])


# -- the dashboard, in a headless Chromium ------------------------------------------------------------


def _config_toml(tmp_path: Path) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(f"""site = "s1"
gateway_id = "gw-portal"
[broker]
port = {free_port()}
allow_anonymous = true
[storage]
data_dir = "{tmp_path / 'data'}"
[pipeline]
max_latency_s = 0.05
[http]
enabled = true
port = 0
[catalog]
portal_file = "{tmp_path / 'portal.toml'}"
flush_interval_s = 0.5
[[catalog.types]]
name = "{TEMPERATURE}"
version = "1.0"
metric = "temperature"
device_classes = ["environment"]
description = "air temperature"
value = {{ unit = "°C", minimum = -40, maximum = 85 }}
[[catalog.types]]
name = "{HUMIDITY}"
version = "1.0"
metric = "humidity"
device_classes = ["environment"]
value = {{ unit = "%", minimum = 0, maximum = 100 }}
[[catalog.applications]]
name = "hvac"
owner = "facilities"
clients = ["mqtt:hvac-controller"]
consumes = ["{TEMPERATURE}"]
[[catalog.applications]]
name = "archive"
clients = ["mqtt:archiver"]
consumes = ["{HUMIDITY}"]
""", encoding="utf-8")
    return path


PORTAL_STATE = """(() => document.readyState !== 'complete' || !document.getElementById('define-result') ?
  {groups: 0, query: '', names: [], result: '', resultText: '', catalog: [], apps: 0, subTypes: 0, subTopics: []} : ({
  groups: Number(document.getElementById('portal-types').dataset.groups || 0),
  query: document.getElementById('portal-types').dataset.query || '',
  names: [...document.querySelectorAll('#portal-types details')].map(d => d.dataset.typeGroup),
  result: document.getElementById('define-result').dataset.key || '',
  resultText: document.getElementById('define-result').textContent,
  catalog: [...document.querySelectorAll('#catalog details')].map(d => d.dataset.type),
  apps: Number(document.getElementById('portal-apps').dataset.apps || 0),
  subTypes: Number(document.getElementById('sub-result').dataset.types || 0),
  subTopics: [...document.querySelectorAll('#sub-result [data-match-topic]')].map(e => e.dataset.matchTopic),
}))()"""


SCREENSHOTS: dict[str, str] = {}


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                    "(./scripts/test installs it)")
async def test_the_portal_in_a_browser(tmp_path: Path, browser: DevTools) -> None:  # noqa: F811  (the fixture)
    SCREENSHOTS["dir"] = str(tmp_path)
    config_path = _config_toml(tmp_path)
    async with Gateway(load_config(config_path)) as gw:
        assert gw.http is not None
        base = gw.http.url.rstrip("/")
        broker = f"mqtt://127.0.0.1:{gw.broker.port}"
        hvac = await asyncio.to_thread(MqttCollector, broker, ["telemetry/valid/+/s1/environment/#"],
                                       client_id="hvac-controller")
        try:
            await asyncio.to_thread(mqtt_publish, broker, [
                ("telemetry/raw/1.0/s1/environment/env-1/temperature", json.dumps({"value": 21.5, "seq": i}))
                for i in range(1, 4)], client_id="env-1")
            await asyncio.to_thread(hvac.wait_for, 3, 10)
            await asyncio.sleep(1.2)  # learned traffic reaches catalog.db
            await _browse_the_portal(browser, base)
        finally:
            hvac.close()
    # the definition is in the catalog file, so the CLI's AsyncAPI document has it too
    done = iotgw("catalog", "--config", str(config_path), "--format", "asyncapi")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert f"{TEMPERATURE}_1.1" in document["channels"]
    assert "accuracy" in json.dumps(document["components"]["schemas"])
    assert [a["name"] for a in document["x-iotgw-applications"]["applications"]] == ["hvac", "archive"]
    assert "battery" not in (tmp_path / "portal.toml").read_text(encoding="utf-8")  # the refused one is not there


async def _browse_the_portal(page: DevTools, base: str) -> None:
    await page.call("Page.enable")
    await page.call("Page.navigate", url=base + "/")

    async def until(ok: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        state: dict[str, Any] = await page.value_when(PORTAL_STATE, ok, what, timeout=timeout, interval=0.3)
        return state

    async def search(query: str) -> dict[str, Any]:
        await page.evaluate(f"(() => {{ const q = document.getElementById('portal-q');"
                               f" q.value = {json.dumps(query)}; q.dispatchEvent(new Event('input')); }})()")
        return await until(lambda s: s["query"] == query, f"the search {query!r}")

    first = await until(lambda s: s["groups"] > 0 and s["apps"] == 2, "the portal to load")
    assert TEMPERATURE in first["names"]
    assert (await search("field:accuracy"))["groups"] == 0  # no version has it yet
    found = await search("producer:mqtt:env-1")  # learned from traffic
    assert TEMPERATURE in found["names"]

    # define 1.1 through the form: prefilled from 1.0, one optional field added
    await page.evaluate(f"document.querySelector('[data-new-version=\"{TEMPERATURE}\"]').click()")
    assert await page.evaluate("document.getElementById('d-version').value") == "1.1"
    await page.evaluate(_ADD_FIELD % {"name": "accuracy", "unit": "°C", "minimum": "0", "required": "false"})
    await page.evaluate("document.querySelector('#define-form button[type=submit]').click()")
    defined = await until(lambda s: s["result"] == f"{TEMPERATURE}@1.1", "the definition to be applied")
    assert "applied" in defined["resultText"]
    after = await until(lambda s: s["catalog"].count(TEMPERATURE) == 2, "the catalog to list both versions")
    assert after["catalog"].count(TEMPERATURE) == 2
    added = await page.evaluate(
        f"(() => {{ const g = document.querySelector('details[data-type-group=\"{TEMPERATURE}\"]');"
        " const cell = g.querySelector('tr[data-field-name=\"accuracy\"] td[data-version=\"1.1\"]');"
        " return [cell.className, cell.textContent, g.querySelector('[data-step=\"1.0>1.1\"]').textContent]; })()")
    assert added[0] == "added"
    assert added[1] == "number? [°C] 0.."
    assert "+ accuracy" in added[2]
    assert TEMPERATURE in (await search("field:accuracy"))["names"]

    # a version that breaks the major: refused, the error next to the field at fault
    await page.evaluate(f"document.querySelector('[data-new-version=\"{TEMPERATURE}\"]').click()")
    assert await page.evaluate("document.getElementById('d-version').value") == "1.2"
    await page.evaluate(_ADD_FIELD % {"name": "battery", "unit": "%", "minimum": "", "required": "true"})
    await page.evaluate("document.querySelector('#define-form button[type=submit]').click()")
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        error = await page.evaluate(
            "(() => { const row = [...document.querySelectorAll('#d-field-rows .field-row')]"
            ".find(r => r.querySelector('[data-attr=name]').value === 'battery');"
            " const span = row.querySelector('[data-attr-error=required]');"
            " return [span.textContent, row.querySelector('[data-attr=required]').getAttribute('aria-invalid'),"
            " span.previousElementSibling.dataset.attr]; })()")
        if error[0]:
            break
        assert asyncio.get_running_loop().time() < deadline, "no error next to the field"
        await asyncio.sleep(0.3)
    assert "is new and required" in error[0]
    assert error[1] == "true"  # the input is marked invalid
    assert error[2] == "required"  # the message sits right after the checkbox it is about
    assert "Not defined" in (await page.evaluate(PORTAL_STATE))["resultText"]

    # the subscription tester: types and live topics of a filter
    await page.evaluate("document.getElementById('sub-filter').value = 'telemetry/valid/+/+/environment/#';"
                           "document.querySelector('#sub-form button').click()")
    tested = await until(lambda s: s["subTypes"] > 0, "the subscription test")
    assert "telemetry/valid/1.0/s1/environment/env-1/temperature" in tested["subTopics"]
    apps = await page.evaluate(
        "[...document.querySelectorAll('#portal-apps [data-app-event]')].map(e => [e.dataset.appEvent, e.textContent])")
    assert [f"hvac/consumes/{TEMPERATURE}", f"{TEMPERATURE}seen"] in apps
    assert [f"archive/consumes/{HUMIDITY}", f"{HUMIDITY}declared, never seen"] in apps
    undeclared = await page.evaluate("[...document.querySelectorAll('#portal-apps [data-undeclared]')]"
                                        ".map(e => e.dataset.undeclared)")
    assert f"mqtt:env-1/produces/{TEMPERATURE}" in undeclared  # seen producing, declared by no application
    await page.evaluate("document.getElementById('portal').scrollIntoView()")
    shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    Path(SCREENSHOTS.get("dir", ".")).joinpath("portal.png").write_bytes(base64.b64decode(shot["data"]))


_ADD_FIELD = """(() => {
  document.getElementById('d-add-field').click();
  const rows = document.querySelectorAll('#d-field-rows .field-row');
  const row = rows[rows.length - 1];
  const set = (attr, value) => { row.querySelector(`[data-attr="${attr}"]`).value = value; };
  set('name', '%(name)s'); set('type', 'number'); set('unit', '%(unit)s'); set('minimum', '%(minimum)s');
  row.querySelector('[data-attr="required"]').checked = %(required)s;
})()"""


def test_asyncapi_with_applications_is_still_valid_asyncapi_3(
    asyncapi_schema: Draft7Validator,  # noqa: F811  (the fixture)
) -> None:
    config = parse_config({"catalog": {"types": [V10, V11], "applications": APPS[:1] + APPS[2:]}})
    catalog = Catalog(TopicTemplate(), config.catalog.all_types)
    learned = [Producer(f"{TEMPERATURE}@1.1", "mqtt:env-1", 1, 2, 3)]
    document = with_applications(asyncapi_document(catalog, host="127.0.0.1", port=1883, site="s1"),
                                 config.catalog, catalog, learned, [])
    assert_valid_asyncapi(asyncapi_schema, document)
    apps = document["x-iotgw-applications"]
    assert [(e["type"], e["seen"]) for a in apps["applications"] for e in a["events"]] == [
        (TEMPERATURE, False), (TEMPERATURE, True)]
    assert document["channels"][f"{TEMPERATURE}_1.1"]["x-iotgw-declared-producers"] == ["sensors"]
