"""The dashboard in a real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol
(a websocket, with aiohttp), against ``iotgw demo``: the charts show points from the store, the device
list and the event catalog are filled. A screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import wait_for
from http_helpers import DemoWithHttp, get

from pipeline.store import StoreReader

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(./scripts/test installs it)")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoWithHttp]:
    running = DemoWithHttp(tmp_path / "data", min_points=5)
    yield running
    rc, _, err = running.stop()
    assert rc == 0, err


class DevTools:
    """One page of a headless Chromium, over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), 60)
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def value_when(self, expression: str, ok: Callable[[Any], object], what: str, *, timeout: float,
                         interval: float = 0.5) -> Any:
        """Evaluate ``expression`` until ``ok`` holds for its value, and return that value; fail naming
        ``what`` and the last value (the page's state) after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if ok(value):
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page state: {json.dumps(value)}")
            await asyncio.sleep(interval)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[DevTools]:
    profile = tmp_path / "chromium-profile"
    proc = await asyncio.create_subprocess_exec(
        *[CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--window-size=1280,1800",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
         "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        await asyncio.to_thread(wait_for, lambda: active.exists() and active.read_text().count("\n") >= 1, 60,
                                "Chromium's DevTools port")
        port = int(active.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as ws:
                yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


STATE = """(() => !document.getElementById('status') ? {rendered: 0, devices: [], charts: {}, catalog: [], status: ""}
: ({
  rendered: Number(document.body.dataset.rendered || 0),
  devices: [...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device),
  charts: Object.fromEntries([...document.querySelectorAll('svg.chart')].map(s => [s.dataset.series,
    {points: Number(s.dataset.points), drawn: s.querySelector('polyline') ?
      s.querySelector('polyline').getAttribute('points').trim().split(/\\s+/).length : 0}])),
  catalog: [...document.querySelectorAll('#catalog details')].map(d => d.dataset.type),
  status: document.getElementById('status').textContent,
}))()"""


async def test_dashboard_shows_live_charts_devices_and_catalog(demo: DemoWithHttp, browser: DevTools,
                                                               tmp_path: Path) -> None:
    await browser.call("Page.enable")
    await browser.call("Page.navigate", url=demo.base + "/")

    def series_in_store() -> set[str]:
        with StoreReader(demo.data_dir) as store:
            return {f"{d.device_id}/{m}" for d in store.devices() for m in d.metrics}

    expected = series_in_store()
    assert len(expected) >= 7  # pm-1: pm2_5 pm10; t-1: temperature humidity battery; co2-1: co2 temperature

    async def state_when(ok: Any, what: str, timeout: float = 90) -> dict[str, Any]:
        state: dict[str, Any] = await browser.value_when(STATE, ok, what, timeout=timeout)
        return state

    first = await state_when(
        lambda s: s["rendered"] >= 1 and expected <= set(s["charts"])
        and all(c["points"] > 0 for c in s["charts"].values()),
        "every stored series to be charted with points",
    )
    assert set(first["devices"]) == {"pm-1", "t-1", "co2-1"}
    assert first["status"].startswith("ready")
    for key, chart in first["charts"].items():
        assert chart["drawn"] == chart["points"], key  # every point in data-points is on the line

    # The points are the store's: the chart of t-1/temperature has the API's buckets for that window
    from_to = await browser.evaluate("JSON.stringify(windowNow())")
    start, end = json.loads(from_to)
    with StoreReader(demo.data_dir) as store:
        found = store.series("t-1", "temperature", int(start), int(end))
    assert found is not None
    assert len(found[1]) >= first["charts"]["t-1/temperature"]["points"] > 0
    # The window fits the demo's young store: all of its data, not a sliver at the right of 15 minutes
    with StoreReader(demo.data_dir) as store:
        first_seen = min(d.first_seen_ms for d in store.devices())
    assert start <= first_seen
    assert 10_000 <= end - start < 0.25 * 15 * 60_000
    # from just before the first reading (5 % of the data's age), or 10 s while the data is younger
    assert start == pytest.approx(end - max(10_000, 1.05 * (end - first_seen)), abs=2)

    # Live: later polls add points as the simulated devices keep sending
    before = first["charts"]["t-1/temperature"]["points"]
    await state_when(lambda s: s["charts"]["t-1/temperature"]["points"] > before, "the chart to grow")

    catalog = (await browser.evaluate(STATE))["catalog"]
    assert "io.iotgw.telemetry.reading.v1" in catalog
    assert len(catalog) == len(get(demo.base + "/api/v1/catalog").json()["types"])

    shot = await browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    path = tmp_path / "dashboard.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000
    print(f"dashboard screenshot: {path}")

    # Drag across a chart: the window becomes that span (no longer live) and the charts re-query it
    await browser.evaluate("document.querySelector('svg[data-series=\"t-1/temperature\"]').scrollIntoView()")
    box = await browser.evaluate("(() => { const r = document.querySelector('svg[data-series=\"t-1/temperature\"]')"
                                 ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
    left, top, width, height = box
    y = top + height / 2
    fitted = await browser.evaluate("(() => { const [f, t] = windowNow(); return t - f; })()")
    await browser.call("Input.dispatchMouseEvent", type="mousePressed", x=left + width * 0.5, y=y, button="left",
                       clickCount=1)
    await browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=left + width * 0.95, y=y, button="left")
    await browser.call("Input.dispatchMouseEvent", type="mouseReleased", x=left + width * 0.95, y=y, button="left",
                       clickCount=1)
    live, span_ms = await browser.evaluate("[state.live, state.span]")
    assert live is False
    assert 0.3 * fitted < span_ms < 0.6 * fitted  # about the right half of the fitted window
    label = "document.getElementById('range-label').textContent"
    deadline = asyncio.get_running_loop().time() + 30
    while (await browser.evaluate(label)).startswith("live"):  # the charts re-query the dragged span
        assert asyncio.get_running_loop().time() < deadline, "the range label still says live"
        await asyncio.sleep(0.25)

    # Zoom: the 7-day button re-queries with coarser buckets; the chart still shows the stored data
    await browser.evaluate("document.querySelector('[data-range=\"7d\"]').click()")
    bucket_s, zoomed = await _wait_bucket(browser, "t-1/temperature", lambda b: b >= 600)
    assert zoomed > 0
    assert bucket_s >= 600  # 7 days over a few hundred points: coarser than the 15-minute view's 1-2 s



async def _wait_bucket(browser: DevTools, series: str, ok: Any, timeout: float = 60) -> tuple[float, int]:
    """Wait until the chart of ``series`` shows a bucket size (seconds, from its caption) that is ``ok``."""
    expression = (f"(() => {{ const s = document.querySelector('svg[data-series=\"{series}\"]');"
                  " return [s.closest('figure').querySelector('.meta').textContent, Number(s.dataset.points)]; })()")

    def bucket(meta: str) -> float | None:
        match = re.search(r"per ([0-9.]+) s", meta)
        return float(match[1]) if match else None

    def shown(value: list[Any]) -> bool:
        size = bucket(value[0])
        return size is not None and bool(ok(size))

    meta, points = await browser.value_when(expression, shown, f"the bucket of {series}", timeout=timeout)
    size = bucket(meta)
    assert size is not None
    return size, int(points)
