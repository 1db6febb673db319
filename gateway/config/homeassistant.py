"""``[homeassistant]``: MQTT discovery for Home Assistant on the gateway's broker, the embedded one or the
site's (gateway/homeassistant.py)."""

from __future__ import annotations

from pydantic import Field, field_validator

from gateway.settings import Model


class HomeAssistantSettings(Model):
    discovery: bool = Field(default=False, description="retained sensor configs for every device and metric")
    prefix: str = Field(default="homeassistant", min_length=1, description="Home Assistant's discovery_prefix")
    interval_s: float = Field(default=10.0, gt=0, description="how often new series are looked for")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if "+" in value or "#" in value or value.startswith("/") or value.endswith("/"):
            raise ValueError("a topic prefix without wildcards or leading/trailing '/'")
        return value
