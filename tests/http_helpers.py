"""Helpers for the HTTP API tests: ``iotgw demo`` with its dashboard on a free port, and a small client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from conftest import GatewayProcess, free_port, wait_for


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def get(url: str, token: str | None = None, timeout: float = 30) -> Answer:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http to loopback)
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        with exc:  # it holds the connection
            return Answer(exc.code, exc.headers, exc.read())


class DemoWithHttp:
    """``iotgw demo`` in a subprocess with the HTTP API on a free port; waits until every simulated
    device has stored readings of each of its metrics (at least ``min_points`` each)."""

    def __init__(self, data_dir: Path, *, min_points: int = 5) -> None:
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.data_dir = data_dir
        self.gw = GatewayProcess(["demo", "--data-dir", str(data_dir), "--mqtt-port", str(self.mqtt_port),
                                  "--http-port", str(self.http_port)], self.mqtt_port)
        self.base = f"http://127.0.0.1:{self.http_port}"
        wait_for(lambda: self._ok("/healthz"), 30, "the HTTP API to answer")

        def filled() -> bool:
            devices = get(self.base + "/api/v1/devices").json()
            if len(devices) < 3:
                return False
            for d in devices:
                for metric in d["metrics"]:
                    series = get(f"{self.base}/api/v1/series?device={d['device_id']}&metric={metric}").json()
                    if len(series["points"]) < min_points:
                        return False
            return True

        wait_for(filled, 90, f"{min_points} stored points of every series of the three demo devices")

    def _ok(self, path: str) -> bool:
        try:
            return get(self.base + path, timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> tuple[int, str, str]:
        return self.gw.stop()
