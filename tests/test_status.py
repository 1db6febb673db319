"""The gateway's status model (gateway/status.py): assembled from a running gateway's parts, described
by the OpenAPI document, strict about the counters it declares, and the health the watchdog reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import until
from jsonschema import Draft202012Validator
from pydantic import ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from gateway.app import Gateway
from gateway.config import parse_config
from gateway.http.openapi import openapi_document
from gateway.status import Health, PipelineStatus, StoreStatus, health


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = parse_config({"site": "s1", "broker": {"port": 0, "allow_anonymous": True},
                           "storage": {"data_dir": str(tmp_path)}, "pipeline": {"max_latency_s": 0}})
    async with Gateway(config) as gw:
        await gw.broker.publish("telemetry/raw/1.0/s1/generic/d1/temperature", b'{"value": 21.5}', origin="d1")
        await gw.broker.publish("telemetry/raw/1.0/s1/generic/d1/temperature", b'{"value": "warm"}', origin="d1")
        await until(lambda: gw.store.rows_written == 1 and gw.status().published.rejects == 1, 10, "the batch")
        yield gw


async def test_status_is_assembled_from_the_running_parts(running: Gateway) -> None:
    status = running.status()
    assert status.stages["collect"].in_ == 2
    assert status.stages["clean"].rejected == {"non_numeric": 1}
    assert (status.stored, status.store.rows_written, status.journal.appended) == (1, 1, 2)
    assert status.pipeline.running
    assert status.pipeline.batches >= 1
    assert status.broker.serving
    assert status.broker.port == running.broker.port
    assert status.queue.max == 1000
    assert status.forward.destinations == {}
    assert running.stats()["stages"]["collect"]["in"] == 2  # the JSON keeps the names /api/v1/stats always had


async def test_stats_json_validates_against_the_openapi_schema(running: Gateway) -> None:
    doc = openapi_document(secured=False)
    ok = doc["paths"]["/api/v1/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    registry: Registry[Any] = Registry().with_resource("urn:api", DRAFT202012.create_resource(doc))
    validator = Draft202012Validator({"$ref": "urn:api" + ok["$ref"]}, registry=registry)
    stats = running.stats()
    assert list(validator.iter_errors(stats)) == []
    assert list(validator.iter_errors({**stats, "stages": {"collect": {"in": "two", "out": 1, "rejected": {}}}}))


def test_a_counter_the_model_does_not_declare_is_refused() -> None:
    counts = {"rows_written": 1, "duplicates": 0, "transactions": 1, "retention_deleted": {}, "budget_deleted": {},
              "over_budget": False, "used_bytes": 0, "file_bytes": 0, "max_bytes": 1, "maintenance_passes": 0,
              "pages_released": 0}
    assert StoreStatus.model_validate(counts).rows_written == 1
    with pytest.raises(ValidationError, match="rows_stored"):  # renamed by the part: the status says so
        StoreStatus.model_validate({**{k: v for k, v in counts.items() if k != "rows_written"}, "rows_stored": 1})


async def test_health_names_each_problem(running: Gateway) -> None:
    status = running.status()
    assert health(status, stall_s=120) == Health((), health(status, stall_s=120).status)
    assert health(status, stall_s=120).status.startswith("in=2 stored=1 rejected=1 queue=0 clients=0 drivers_up=0/0")
    stuck = status.model_copy(update={"pipeline": PipelineStatus(running=True, batches=1, busy_s={"back": 300.0})})
    assert health(stuck, stall_s=120).problems == ("the pipeline has been inside one batch for 300 s",)
    assert health(stuck, stall_s=600).ok
    down = status.model_copy(update={
        "pipeline": PipelineStatus(running=False, batches=1, busy_s={}),
        "broker": status.broker.model_copy(update={"serving": False}),
    })
    assert health(down, stall_s=120).problems == ("the pipeline task is not running", "the broker is not serving")
