"""Broker authentication defaults follow Mosquitto 2: listening on loopback only without a password
file, local anonymous clients are allowed; a listener on any other address needs a password file (a
config error naming the field otherwise); with a password file, anonymous clients are refused."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Literal

import pytest
from conftest import free_port, iotgw
from test_security import NOT_AUTHORIZED, connect, passwd_file, running

from gateway.config import BrokerSettings, parse_config
from gateway.errors import ConfigError

PASSWD = Path("/etc/iotgw/passwd")  # only named: anonymous_access reads no file
ANY = "0.0.0.0"  # noqa: S104 - the address under test


@pytest.mark.parametrize(("broker", "expected"), [
    pytest.param({}, "loopback", id="loopback-without-password-file"),
    pytest.param({"host": "::1"}, "loopback", id="ipv6-loopback"),
    pytest.param({"host": "localhost"}, "loopback", id="localhost"),
    pytest.param({"listeners": [{"type": "ws", "port": 9001}]}, "loopback", id="extra-listener-inherits-loopback"),
    pytest.param({"password_file": PASSWD}, False, id="password-file-means-no-anonymous"),
    pytest.param({"host": ANY, "password_file": PASSWD}, False, id="exposed-with-password-file"),
    pytest.param({"password_file": PASSWD, "allow_anonymous": "loopback"}, "loopback", id="explicit-with-file"),
    pytest.param({"host": ANY, "allow_anonymous": True}, True, id="explicit-true"),
    pytest.param({"host": ANY, "allow_anonymous": "loopback"}, "loopback", id="explicit-loopback"),
])
def test_anonymous_access(broker: dict[str, Any], expected: bool | Literal["loopback"]) -> None:
    assert BrokerSettings(**broker).anonymous_access() == expected


@pytest.mark.parametrize(("broker", "problem"), [
    pytest.param({"host": ANY}, "broker.password_file: required when a listener binds a non-loopback "
                 "address (broker.host = '0.0.0.0')", id="host"),
    pytest.param({"listeners": [{"type": "tcp", "port": 1884}, {"type": "ws", "host": "192.168.1.20", "port": 9001}]},
                 "broker.password_file: required when a listener binds a non-loopback address "
                 "(broker.listeners[1].host = '192.168.1.20')", id="listener"),
    pytest.param({"host": "gw.example"}, "(broker.host = 'gw.example')", id="a-name-may-resolve-to-anything"),
    pytest.param({"allow_anonymous": False}, "broker.password_file: required when broker.allow_anonymous is false",
                 id="explicitly-false"),
])
def test_nobody_could_log_in(broker: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerSettings(**broker).anonymous_access()
    [line] = caught.value.problems
    assert problem in line
    assert "iotgw passwd" in line  # says how to fix it


async def test_loopback_broker_without_password_file_takes_local_anonymous_clients() -> None:
    settings = parse_config({"broker": {"port": free_port()}}).broker  # what a serial-only gateway's file says
    async with running(settings):
        client = await connect(settings.port, "local-anonymous")
        client.close()
    assert client.accepted


# amqtt 0.12.1 does not close the server side of a refused connection: its transport is garbage-collected
# unclosed (a ResourceWarning). Collected here, inside this test (as in test_fleet.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning")
async def test_password_file_refuses_anonymous_clients_by_default(tmp_path: Path) -> None:
    settings = BrokerSettings(port=free_port(), password_file=passwd_file(tmp_path / "passwd", {"alice": "pw"}))
    async with running(settings):
        client = await connect(settings.port, "anonymous")  # refused: paho has already closed its socket
    assert client.rc == NOT_AUTHORIZED
    gc.collect()


def test_serial_only_gateway_starts_without_a_password_file(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'site = "s"\n[broker]\nport = {free_port()}\n[storage]\ndata_dir = "{tmp_path / "d"}"\n'
                      '[[devices]]\nid = "pm-1"\ntransport = "serial"\nprotocol = "sds011"\n'
                      f'port = "{tmp_path / "ttyUSB0"}"\n')
    checked = iotgw("check-config", str(config))
    assert checked.returncode == 0, checked.stdout
    result = iotgw("run", "--config", str(config), "--seconds", "1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_the_brokers_share_comes_out_of_the_disk_budget() -> None:
    mib = 1024 * 1024
    default = parse_config({})
    assert (default.broker.max_queued_bytes, default.broker.max_retained_bytes) == (64 * mib, 16 * mib)
    assert default.storage.store_limits(reserved=default.broker.disk_share()).max_bytes == 1024 * mib - 80 * mib
    small = parse_config({"storage": {"max_bytes": 64 * mib}})  # the defaults shrink with the budget
    assert (small.broker.max_queued_bytes, small.broker.max_retained_bytes) == (4 * mib, 1 * mib)
    with pytest.raises(ConfigError) as caught:
        parse_config({"broker": {"max_queued_bytes": 40 * mib}, "storage": {"max_bytes": 64 * mib}})
    assert caught.value.problems == [
        f"(root): broker.max_queued_bytes + broker.max_retained_bytes ({41 * mib} bytes) come out of storage.max_bytes "
        f"({64 * mib}) and may take half of it at most: lower them or raise the budget"]
