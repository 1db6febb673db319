"""Logging for a service: journald-friendly text or JSON lines, and never a secret.

Text: one line per record, no timestamp (journald adds it). Under systemd (``$JOURNAL_STREAM`` set)
each line starts with its syslog priority (``<4>`` for a warning), so ``journalctl -p warning``
filters by level. JSON lines (``--log-format json`` or ``[logging] format = "json"``): one object a
line with time, level, logger, message (and the exception), for log shippers.

Every secret the configuration holds (``SecretStr`` values: backbone passwords, tokens; and what a
settings model's ``log_secrets()`` adds: the HTTP token read from ``token_file`` or ``token_env``,
BTHome bindkeys) is replaced by ``***`` in every record before it is written, whatever logged it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

LogFormat = Literal["text", "json"]
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
REDACTED = "***"
_SHORTEST_SECRET = 4


class _Redactor(logging.Filter):
    """Renders each record's message once, with secrets replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                for secret in self.secrets:
                    record.exc_text = record.exc_text.replace(secret, REDACTED)
        return True


class _JournalText(logging.Formatter):
    def __init__(self, priority_prefix: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self._prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self._prefix:
            priority = _PRIORITY.get(record.levelno, 6)
            text = "\n".join(f"<{priority}>{line}" for line in text.splitlines())
        return text


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


_redactor = _Redactor()


def setup_logging(*, verbose: bool = False, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_redactor)
    journald = "JOURNAL_STREAM" in os.environ
    handler.setFormatter(_JsonLines() if fmt == "json" else _JournalText(priority_prefix=journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


def redact(secrets: Iterable[str]) -> None:
    """From now on these values never reach the log (longest first, so no secret is half-hidden).
    Values shorter than 4 characters are left alone: replacing them would garble every line."""
    merged = set(_redactor.secrets) | {s for s in secrets if len(s) >= _SHORTEST_SECRET}
    _redactor.secrets = tuple(sorted(merged, key=len, reverse=True))


def secret_values(model: BaseModel) -> list[str]:
    """Every ``SecretStr`` value inside a (nested) pydantic model, and what a model's ``log_secrets()``
    names besides (a token read from a file or the environment, a BTHome bindkey)."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            extra = getattr(value, "log_secrets", None)
            if callable(extra):
                found.extend(extra())
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(model)
    return found
