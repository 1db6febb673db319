"""``[[forward]] type = "rabbitmq"``: a RabbitMQ (AMQP 0-9-1) topic exchange, with publisher confirms."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from gateway.forward.mqtt.settings import TlsSettings
from gateway.forward.settings import ForwardSettingsBase
from gateway.settings import SecretEnv, SecretFile, WithSecrets

_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")  # exchange and queue names (AMQP: up to 255 bytes)


def _amqp_name(value: str | None) -> str | None:
    if value is not None and not _NAME.fullmatch(value):
        raise ValueError("must be 1 to 255 letters, digits, '_', '-', '.' or ':'")
    return value


class RabbitForward(ForwardSettingsBase, WithSecrets):
    """Events published to a durable topic exchange, persistent, each confirmed by the broker; commands
    (``subscribe``) consumed from a durable queue bound to those filters."""

    type: Literal["rabbitmq"]
    url: str = Field(min_length=1, description="amqp://host:5672/vhost, or amqps:// for TLS")
    username: str | None = Field(default=None, description="default: the URL's, else guest")
    password: SecretStr | None = None
    password_file: SecretFile | None = None
    password_env: SecretEnv | None = None
    tls: TlsSettings | None = None
    exchange: str = Field(default="iotgw", description="a topic exchange; declared durable unless it exists")
    declare_exchange: bool = Field(default=True, description="false: it must exist (checked passively)")
    queue: str | None = Field(
        default=None, description="a durable queue the gateway declares and binds to the forwarded topics, "
        "so events wait there for a consumer that is not connected yet",
    )
    downlink_queue: str | None = Field(
        default=None, description="the durable queue of the subscribe filters; default "
        "iotgw.<gateway_id>.<name>.downlink",
    )
    dedupe_window: int = Field(
        default=10_000, ge=0, le=1_000_000, description="the newest event ids the broker keeps in the gateway's "
        "ledger queue, so an event is never published twice; 0: no ledger (at least once)",
    )
    batch_size: int = Field(default=2000, ge=1, le=10_000, description="events a batch; up to three batches await "
                            "their confirms at once (fewer waits for the broker's disk)")
    confirm_timeout_s: float = Field(default=10.0, gt=0, le=300)
    heartbeat_s: int = Field(default=30, ge=0, le=600)

    _names = field_validator("exchange", "queue", "downlink_queue")(_amqp_name)

    @field_validator("url")
    @classmethod
    def _amqp(cls, value: str) -> str:
        if not re.fullmatch(r"amqps?://[^/\s]+(/\S*)?", value):
            raise ValueError("must be an amqp:// or amqps:// URL, for example amqp://rabbitmq:5672/")
        return value
