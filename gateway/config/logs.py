"""``[logging]``: how the gateway writes its log."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.settings import Model


class LoggingSettings(Model):
    format: Literal["text", "json"] = Field(default="text", description="text for journald, or JSON lines")
