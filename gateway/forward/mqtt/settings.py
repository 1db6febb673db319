"""``[[forward]] type = "mqtt"``: a remote MQTT broker (MQTT 5, or 3.1.1), with TLS and topic rewriting."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from gateway.forward.settings import ForwardSettingsBase
from gateway.settings import Model, SecretEnv, SecretFile, WithSecrets


class TlsSettings(Model):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class RewriteRule(Model):
    """Replace a leading topic prefix: ``from = "telemetry/"``, ``to = "plant-7/telemetry/"``."""

    from_: str = Field(alias="from", min_length=1)
    to: str


class MqttForward(ForwardSettingsBase, WithSecrets):
    type: Literal["mqtt"]
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    password_env: SecretEnv | None = None
    tls: TlsSettings | None = None
    topic_prefix: str = ""
    rewrite: list[RewriteRule] = Field(default_factory=list)
    max_inflight: int = Field(
        default=0, ge=0, le=65_535,
        description="QoS 1 messages awaiting their PUBACK at most; 0: what the forwarder has on the way "
                    "(three batches of batch_size). Set it for a broker that disconnects a client exceeding a limit; "
                    "an MQTT 5 broker's Receive Maximum bounds it too",
    )
