"""``[[forward]] type = "redis"``: Redis Streams, one ``XADD`` per event into a stream named from the
taxonomy, trimmed to about ``maxlen`` entries, each event id added once."""

from __future__ import annotations

import re
import string
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator

from gateway.forward.mqtt.settings import TlsSettings
from gateway.forward.settings import ForwardSettingsBase
from gateway.settings import SecretEnv, SecretFile, WithSecrets

STREAM_FIELDS = ("stage", "version", "site", "device_class", "device_id", "metric")
_LEVEL_FIELD = re.compile(r"level(0|[1-9][0-9]?)")


def _stream_template(value: str) -> str:
    """A stream name: text with placeholders from STREAM_FIELDS and ``{level0}``, ``{level1}``, ..."""
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if spec or conv or not (name in STREAM_FIELDS or _LEVEL_FIELD.fullmatch(name)):
            choices = ", ".join("{" + f + "}" for f in STREAM_FIELDS)
            raise ValueError(f"unknown placeholder {{{name}}}: use {choices} or {{level0}}, {{level1}}, ...")
    return value


StreamTemplate = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_stream_template)]


class RedisForward(ForwardSettingsBase, WithSecrets):
    """Redis Streams (Redis 5 or later): an atomic script per event adds it to its stream unless its id
    is already there, and trims the stream; readers use consumer groups (``XREADGROUP``)."""

    type: Literal["redis"]
    url: str = Field(min_length=1, description="redis://host:6379/0, or rediss:// for TLS")
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    password_env: SecretEnv | None = None
    tls: TlsSettings | None = None
    batch_size: int = Field(default=1000, ge=1, le=10_000, description="events per pipelined round trip")
    stream: StreamTemplate = Field(default="iotgw:{stage}", description="the stream an event goes to")
    maxlen: int | None = Field(default=1_000_000, ge=1, description="entries kept per stream; none: no trimming")
    approximate: bool = Field(default=True, description="trim with MAXLEN ~ (whole nodes: far cheaper)")
    timeout_s: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _no_downlink(self) -> RedisForward:
        if self.subscribe:
            raise ValueError("subscribe: a Redis Streams destination receives nothing (leave it out)")
        if not re.fullmatch(r"rediss?://\S+", self.url):
            raise ValueError("url: must be a redis:// or rediss:// URL, for example redis://redis:6379/0")
        return self
