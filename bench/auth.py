"""What broker security costs: a fresh login's password hash, and the ACL check every delivered
message goes through (amqtt's topic-plugin call), each beside its baseline in the same run.

    .venv/bin/python bench/auth.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from gateway.broker.auth import (
    DEFAULT_ITERATIONS,
    BrokerSecurity,
    SecureBrokerMixin,
    broker_plan,
    hash_password,
    verify_password,
)
from gateway.config import BrokerSettings

ROUNDS = 3
CHECKS = 20_000
RULES = [
    {"topic": "telemetry/raw/+/+/+/%c/#", "access": "write"},
    {"user": "dash", "topic": "secret/#", "access": "deny"},
    {"user": "dash", "topic": "telemetry/#", "access": "read"},
    {"user": "admin", "topic": "#", "access": "readwrite"},
]


def _verify_ms(iterations: int) -> float:
    encoded = hash_password("a password", iterations=iterations)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        verify_password("a password", encoded)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


class AclTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """The same ACL as an amqtt topic plugin: the way amqtt offers, measured against the direct hook."""

    @dataclass
    class Config:
        security: Any = None

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None, action: Any = None) -> bool:
        security: BrokerSecurity = self.context.config.security
        return security.allowed("read", topic or "", session.client_id, session.username)


class _HookedBroker(SecureBrokerMixin, Broker):  # type: ignore[misc]
    pass


async def _check_us(settings: BrokerSettings, how: str) -> float:
    security = BrokerSecurity(settings)
    config = broker_plan(settings, security).config
    broker: Any
    if how == "plugin":
        config["plugins"][f"{__name__}.AclTopicPlugin"] = {"security": security}
        broker = Broker(config)
    else:
        broker = _HookedBroker(config)
        broker.security = security
    session = Session()
    session.client_id, session.username = "dash-1", "dash"
    topic = "telemetry/valid/1.0/site/meter/m-1/power"
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CHECKS):
            await broker._topic_filtering(session, topic, Action.RECEIVE)
        times.append((time.perf_counter() - start) / CHECKS)
    return statistics.median(times) * 1e6


async def main() -> None:
    print("password verification (PBKDF2-SHA512, median of 5):")
    mosquitto = _verify_ms(101)
    ours = _verify_ms(DEFAULT_ITERATIONS)
    print(f"  mosquitto_passwd default, 101 iterations : {mosquitto:8.2f} ms")
    print(f"  iotgw passwd default, {DEFAULT_ITERATIONS} iterations: {ours:8.2f} ms  (ratio {ours / mosquitto:.0f})")
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "passwd"
        path.write_text(f"dash:{hash_password('x', iterations=1000)}\n")
        open_acl = BrokerSettings(password_file=path)
        with_rules = BrokerSettings.model_validate({"password_file": str(path), "acl": RULES})
        baseline = await _check_us(open_acl, "hook")
        hooked = await _check_us(with_rules, "hook")
        plugin = await _check_us(with_rules, "plugin")
    print(f"ACL check per delivered message (median of {ROUNDS} x {CHECKS:,}):")
    print(f"  no rules (nothing to check)             : {baseline:8.2f} us")
    print(f"  {len(RULES)} rules, direct hook (what the gateway does): {hooked:8.2f} us")
    print(f"  {len(RULES)} rules, as an amqtt topic plugin          : {plugin:8.2f} us  (ratio {plugin / hooked:.0f})")


if __name__ == "__main__":  # amqtt's plugin loader imports this module by name: keep the import side-effect free
    asyncio.run(main())
