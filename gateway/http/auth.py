"""Who may use the HTTP API: loopback-only by default, a bearer token everywhere else.

The decision is one function (:func:`needs_token`) so it is tested on its own; the token itself is
a :class:`~pydantic.SecretStr` that is never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from pydantic import SecretStr

OPEN_PATHS = frozenset({"/healthz"})  # liveness probes (systemd, load balancers) carry no credentials


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1``; anything else (``0.0.0.0`` too) is exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(token: SecretStr | None, token_file: Path | None, token_env: str | None) -> SecretStr | None:
    """``token``, else the first line of ``token_file``, else ``$token_env``; None if none is set."""
    if token is not None and token.get_secret_value():
        return token
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"token_file {token_file}: cannot read ({exc.strerror})") from None
        if text:
            return SecretStr(text.splitlines()[0].strip())
    if token_env is not None and os.environ.get(token_env, "").strip():
        return SecretStr(os.environ[token_env].strip())
    return None


def authorized(header: str | None, token: SecretStr) -> bool:
    """Does an ``Authorization`` header carry this bearer token (compared in constant time)?"""
    if header is None:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.get_secret_value().encode())
