"""Broker security: the password file, password hashes, topic ACLs and TLS listeners; the broker
(gateway/broker/core.py) asks :class:`BrokerSecurity` every question, for every client.

Passwords
    ``[broker] password_file`` holds ``user:hash`` lines, written by ``iotgw passwd``. Hashes are
    Mosquitto's ``$7$`` format, PBKDF2-HMAC-SHA512 with a random 12-byte salt:
    ``$7$<iterations>$<base64 salt>$<base64 64-byte digest>``. Files made by ``mosquitto_passwd``
    (Mosquitto 2.x) work unchanged, and Mosquitto reads ours. ``iotgw passwd`` uses
    :data:`DEFAULT_ITERATIONS` (Mosquitto's own tool uses 101); verification honours whatever count
    a line carries. Mosquitto 1.x ``$6$`` lines (one salted SHA-512: weak) are accepted with a warning.
    Verification runs in a worker thread, one at a time, so a storm of logins never stalls the event
    loop; a verified (user, password) pair is remembered (as an HMAC under a per-process random key)
    until the file changes, so reconnecting devices do not pay the hash again. One address may have at
    most ``[broker] max_logins_per_address`` logins waiting for the hash: a flood of bogus CONNECTs from
    one machine is refused at once (CONNACK 3, server unavailable; counted as ``logins_throttled``)
    instead of delaying everyone else's logins behind it. The file is re-read
    when its modification time or size changes: ``iotgw passwd`` takes effect without a restart.

Authentication
    A client with a username must match the password file. A client without one is anonymous and is
    accepted only when ``allow_anonymous`` is true, or ``"loopback"`` and it connects from this
    machine. Unset, it follows Mosquitto 2 (:meth:`~gateway.config.BrokerSettings.anonymous_access`):
    no password file and every listener on loopback means ``"loopback"``; a password file means false;
    no password file and a listener on another address is a config error. Without a password file,
    usernames prove nothing: every client is anonymous. Refused logins are counted; the first refusal
    for a username is logged, then nothing until that user logs in again (a state change), so a
    password-guessing storm is one line. Passwords are never logged.

ACLs (``[[broker.acl]]``)
    Each rule has a topic filter (``+``, ``#``; ``%c`` stands for the client id and ``%u`` for the
    username), an ``access`` (read, write, readwrite, deny) and optionally a ``user``. For a check,
    the rules that apply to the client are taken in file order, skipping rules that say nothing
    about the action (a ``read`` rule is ignored when publishing, a ``write`` rule when reading); the
    first one whose filter matches decides. ``deny`` applies to both. When none matches,
    ``acl_default`` decides: readwrite without rules, deny with rules (as Mosquitto does). A rule
    whose %c/%u would bring in ``/``, ``+`` or ``#`` (or %u for an anonymous client) does not grant;
    a deny rule then matches as if the value were ``+`` (fails closed). Matching and covering are
    :mod:`pipeline.topics`' (``TopicFilter.matches``, ``TopicFilter.covers``), as for routing.

    - PUBLISH: the topic is checked for write. A denied message is dropped (not delivered, not
      ingested) and counted; MQTT 3.1.1 has no negative PUBACK, so a QoS 1/2 message is still
      acknowledged, or the client would resend it forever. A topic starting with ``$`` is the broker's
      [MQTT-4.7.2-1]: no client may publish there, whatever the rules say.
    - Will: the will topic is checked as a PUBLISH, when the client connects; a will the client could
      not publish refuses the CONNECT (return code 5, not authorized), as Mosquitto does. The same
      check runs again when the will is published.
    - Client id: a session belongs to the username that created it; another user's CONNECT with that
      client id is refused (return code 2, identifier rejected), so ``%c`` rules cannot be claimed.
    - SUBSCRIBE: a filter is granted when the first deciding rule *covers* it (every topic the filter
      can match, the rule matches too) and allows read; rules that only overlap the filter do not
      decide. A denied filter gets return code 0x80 in the SUBACK.
    - Delivery: every message, live, retained or queued for an offline session, is checked for read
      against its topic and the session owner's rights before it goes to the session, so a wildcard
      subscription never carries what the client may not read.
    - In-process publishes by the gateway's drivers and pipeline bypass the write check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import ssl
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.config import AclRule, BrokerSettings, BrokerTls
from gateway.errors import ConfigError, GatewayError
from pipeline.errors import TopicError
from pipeline.topics import mqtt_filter

log = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 50_000  # ~0.1-0.4 s per fresh login on a Pi-class core; see bench/auth.py
SALT_BYTES = 12  # as mosquitto_passwd
_DIGEST_BYTES = 64
_MAX_TRACKED = 1024  # usernames / clients whose failures are tracked one by one (then aggregated)
ANONYMOUS = None
Login = Literal["ok", "refused", "throttled"]


class AuthError(GatewayError):
    """A password file or password operation failed."""


# -- password hashes ---------------------------------------------------------------------------


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A Mosquitto ``$7$`` line value: PBKDF2-HMAC-SHA512 with a random salt."""
    if iterations < 1:
        raise AuthError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True, slots=True)
class _Hash:
    kind: Literal["pbkdf2-sha512", "sha512"]
    iterations: int
    salt: bytes
    digest: bytes


def _parse_hash(encoded: str) -> _Hash:
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[:2] == ["", "7"]:
            iterations = int(parts[2])
            if iterations < 1:
                raise ValueError
            return _Hash("pbkdf2-sha512", iterations, base64.b64decode(parts[3], validate=True),
                         base64.b64decode(parts[4], validate=True))
        if len(parts) == 4 and parts[:2] == ["", "6"]:
            salt, digest = (base64.b64decode(part, validate=True) for part in parts[2:])
            return _Hash("sha512", 1, salt, digest)
    except (ValueError, binascii.Error):
        raise AuthError("malformed hash") from None
    raise AuthError("unsupported hash (expected Mosquitto's $7$ PBKDF2-SHA512, or $6$)")


def _compute(parsed: _Hash, password: str) -> bytes:
    secret = password.encode("utf-8")
    if parsed.kind == "sha512":
        return hashlib.sha512(secret + parsed.salt).digest()
    return hashlib.pbkdf2_hmac("sha512", secret, parsed.salt, parsed.iterations, dklen=len(parsed.digest) or None)


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; compared in constant time."""
    parsed = _parse_hash(encoded)
    return hmac.compare_digest(_compute(parsed, password), parsed.digest)


# What an unknown user is verified against, so a refusal takes as long as for a wrong password.
_DUMMY = _Hash("pbkdf2-sha512", DEFAULT_ITERATIONS, b"\0" * SALT_BYTES, b"\0" * _DIGEST_BYTES)


# -- the password file -------------------------------------------------------------------------


def read_password_file(path: Path) -> dict[str, str]:
    """``user -> hash``. Blank lines and ``#`` comments are skipped; a bad line is an AuthError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read {path} ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8'})") from None
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            raise AuthError(f"{path} line {number}: expected user:hash")
        try:
            _parse_hash(encoded)
        except AuthError as exc:
            raise AuthError(f"{path} line {number} (user {user!r}): {exc}") from None
        users[user] = encoded
    return users


def _check_username(user: str) -> None:
    if not user or ":" in user or any(c in user for c in "\r\n\0") or len(user.encode()) > 65535:
        raise AuthError("a username must be non-empty, without ':' or line breaks")


def update_password_file(path: Path, user: str, encoded: str | None) -> None:
    """Set ``user``'s hash (``encoded``), or delete ``user`` (``None``); other lines are kept.

    The new file replaces the old one atomically (a temporary file in the same directory, fsynced,
    then renamed). It keeps the old file's owner, group and mode (less any access for others), so the
    service's group can still read it; a new file is 0600, or 0640 in a setgid directory, whose group
    it takes: ``iotgw service install`` makes /etc/iotgw such a directory (root:iotgw, 2750).
    """
    _check_username(user)
    lines: list[str] = []
    old: os.stat_result | None = None
    if path.exists():
        read_password_file(path)  # refuse to rewrite a file we cannot parse
        lines = path.read_text(encoding="utf-8").splitlines()
        old = path.stat()
    if old is not None:
        mode = stat.S_IMODE(old.st_mode) & 0o770
    else:
        mode = 0o640 if path.parent.stat().st_mode & stat.S_ISGID else 0o600
    prefix = f"{user}:"
    found = [i for i, line in enumerate(lines) if line.strip().startswith(prefix)]
    if encoded is None and not found:
        raise AuthError(f"user {user!r} is not in {path}")
    kept = [line for i, line in enumerate(lines) if i not in found]
    if encoded is not None:
        kept.insert(found[0] if found else len(kept), f"{user}:{encoded}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)  # until it has its group
            if old is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != (old.st_uid, old.st_gid):
                os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(out.fileno(), mode)
            out.write("".join(f"{line}\n" for line in kept))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- ACLs --------------------------------------------------------------------------------------

_READS = ("read", "readwrite", "deny")
_WRITES = ("write", "readwrite", "deny")
_UNSAFE = frozenset("/+#")


@dataclass(frozen=True, slots=True)
class _Rule:
    topic: str
    access: str
    user: str | None

    def substituted(self, client_id: str | None, username: str | None) -> str | None:
        """The rule's filter for this client; None when a value cannot be substituted safely."""
        topic = self.topic
        for token, value in (("%c", client_id), ("%u", username)):
            if token not in topic:
                continue
            safe = value or ""
            if not safe or _UNSAFE & set(safe):
                if self.access != "deny":
                    return None
                safe = "+"  # fail closed: a deny rule covers every value
            topic = topic.replace(token, safe)
        return topic


class Acl:
    """First-match topic ACL (see the module docstring)."""

    def __init__(self, rules: Iterable[AclRule], default: str | None) -> None:
        self.rules = tuple(_Rule(r.topic, r.access, r.user) for r in rules)
        self.default = default or ("deny" if self.rules else "readwrite")

    @property
    def open(self) -> bool:
        """Everything allowed to everyone: no checks needed."""
        return not self.rules and self.default == "readwrite"

    def allows(self, action: Literal["read", "write", "subscribe"], topic: str, client_id: str | None,
               username: str | None) -> bool:
        relevant = _WRITES if action == "write" else _READS
        try:
            requested = mqtt_filter(topic) if action == "subscribe" else None
        except TopicError:
            return False  # not a filter
        for rule in self.rules:
            if rule.access not in relevant or (rule.user is not None and rule.user != username):
                continue
            pattern = rule.substituted(client_id, username)
            if pattern is None:
                continue
            try:
                rule_filter = mqtt_filter(pattern)
            except TopicError:  # no filter once %c/%u are in (too long): fail closed, like an unsafe value
                if rule.access == "deny":
                    return False
                continue
            if rule_filter.covers(requested) if requested is not None else rule_filter.matches(topic):
                return rule.access != "deny"
        return self.default in (_WRITES if action == "write" else _READS) and self.default != "deny"


# -- the security state the broker shares --------------------------------------------------------


@dataclass
class SecurityStats:
    logins_accepted: int = 0
    logins_refused: int = 0
    logins_throttled: int = 0
    denied: dict[str, int] = field(default_factory=lambda: {
        "publish": 0, "subscribe": 0, "receive": 0, "will": 0, "client_id": 0})


class _FirstOfRun:
    """Remembers which keys are in a run of failures, so only the first of each run is logged."""

    def __init__(self) -> None:
        self._runs: dict[str, int] = {}

    def fail(self, key: str) -> bool:
        """Count a failure; True when it starts a run (log it)."""
        if key not in self._runs and len(self._runs) >= _MAX_TRACKED:
            key = "*"  # an attack with endless distinct names: one aggregate run
        count = self._runs.get(key, 0)
        self._runs[key] = count + 1
        return count == 0

    def succeed(self, key: str) -> int:
        """End the run; how many failures it had."""
        return self._runs.pop(key, 0)


def _shown(value: str | None) -> str:
    return "(anonymous)" if value is None else repr(value[:64])


def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class BrokerSecurity:
    """Users, ACL and counters for one broker; built (and checked) from ``[broker]`` before it starts."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.allow_anonymous = settings.anonymous_access()  # raises ConfigError when nobody could log in
        self.password_file = settings.password_file
        self.acl = Acl(settings.acl, settings.acl_default)
        self.stats = SecurityStats()
        self._users: dict[str, str] = {}
        self._file_stamp: tuple[int, int] | None = None
        self._verified: set[bytes] = set()
        self._cache_key = secrets.token_bytes(32)
        self._hashing = asyncio.Semaphore(1)
        self._waiting: dict[str, int] = {}  # address -> logins waiting for (or in) the hash
        self._max_waiting = settings.max_logins_per_address
        self._login_runs = _FirstOfRun()
        self._denial_runs = _FirstOfRun()
        if self.password_file is not None:
            try:
                self._load()
            except AuthError as exc:
                raise ConfigError([f"broker.password_file: {exc}"]) from None
            if not self._users:
                log.warning("broker: %s has no users: only anonymous clients (if allowed) can connect",
                            self.password_file)

    def _stamp(self) -> tuple[int, int] | None:
        if self.password_file is None:
            return None
        try:
            st = self.password_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _load(self) -> None:
        assert self.password_file is not None
        stamp = self._stamp()
        users = read_password_file(self.password_file)
        weak = sorted(u for u, h in users.items() if h.startswith("$6$"))
        if weak:
            log.warning("broker: %d user(s) in %s have weak $6$ hashes: set them again with `iotgw passwd`",
                        len(weak), self.password_file)
        self._users = users
        self._file_stamp = stamp
        self._verified.clear()

    def _reload_if_changed(self) -> None:
        if self.password_file is None or self._stamp() == self._file_stamp:
            return
        try:
            self._load()
            log.warning("broker: password file %s reloaded (%d user(s))", self.password_file, len(self._users))
        except AuthError as exc:
            self._file_stamp = self._stamp()  # report once per change; keep the users we had
            log.error("broker: password file changed but cannot be used, keeping the previous users: %s", exc)

    async def _password_ok(self, username: str, password: str) -> bool:
        encoded = self._users.get(username)
        token = hmac.new(self._cache_key, f"{username}\0{encoded}\0{password}".encode(), "sha256").digest()
        if encoded is not None and token in self._verified:
            return True
        parsed = _DUMMY
        if encoded is not None:
            try:
                parsed = _parse_hash(encoded)
            except AuthError:
                parsed = _DUMMY
        async with self._hashing:
            computed = await asyncio.to_thread(_compute, parsed, password)
        ok = hmac.compare_digest(computed, parsed.digest) and encoded is not None and parsed is not _DUMMY
        if ok:
            if len(self._verified) >= _MAX_TRACKED:
                self._verified.clear()
            self._verified.add(token)
        return ok

    async def authenticate(self, client_id: str | None, username: str | None, password: str | None,
                           remote_address: str | None) -> Login:
        """Whether the CONNECT may go on (``"ok"``), has bad credentials or is anonymous where that is not
        allowed (``"refused"``), or came from an address with too many logins waiting already
        (``"throttled"``)."""
        self._reload_if_changed()
        if username is not None and self.password_file is None:
            username = None  # nothing to check it against: the client counts as anonymous
        address = remote_address or ""
        if username is None:
            ok = self.allow_anonymous is True or (self.allow_anonymous == "loopback" and _is_loopback(remote_address))
            reason = "anonymous clients are not allowed" + (" from other machines" if self.allow_anonymous else "")
        elif not self._remembered(username, password or "") and self._waiting.get(address, 0) >= self._max_waiting:
            self.stats.logins_throttled += 1
            if self._login_runs.fail(f"throttled:{address}"):
                log.warning("broker: more than %d logins at once from %s: refused until one is done (further ones "
                            "are counted, not logged)", self._max_waiting, address)
            return "throttled"
        else:
            self._waiting[address] = self._waiting.get(address, 0) + 1
            try:
                ok = await self._password_ok(username, password or "")
            finally:
                if (left := self._waiting[address] - 1) > 0:
                    self._waiting[address] = left
                else:
                    del self._waiting[address]
            reason = "bad username or password"
        key = f"user:{username}"
        if ok:
            self.stats.logins_accepted += 1
            if failures := self._login_runs.succeed(key):
                log.warning("broker: %s logged in after %d refused attempt(s)", _shown(username), failures)
            self._login_runs.succeed(f"throttled:{address}")
        else:
            self.stats.logins_refused += 1
            if self._login_runs.fail(key):
                log.warning("broker: login refused for %s (client %s from %s): %s; further refusals for this "
                            "username are counted, not logged", _shown(username), _shown(client_id),
                            remote_address, reason)
        return "ok" if ok else "refused"

    def _remembered(self, username: str, password: str) -> bool:
        encoded = self._users.get(username)
        token = hmac.new(self._cache_key, f"{username}\0{encoded}\0{password}".encode(), "sha256").digest()
        return encoded is not None and token in self._verified

    def client_username(self, username: str | None) -> str | None:
        """The username the ACL sees (None: anonymous)."""
        return username if self.password_file is not None else None

    def allowed(self, action: Literal["read", "write", "subscribe"], topic: str, client_id: str | None,
                username: str | None, *, counter: str | None = None) -> bool:
        """The ACL's answer for this client (``username`` as the client gave it), counted under
        ``counter`` (default: the action's) when it is no. Writing to a ``$`` topic is always refused."""
        if action == "write" and topic.startswith("$"):
            ok = False
            user = self.client_username(username)
        elif self.acl.open:
            return True
        else:
            user = self.client_username(username)
            ok = self.acl.allows(action, topic, client_id, user)
        if not ok:
            self.refused(counter or {"write": "publish", "subscribe": "subscribe", "read": "receive"}[action],
                         topic, client_id, user)
        return ok

    def refused(self, counter: str, what: str, client_id: str | None, username: str | None) -> None:
        """Count (and log the first of a run per client) a refusal: publish, subscribe, receive, will,
        client_id."""
        self.stats.denied[counter] = self.stats.denied.get(counter, 0) + 1
        if self._denial_runs.fail(f"{counter}:{client_id}"):
            log.warning("broker: ACL denied %s on %r to client %s (user %s); further denials are counted",
                        counter, what[:200], _shown(client_id), _shown(username))

    def snapshot(self) -> dict[str, Any]:
        return {"logins_accepted": self.stats.logins_accepted, "logins_refused": self.stats.logins_refused,
                "logins_throttled": self.stats.logins_throttled, "denied": dict(self.stats.denied)}


def listener_ssl_context(tls: BrokerTls, where: str) -> ssl.SSLContext:
    """A server context; a certificate problem is a ConfigError naming ``where`` (the settings' path)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                             cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{where}.ca_file: cannot load {tls.ca_file} ({exc})"]) from None
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{where}.cert_file: cannot load {tls.cert_file} with {tls.key_file} ({exc})"]) from None
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
