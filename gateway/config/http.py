"""``[http]``: the HTTP API and dashboard's address, and the bearer token that guards it off loopback.

:func:`is_loopback` and :func:`read_token` decide, at load time, whether a token is needed and which
one; the HTTP API (:mod:`gateway.http.auth`) uses the same two functions when it serves.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.settings import Model

MIN_TOKEN_CHARS = 16  # a bearer token anyone on the network may guess at: `openssl rand -hex 16` makes 32


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


class HttpSettings(Model):
    """The HTTP API and dashboard (gateway/http/api.py), served in the gateway's event loop.

    Off unless enabled here or by ``--http-port`` (``iotgw demo`` turns it on). On a non-loopback
    address every request except ``/healthz`` needs ``Authorization: Bearer <token>``; the token
    comes from ``token``, else the file ``token_file``, else the environment variable ``token_env``.
    """

    enabled: bool = False
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535, description="0: any free port")
    token: SecretStr | None = None
    token_file: Path | None = None
    token_env: str | None = Field(default=None, min_length=1)
    require_token: bool = Field(default=False, description="also on loopback")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="names the API is reached by besides its address, localhost, 127.0.0.1 "
        "and [::1] (a DNS name, a reverse proxy's): any other Host header is refused (DNS rebinding)",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(:\d{1,5})?", host):
                raise ValueError(f"{host!r}: a host name or address, optionally with :port (no scheme, no path)")
        return [h.lower().rstrip(".") for h in value]

    @model_validator(mode="after")
    def _token_where_needed(self) -> HttpSettings:
        if not self.enabled:
            return self
        token = self.resolve_token()
        if token is None and self.needs_token:
            raise ValueError(
                f"host {self.host!r} is not a loopback address (or require_token is set): "
                "configure a bearer token (token, token_file or token_env)"
            )
        value = token.get_secret_value() if token is not None else ""
        if token is not None and (len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value)):
            raise ValueError(f"the bearer token (token, token_file or token_env) must be {MIN_TOKEN_CHARS} characters "
                             "or more, without spaces (`openssl rand -hex 16` makes one)")
        return self

    def log_secrets(self) -> list[str]:
        """Secrets the log must never show that are not a ``SecretStr`` field (gateway/ops/logs.py)."""
        token = self.resolve_token() if self.token_file is not None or self.token_env is not None else None
        return [token.get_secret_value()] if token is not None else []

    @property
    def needs_token(self) -> bool:
        return self.require_token or not is_loopback(self.host)

    def resolve_token(self) -> SecretStr | None:
        """The configured token: ``token``, else ``token_file``'s first line, else ``$token_env``."""
        return read_token(self.token, self.token_file, self.token_env)
