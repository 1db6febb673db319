"""``[[forward]] type = "nats"``: NATS JetStream, optionally into a stream the gateway creates."""

from __future__ import annotations

from typing import Literal

from gateway.forward.settings import ForwardSettingsBase


class NatsForward(ForwardSettingsBase):
    type: Literal["nats"]
    stream: str | None = None
    create_stream: bool = False
