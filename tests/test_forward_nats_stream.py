"""A NATS destination whose subjects no JetStream stream captures (a real nats-server -js): the gateway
says what is wrong and how to fix it, once, in the log, the forwarder stats and /readyz; once the
stream exists the outbox drains and the error clears."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import until
from http_helpers import get
from peers import (
    NatsServer,
    free_port,
    jetstream_messages,
    mqtt_publish,
    nats_server_fixture,  # noqa: F401  (pytest fixture)
)

from gateway.app import Gateway
from gateway.config import parse_config


async def _add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


@pytest.mark.parametrize(("stream", "says"), [
    pytest.param(None, "or set stream = 'IOTGW' and create_stream = true on this [[forward]]", id="no-stream-named"),
    pytest.param("TELEMETRY", "(stream 'TELEMETRY' does not exist or does not take it); create one (nats stream add "
                 "TELEMETRY --subjects 'telemetry.valid.>') or set stream = 'TELEMETRY' and create_stream = true",
                 id="named-stream-missing"),
])
async def test_no_stream_for_the_subjects_is_said_once_with_the_fix(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture, stream: str | None, says: str
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.forward")
    forward: dict[str, Any] = {"name": "central", "type": "nats", "url": nats_server.url,
                               "topics": ["telemetry/valid/>"]}
    if stream is not None:
        forward["stream"] = stream
    config = parse_config({
        "site": "s1", "broker": {"port": free_port()}, "storage": {"data_dir": str(tmp_path / "gw")},
        "pipeline": {"max_latency_s": 0.05}, "http": {"enabled": True, "port": 0}, "forward": [forward],
    })
    async with Gateway(config) as gw:
        def central() -> dict[str, Any]:
            stats: dict[str, Any] = gw.stats()["forward"]["destinations"]["central"]
            return stats

        await until(lambda: central()["connected"], 30, "connect")
        readings = [(gw.devices.raw_topic("m-1", "power"), f'{{"value": {i}, "unit": "W"}}'.encode()) for i in range(3)]
        await asyncio.to_thread(mqtt_publish, f"mqtt://127.0.0.1:{gw.broker.port}", readings)  # an MQTT device
        await until(lambda: central()["send_failures"] >= 4, 30, "a few attempts")
        error = central()["error"]
        assert error is not None
        assert error.startswith("no JetStream stream captures subject 'telemetry.valid.1%2E0.s1.generic.m-1.power'")
        assert says in error
        assert central()["depth"] == 3  # kept, not dropped
        logged = [r for r in caplog.records if "no JetStream stream captures" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]
        assert logged[0].levelno == logging.ERROR
        assert "nothing acknowledged" not in caplog.text
        assert gw.http is not None
        ready = await asyncio.to_thread(get, gw.http.url + "readyz")
        assert ready.status == 503
        assert ready.json()["checks"]["forward"] == f"central: {error}"

        # The operator creates the stream: what waited is delivered, the error and the 503 go away.
        await _add_stream(nats_server.url, stream or "IOTGW", ["telemetry.valid.>"])
        await until(lambda: central()["depth"] == 0, 30, "the outbox to drain")
        assert central()["error"] is None
        ready = await asyncio.to_thread(get, gw.http.url + "readyz")
        assert ready.status == 200, ready.text
        assert "forward" not in ready.json()["checks"]
        assert "sending resumed" in caplog.text
    stored = await jetstream_messages(nats_server.url, stream or "IOTGW", timeout=10)
    assert len(stored) == 3
