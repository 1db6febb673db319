"""``[[forward]] type = "influxdb"``: an InfluxDB v2 write API, and how readings map to points
(measurement and field name templates, the tags)."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.forward.settings import ForwardSettingsBase
from pipeline.topics import TopicTemplate

InfluxTag = Literal["site", "gateway", "device_class", "device_id", "unit", "transport", "metric"]
INFLUX_DEFAULT_TAGS: tuple[InfluxTag, ...] = ("site", "gateway", "device_class", "device_id", "unit")
INFLUX_NAME_FIELDS = ("site", "device_class", "device_id", "metric")  # placeholders of measurement/field


def _name_template(value: str) -> str:
    """A measurement or field name: text with placeholders from INFLUX_NAME_FIELDS."""
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(value) if name is not None or spec or conv]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    unknown = [n for n in names if n not in INFLUX_NAME_FIELDS]
    if unknown:
        choices = ", ".join("{" + name + "}" for name in INFLUX_NAME_FIELDS)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}: use {choices}")
    if value.startswith("#"):
        raise ValueError("must not start with '#' (line protocol reads the line as a comment)")
    return value


NameTemplate = Annotated[str, Field(min_length=1), AfterValidator(_name_template)]


class InfluxForward(ForwardSettingsBase):
    """An InfluxDB v2 write API (InfluxDB 2.x/3.x, or anything speaking it: VictoriaMetrics, ...)."""

    type: Literal["influxdb"]
    url: str = Field(min_length=1, description="http(s)://host:port of the v2 write API")
    topics: list[str] = Field(default_factory=list, description="default: valid readings (and agg with aggregates)")
    batch_size: int = Field(default=5000, ge=1, le=50_000, description="lines per write (InfluxDB: ~5,000)")
    org: str = ""
    bucket: str = Field(default="iotgw", min_length=1)
    token: SecretStr | None = None
    token_file: Path | None = Field(default=None, description="a file holding the token (its first line)")
    token_env: str | None = Field(default=None, min_length=1, description="an environment variable holding it")
    gzip: bool = True
    precision: Literal["s", "ms", "us", "ns"] = Field(
        default="ms", description="of the timestamps written: ms is what device clocks resolve and what "
        "VictoriaMetrics keeps; two readings of one series within one unit overwrite each other (use us then)",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    measurement: NameTemplate = "{device_class}"
    field: NameTemplate = "{metric}"
    tags: list[InfluxTag] = Field(default_factory=lambda: list(INFLUX_DEFAULT_TAGS))
    aggregates: bool = Field(default=False, description="also write agg events (fields mean, min, max, count)")
    agg_measurement: NameTemplate = "{metric}_agg"

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?", value):
            raise ValueError("must be an http:// or https:// URL, for example http://influxdb:8086")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> InfluxForward:
        if self.subscribe:
            raise ValueError("subscribe: an InfluxDB destination receives nothing (leave it out)")
        given = [k for k in ("token", "token_file", "token_env") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of token, token_file, token_env (got {', '.join(given)})")
        return self

    def token_value(self) -> str | None:
        """The token, read from where the config says (ConfigError when the file or variable is absent)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            try:
                lines = self.token_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError([f"forward {self.name}.token_file: cannot read ({exc.strerror})"]) from None
            return lines[0].strip() if lines else ""
        if self.token_env is not None:
            if self.token_env not in os.environ:
                raise ConfigError([f"forward {self.name}.token_env: {self.token_env} is not set"])
            return os.environ[self.token_env]
        return None

    def default_topics(self, template: TopicTemplate) -> list[str]:
        """The valid readings of the topic taxonomy, and its aggregates when enabled."""
        stages = ("valid", "agg") if self.aggregates else ("valid",)
        return [template.stage_filter(stage).pattern for stage in stages]
