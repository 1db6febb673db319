"""Configuration: the sample loads, defaults are complete, and every problem is reported as one
``field.path: reason`` line by ``iotgw check-config`` (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, iotgw

from gateway.config import GatewayConfig, load_config, parse_config
from gateway.errors import ConfigError

SAMPLE = ROOT / "gateway" / "sample-config.toml"


def test_sample_config_loads_with_every_transport() -> None:
    config = load_config(SAMPLE)
    assert {d.transport for d in config.devices} == {"serial", "ble", "mqtt"}
    assert config.site == "factory-a"


def test_empty_config_is_the_embedded_default() -> None:
    config = parse_config({})
    assert config == GatewayConfig()
    assert (config.broker.host, config.broker.port) == ("127.0.0.1", 1883)
    assert config.storage.data_dir == Path("iotgw-data")


def test_check_config_accepts_the_sample() -> None:
    result = iotgw("check-config", str(SAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"valid ({len(load_config(SAMPLE).devices)} device(s))" in result.stdout


BAD = [
    pytest.param("[broker]\nport = 70000\n", ["broker.port: Input should be less than or equal to 65535"], id="port"),
    pytest.param("[broker]\nprot = 1\n", ["broker.prot: unknown field"], id="typo"),
    pytest.param(
        '[[devices]]\nid = "a"\ntransport = "serial"\nport = "/dev/x"\nprotocol = "sds011"\n'
        '[[devices]]\nid = "b"\ntransport = "serial"\nport = "/dev/y"\nprotocol = "sds011"\nbaudrate = 9601\n',
        ["devices[1].baudrate: must be one of 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400"],
        id="baudrate",
    ),
    pytest.param('[[devices]]\nid = "a"\ntransport = "zigbee"\n',
                 ["devices[0]: must be one of serial, ble, mqtt"], id="transport"),
    pytest.param('[[devices]]\nid = "a"\n', ["devices[0]: missing transport (one of serial, ble, mqtt)"],
                 id="no-transport"),
    pytest.param('[[devices]]\nid = "t"\ntransport = "ble"\nprotocol = "bthome"\naddress = "nope"\n',
                 ["devices[0].address: must be a MAC address like A4:C1:38:00:00:01"], id="mac"),
    pytest.param('[[devices]]\nid = "t/1"\ntransport = "mqtt"\n',
                 ["devices[0].id: must be letters, digits, '_', '-' or '.' (it becomes a topic level)"],
                 id="id-level"),
    pytest.param('[[devices]]\nid = "a"\ntransport = "mqtt"\n[[devices]]\nid = "a"\ntransport = "mqtt"\n',
                 ["(root): device id 'a' is configured twice"], id="duplicate-id"),
    pytest.param('[topics]\ntemplate = "telemetry/{site}/{metric}"\n', ["topics.template: "], id="template"),
    pytest.param("[pipeline.clean.metrics]\nco2 = { min = 5, max = 1 }\n",
                 ["pipeline.clean.metrics.co2: min must not exceed max"], id="range"),
    pytest.param("[pipeline.clean.metrics]\nco2 = { max_rate_per_s = 0 }\n",
                 ["pipeline.clean.metrics.co2.max_rate_per_s: Input should be greater than 0"], id="rate"),
    pytest.param("[pipeline.clean.units.environment]\ntemperature = \"furlongs\"\n",
                 ["pipeline.clean.units.environment.temperature: unknown unit 'furlongs'; known: "], id="unit"),
    pytest.param("[pipeline.clean]\nclock_policy = \"ignore\"\n",
                 ["pipeline.clean.clock_policy: Input should be 'correct' or 'reject'"], id="clock-policy"),
    pytest.param("site = [\n", ["not valid TOML"], id="toml-syntax"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_check_config_reports_each_problem_on_one_line(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == len(expected)
    for problem, want in zip(caught.value.problems, expected, strict=True):
        assert want in problem


def test_check_config_cli_exit_2_with_all_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('site = "a b"\n[broker]\nport = -1\n[[devices]]\nid = "x"\ntransport = "ble"\n')
    result = iotgw("check-config", str(path))
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert lines == [
        "site: must be letters, digits, '_', '-' or '.' (it becomes a topic level)",
        "broker.port: Input should be greater than or equal to 0",
        "devices[0].address: Field required",
        "devices[0].protocol: Field required",
    ]
    assert "Traceback" not in result.stderr


def test_run_with_invalid_config_exits_2_without_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[broker]\nport = 99999\n")
    result = iotgw("run", "--config", str(path))
    assert result.returncode == 2
    assert "broker.port:" in result.stderr


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    result = iotgw("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stdout.count("\n") == 1
    assert "cannot read" in result.stdout


def test_flags_override_the_file() -> None:
    config = load_config(SAMPLE).with_overrides(data_dir=Path("/tmp/x"), mqtt_port=2883)
    assert (config.storage.data_dir, config.broker.port) == (Path("/tmp/x"), 2883)
    assert load_config(SAMPLE).broker.port == 1883
