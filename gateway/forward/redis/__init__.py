"""The Redis Streams destination: its settings (:mod:`.settings`), how topics name streams
(:mod:`.streams`) and the destination itself (:mod:`.destination`, redis-py's asyncio client)."""

from __future__ import annotations

from gateway.forward.base import Destination
from gateway.forward.redis.settings import RedisForward
from pipeline.topics import TopicTemplate

__all__ = ["RedisForward", "build"]


def build(cfg: RedisForward, gateway_id: str, template: TopicTemplate) -> Destination:
    """The destination ``cfg`` describes (no I/O: it connects once started)."""
    from gateway.forward.redis.destination import (  # noqa: PLC0415  redis-py loads only when used
        RedisDestination,
        RedisSettings,
    )
    from gateway.forward.redis.streams import StreamNames  # noqa: PLC0415  beside it

    tls = cfg.tls
    return RedisDestination(cfg.name, RedisSettings(
        url=cfg.url, gateway_id=gateway_id, streams=StreamNames(cfg.stream, template), maxlen=cfg.maxlen,
        approximate=cfg.approximate, username=cfg.username,
        password=cfg.password.get_secret_value() if cfg.password else None,
        ca_file=tls.ca_file if tls else None, cert_file=tls.cert_file if tls else None,
        key_file=tls.key_file if tls else None, timeout_s=cfg.timeout_s,
    ))
