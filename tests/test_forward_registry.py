"""The destination registry: every ``[[forward]]`` type has one settings model, which the configuration
validates, and a factory; loading the configuration loads no client library, and gateway.forward does
not depend on gateway.config."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, get_args

import pytest

import gateway.config
from gateway.config import ForwardSettings, parse_config
from gateway.forward.registry import DESTINATIONS, FORWARD_TYPES, build_destination
from pipeline.topics import DEFAULT_TEMPLATE, TopicTemplate

CLIENT_LIBRARIES = ("paho", "nats", "aiokafka", "influxdb_client", "aiormq", "pamqp", "redis")


def test_the_forward_union_names_each_registered_model_once() -> None:
    assert FORWARD_TYPES == ("mqtt", "nats", "kafka", "influxdb", "rabbitmq", "redis")
    assert get_args(ForwardSettings) == tuple(entry.settings for entry in DESTINATIONS.values())
    for name, entry in DESTINATIONS.items():
        assert get_args(entry.settings.model_fields["type"].annotation) == (name,)
        assert entry.settings.__module__ == f"gateway.forward.{name}.settings"


FORWARDS: dict[str, dict[str, Any]] = {
    "mqtt": {"url": "mqtt://central:1883", "topics": ["telemetry/#"], "rewrite": [{"from": "a/", "to": "b/"}]},
    "nats": {"url": "nats://central:4222", "topics": ["telemetry/#"], "stream": "S"},
    "kafka": {"url": "kafka://central:9092", "topics": ["telemetry/#"]},
    "influxdb": {"url": "http://tsdb:8086", "token": "t"},
    "rabbitmq": {"url": "amqp://central:5672/", "topics": ["telemetry/#"], "subscribe": ["cmd/#"]},
    "redis": {"url": "redis://central:6379/0", "topics": ["telemetry/#"]},
}


@pytest.mark.parametrize("kind", FORWARD_TYPES)
def test_each_type_builds_its_own_destination(kind: str) -> None:
    config = parse_config({"forward": [{"name": "out", "type": kind, **FORWARDS[kind]}]})
    settings = config.forward[0]
    assert type(settings) is DESTINATIONS[kind].settings
    destination = build_destination(settings, "gw-a", TopicTemplate(DEFAULT_TEMPLATE))
    assert destination.name == "out"
    assert type(destination).__module__ == f"gateway.forward.{kind}.destination"
    assert not destination.connected


def test_every_public_config_name_resolves() -> None:
    missing = [name for name in gateway.config.__all__ if not hasattr(gateway.config, name)]
    assert missing == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(result.stdout.split())


def test_loading_the_configuration_loads_no_client_library() -> None:
    loaded = _loaded_after("from gateway.config import parse_config\nparse_config({})")
    assert {m.split(".")[0] for m in loaded} & set(CLIENT_LIBRARIES) == set()
    assert not [m for m in loaded if m.startswith("gateway.http")]


def test_gateway_forward_does_not_depend_on_gateway_config() -> None:
    loaded = _loaded_after("import gateway.forward.registry, gateway.forward.forwarder")
    assert "gateway.config" not in loaded
