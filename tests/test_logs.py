"""Logs: journald priorities, JSON lines, and secrets that never reach them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import iotgw

from gateway.config import parse_config
from gateway.ops.logs import REDACTED, _redactor, redact, secret_values, setup_logging

SECRET = "s3cr3t-backbone-pass"  # noqa: S105 (a test value)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, secrets = list(root.handlers), root.level, _redactor.secrets
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    _redactor.secrets = secrets


def config_with_secret() -> dict[str, object]:
    return {"forward": [{"name": "central", "type": "mqtt", "url": "mqtt://127.0.0.1:1", "topics": ["#"],
                         "username": "gw", "password": SECRET}]}


def test_secret_values_finds_nested_secrets() -> None:
    assert secret_values(parse_config(config_with_secret())) == [SECRET]


def test_secrets_are_redacted_in_messages_args_and_tracebacks(
    restore_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging(fmt="text")
    redact([SECRET, "ab"])  # too short to redact: left alone
    log = logging.getLogger("iotgw.test")
    log.warning("connecting with %s", SECRET)
    try:
        raise ValueError(f"login refused for password {SECRET}")
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert SECRET not in err
    assert err.count(REDACTED) == 2
    assert "WARNING iotgw.test: connecting with ***" in err


def test_journald_priorities_and_json_lines(
    restore_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    setup_logging(fmt="text")
    logging.getLogger("iotgw.x").warning("outbox full")
    logging.getLogger("iotgw.x").error("two\nlines")
    assert capsys.readouterr().err.splitlines() == [
        "<4>WARNING iotgw.x: outbox full", "<3>ERROR iotgw.x: two", "<3>lines",
    ]
    setup_logging(fmt="json")
    redact([SECRET])
    logging.getLogger("iotgw.x").info("token %s", SECRET)
    entry = json.loads(capsys.readouterr().err)
    assert entry["level"] == "info"
    assert entry["logger"] == "iotgw.x"
    assert entry["message"] == "token ***"
    assert entry["time"].endswith("+00:00")


def test_run_never_logs_a_configured_secret(tmp_path: Path) -> None:
    """A real `iotgw run` whose backbone refuses: the password appears nowhere in its output. To prove the
    redaction is wired in (and not merely that nothing happened to log the password), the same text is
    also part of a serial port path, which the driver does log when it cannot open the port."""
    config = tmp_path / "gw.toml"
    config.write_text(
        f'site = "s"\n[broker]\nport = 0\nallow_anonymous = true\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[logging]\nformat = "json"\n'
        f'[[devices]]\nid = "pm-1"\ntransport = "serial"\nprotocol = "sds011"\nport = "/nonexistent/{SECRET}"\n'
        f'[[forward]]\nname = "central"\ntype = "mqtt"\nurl = "mqtt://127.0.0.1:1"\ntopics = ["#"]\n'
        f'username = "gw"\npassword = "{SECRET}"\n'
    )
    result = iotgw("-v", "run", "--config", str(config), "--seconds", "2")
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines, result.stderr  # JSON lines from [logging] format
    assert any("/nonexistent/***" in line["message"] for line in lines), result.stderr  # logged, redacted
