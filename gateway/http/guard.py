"""Who may reach the HTTP API from a browser: the Host it is asked under (DNS rebinding) and the origin
of a page that wants to change something (cross-site requests). Pure functions; the API's middleware
applies them to every request (gateway/http/api.py).

A page on ``evil.example`` whose name is made to resolve to 127.0.0.1 (DNS rebinding) talks to the
loopback API under ``Host: evil.example``: refused, whatever the path. A page of another origin can make
the browser POST (a form, ``fetch`` with a simple content type): the browser says so in ``Origin`` (and
``Sec-Fetch-Site``), and such a request is refused before anything changes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

__all__ = ["cross_site_refusal", "host_allowed"]

_WILDCARD_BINDS = ("", "0.0.0.0", "::")  # noqa: S104  (names, not binds)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _split_host(host_header: str) -> tuple[str, int | None] | None:
    """``name:port`` or ``[v6]:port`` (port optional), lower-cased; None when it is not a host."""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9_.\-]+?)\.?(?::(\d{1,5}))?", host_header.strip().lower())
    if match is None:
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def host_allowed(host_header: str, *, bound: str, port: int, allowed: Iterable[str] = ()) -> bool:
    """Is ``host_header`` one this API serves? Its address (any address of the machine when bound to
    all of them), localhost, 127.0.0.1 or [::1], each with the API's port (none: port 80); or a name of
    ``allowed`` (``[http] allowed_hosts``: any port, or the one given). A page on another name that
    resolves here (DNS rebinding) is not."""
    parsed = _split_host(host_header)
    if parsed is None:
        return False
    name, given_port = parsed
    for entry in allowed:
        entry_name, _, entry_port = entry.rpartition(":") if re.search(r":\d+$", entry) else (entry, "", "")
        if name == entry_name and (not entry_port or given_port == int(entry_port)):
            return True
    if (given_port if given_port is not None else 80) != port:
        return False
    bound_name = f"[{bound.lower()}]" if ":" in bound else bound.lower()
    return name in _LOOPBACK_NAMES or name == bound_name or (bound in _WILDCARD_BINDS and _is_ip(name))


def cross_site_refusal(origin: str | None, fetch_site: str | None, host_header: str) -> str | None:
    """Why a state-changing request must be refused as coming from a page of another origin, or None.
    Browsers send ``Origin`` with every POST; a request without one comes from a program (curl), which
    no web page can make on someone's behalf."""
    if origin is not None:
        if origin.lower() not in (f"http://{host_header.lower()}", f"https://{host_header.lower()}"):
            return f"a page of another origin ({origin}) may not change this gateway"
    elif fetch_site in ("cross-site", "same-site"):
        return "a page of another site may not change this gateway"
    return None
