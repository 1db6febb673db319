"""Who may use the HTTP API: loopback-only by default, a bearer token everywhere else.

Whether a host needs a token (:func:`is_loopback`) and which token is configured (:func:`read_token`)
are settled when the ``[http]`` settings load (:mod:`gateway.config.http`); this module checks each
request's bearer token. The token is a :class:`~pydantic.SecretStr` that is never logged or echoed.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from gateway.config.http import is_loopback, read_token

__all__ = ["OPEN_PATHS", "authorized", "is_loopback", "read_token"]

OPEN_PATHS = frozenset({"/healthz"})  # liveness probes (systemd, load balancers) carry no credentials


def authorized(header: str | None, token: SecretStr) -> bool:
    """Does an ``Authorization`` header carry this bearer token (compared in constant time)?"""
    if header is None:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.get_secret_value().encode())
