"""The HTTP API against DNS rebinding, cross-site requests and CSV formula injection, over real sockets.

A rebinding page reaches the loopback API under a name of the attacker's (``Host: evil.example``);
a cross-site page can POST with the browser (``Origin: http://evil.example``). Both are forged here
with raw HTTP requests to a gateway listening on loopback without a token.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port
from peers import mqtt_publish

from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.http.api import spreadsheet_safe
from gateway.http.guard import cross_site_refusal, host_allowed


@pytest.mark.parametrize(("value", "safe"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"),
    ("\rx", "'\rx"),
    ("-12.5", "-12.5"),  # a negative reading stays a number
    ("+3", "+3"),
    ("-1e-3", "-1e-3"),
    ("pm-1", "pm-1"),
    (-4.0, -4.0),
    ("", ""),
], ids=["equals", "plus", "minus-formula", "at", "tab", "cr", "negative", "plus-number", "exponent", "text",
        "float", "empty"])
def test_csv_cells_are_neutralised_but_numbers_stay_numbers(value: object, safe: object) -> None:
    assert spreadsheet_safe(value) == safe


ALL = "0.0.0.0"  # noqa: S104  (a bind address compared, nothing bound)


@pytest.mark.parametrize(("host", "bound", "allowed", "ok"), [
    ("127.0.0.1:8080", "127.0.0.1", [], True),
    ("localhost:8080", "127.0.0.1", [], True),
    ("LOCALHOST.:8080", "127.0.0.1", [], True),
    ("[::1]:8080", "127.0.0.1", [], True),
    ("evil.example:8080", "127.0.0.1", [], False),  # DNS rebinding
    ("127.0.0.1:9999", "127.0.0.1", [], False),
    ("127.0.0.1", "127.0.0.1", [], False),  # no port: 80
    ("192.168.1.20:8080", ALL, [], True),  # bound to every address: any address of the machine
    ("gw.factory.example:8080", ALL, [], False),
    ("gw.factory.example:8443", ALL, ["gw.factory.example"], True),  # a reverse proxy's name
    ("gw.factory.example:8443", ALL, ["gw.factory.example:443"], False),
    ("", "127.0.0.1", [], False),
    ("a b:8080", "127.0.0.1", [], False),
], ids=["address", "localhost", "localhost-dot", "v6-loopback", "rebinding", "other-port", "no-port",
        "wildcard-ip", "wildcard-name", "allowed-name", "allowed-other-port", "empty", "garbage"])
def test_which_hosts_the_api_serves(host: str, bound: str, allowed: list[str], ok: bool) -> None:
    assert host_allowed(host, bound=bound, port=8080, allowed=allowed) is ok


def test_cross_site_requests_are_told_apart() -> None:
    assert cross_site_refusal(None, None, "127.0.0.1:8080") is None  # curl
    assert cross_site_refusal("http://127.0.0.1:8080", "same-origin", "127.0.0.1:8080") is None
    assert cross_site_refusal("http://evil.example", "cross-site", "127.0.0.1:8080") is not None
    assert cross_site_refusal("null", None, "127.0.0.1:8080") is not None  # a sandboxed frame, a file
    assert cross_site_refusal("http://localhost:8080", None, "127.0.0.1:8080") is not None  # another origin
    assert cross_site_refusal(None, "cross-site", "127.0.0.1:8080") is not None


def test_allowed_hosts_are_names_not_urls() -> None:
    with pytest.raises(ConfigError, match="allowed_hosts"):
        parse_config({"http": {"allowed_hosts": ["http://gw.example/"]}})
    assert parse_config({"http": {"allowed_hosts": ["GW.example.", "[fe80::1]:8080"]}}).http.allowed_hosts == [
        "gw.example", "[fe80::1]:8080"]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = parse_config({
        "site": "s1", "storage": {"data_dir": str(tmp_path)}, "pipeline": {"max_latency_s": 0.05},
        "broker": {"port": free_port(), "allow_anonymous": True},
        "http": {"enabled": True, "port": 0, "allowed_hosts": ["dashboard.factory.example"]},
    })
    async with Gateway(config) as gw:
        yield gw


def _raw(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (``Host`` included), as a browser would send it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


async def test_a_rebinding_host_is_refused(gateway: Gateway) -> None:
    assert gateway.http is not None
    port = gateway.http.port
    for path in ("/api/v1/devices", "/api/v1/stats", "/api/v1/catalog", "/", "/metrics"):
        status, headers, body = await asyncio.to_thread(_raw, port, "GET", path, {"Host": f"evil.example:{port}"})
        assert status == 421, path
        assert headers["content-type"].startswith("application/problem+json")
        assert json.loads(body)["status"] == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "dashboard.factory.example"):
        status, _, _ = await asyncio.to_thread(_raw, port, "GET", "/api/v1/stats", {"Host": host})
        assert status == 200, host
    status, _, _ = await asyncio.to_thread(_raw, port, "GET", "/healthz", {"Host": "evil.example"})
    assert status == 200  # liveness probes stay open: it says nothing


async def test_a_cross_origin_post_is_refused(gateway: Gateway) -> None:
    assert gateway.http is not None
    port = gateway.http.port
    own = f"127.0.0.1:{port}"
    forged = {"Host": own, "Origin": "http://evil.example", "Content-Type": "text/plain",
              "Sec-Fetch-Site": "cross-site"}
    status, _, body = await asyncio.to_thread(_raw, port, "POST", "/api/v1/stats", forged, b"{}")
    assert status == 403
    assert "another origin" in json.loads(body)["detail"]
    # the same request from the API's own page passes the check (and meets the route: GET only)
    same = {"Host": own, "Origin": f"http://{own}", "Content-Type": "application/json"}
    status, _, _ = await asyncio.to_thread(_raw, port, "POST", "/api/v1/stats", same, b"{}")
    assert status == 405


async def test_csv_answers_neutralise_formulas(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.http is not None
    port = gateway.http.port
    await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gateway.broker.port}", [
        ("telemetry/raw/1.0/s1/meter/=cmd@evil/power", json.dumps({"value": -3.5, "seq": 1})),
    ])

    own = {"Host": f"127.0.0.1:{port}"}

    async def stored() -> list[dict[str, str]]:
        _, _, body = await asyncio.to_thread(_raw, port, "GET", "/api/v1/latest?format=csv", own)
        return list(csv.DictReader(io.StringIO(body.decode())))

    for _ in range(100):
        rows = await stored()
        if rows:
            break
        await asyncio.sleep(0.1)
    assert [(r["device_id"], r["value"]) for r in rows] == [("'=cmd@evil", "-3.5")]
    _, _, body = await asyncio.to_thread(_raw, port, "GET", "/api/v1/devices?format=csv", own)
    assert next(csv.DictReader(io.StringIO(body.decode())))["device_id"] == "'=cmd@evil"
