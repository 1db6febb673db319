"""What broker security costs: a fresh login's password hash, and the ACL check every delivered
message goes through, each beside its baseline in the same run.

    .venv/bin/python bench/auth.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from gateway.broker.auth import DEFAULT_ITERATIONS, BrokerSecurity, hash_password, verify_password
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


def _check_us(settings: BrokerSettings) -> float:
    """One ACL check of a delivery, as the broker makes it for every message to every subscriber."""
    security = BrokerSecurity(settings)
    topic = "telemetry/valid/1.0/site/meter/m-1/power"
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CHECKS):
            security.allowed("read", topic, "dash-1", "dash")
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
        baseline = _check_us(open_acl)
        checked = _check_us(with_rules)
    print(f"ACL check per delivered message (median of {ROUNDS} x {CHECKS:,}):")
    print(f"  no rules (nothing to check): {baseline:8.2f} us")
    print(f"  {len(RULES)} rules                    : {checked:8.2f} us")


if __name__ == "__main__":
    asyncio.run(main())
