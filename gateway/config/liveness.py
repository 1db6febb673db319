"""``[liveness]``: the gateway's own online/offline status on every MQTT broker it is a client of (the
external broker, ``[[forward]] type = "mqtt"`` destinations): a retained birth message when it connects, and
a retained last will the broker publishes when the gateway disappears. Device inactivity is an alert rule
(``[[rules]] kind = "inactivity"``, gateway/config/rules.py)."""

from __future__ import annotations

from pydantic import Field, field_validator

from gateway.settings import Model


class LivenessSettings(Model):
    status_topic: str = Field(default="status/{site}/{gateway_id}",
                              description="{site} and {gateway_id} are filled in; retained")
    online: str = Field(default="online", min_length=1, description="the birth payload (Home Assistant's default)")
    offline: str = Field(default="offline", min_length=1, description="the last will's payload")

    @field_validator("status_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        probe = value.replace("{site}", "s").replace("{gateway_id}", "g")
        if not probe or "+" in probe or "#" in probe or "{" in probe or "}" in probe:
            raise ValueError("a topic without wildcards; placeholders: {site}, {gateway_id}")
        return value

    def topic(self, site: str, gateway_id: str) -> str:
        return self.status_topic.replace("{site}", site).replace("{gateway_id}", gateway_id)
