"""Broker security: the password file, password hashes, topic ACLs, TLS listeners, and the amqtt
plugins that apply them.

Passwords
    ``[broker] password_file`` holds ``user:hash`` lines, written by ``iotgw passwd``. Hashes are
    Mosquitto's ``$7$`` format, PBKDF2-HMAC-SHA512 with a random 12-byte salt:
    ``$7$<iterations>$<base64 salt>$<base64 64-byte digest>``. Files made by ``mosquitto_passwd``
    (Mosquitto 2.x) work unchanged, and Mosquitto reads ours. ``iotgw passwd`` uses
    :data:`DEFAULT_ITERATIONS` (Mosquitto's own tool uses 101); verification honours whatever count
    a line carries. Mosquitto 1.x ``$6$`` lines (one salted SHA-512: weak) are accepted with a warning.
    Verification runs in a worker thread, one at a time, so a storm of logins never stalls the event
    loop; a verified (user, password) pair is remembered (as an HMAC under a per-process random key)
    until the file changes, so reconnecting devices do not pay the hash again. The file is re-read
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
      acknowledged, or the client would resend it forever.
    - SUBSCRIBE: a filter is granted when the first deciding rule *covers* it (every topic the filter
      can match, the rule matches too) and allows read; rules that only overlap the filter do not
      decide. A denied filter gets return code 0x80 in the SUBACK.
    - Delivery: every message, live or retained, is checked for read against its topic before it
      goes to a subscriber, so a wildcard subscription never carries what the client may not read.
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
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from gateway.config import AclRule, BrokerSettings, BrokerTls
from gateway.errors import ConfigError, GatewayError
from pipeline.errors import TopicError
from pipeline.topics import mqtt_filter, topic_matches

log = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 50_000  # ~0.1-0.4 s per fresh login on a Pi-class core; see bench/auth.py
SALT_BYTES = 12  # as mosquitto_passwd
_DIGEST_BYTES = 64
_MAX_TRACKED = 1024  # usernames / clients whose failures are tracked one by one (then aggregated)
ANONYMOUS = None


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
            return False  # not a filter (amqtt refuses it before asking)
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


# -- the security state the plugins share --------------------------------------------------------


@dataclass
class SecurityStats:
    logins_accepted: int = 0
    logins_refused: int = 0
    denied: dict[str, int] = field(default_factory=lambda: {"publish": 0, "subscribe": 0, "receive": 0})


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
                           remote_address: str | None) -> bool:
        self._reload_if_changed()
        if username is not None and self.password_file is None:
            username = None  # nothing to check it against: the client counts as anonymous
        if username is None:
            ok = self.allow_anonymous is True or (self.allow_anonymous == "loopback" and _is_loopback(remote_address))
            reason = "anonymous clients are not allowed" + (" from other machines" if self.allow_anonymous else "")
        else:
            ok = await self._password_ok(username, password or "")
            reason = "bad username or password"
        key = f"user:{username}"
        if ok:
            self.stats.logins_accepted += 1
            if failures := self._login_runs.succeed(key):
                log.warning("broker: %s logged in after %d refused attempt(s)", _shown(username), failures)
        else:
            self.stats.logins_refused += 1
            if self._login_runs.fail(key):
                log.warning("broker: login refused for %s (client %s from %s): %s; further refusals for this "
                            "username are counted, not logged", _shown(username), _shown(client_id),
                            remote_address, reason)
        return ok

    def client_username(self, username: str | None) -> str | None:
        """The username the ACL sees (None: anonymous)."""
        return username if self.password_file is not None else None

    def allowed(self, action: Literal["read", "write", "subscribe"], topic: str, client_id: str | None,
                username: str | None) -> bool:
        if self.acl.open:
            return True
        user = self.client_username(username)
        ok = self.acl.allows(action, topic, client_id, user)
        if not ok:
            counter = {"write": "publish", "subscribe": "subscribe", "read": "receive"}[action]
            self.stats.denied[counter] += 1
            if self._denial_runs.fail(f"{counter}:{client_id}"):
                log.warning("broker: ACL denied %s on %r to client %s (user %s); further denials are counted",
                            counter, topic[:200], _shown(client_id), _shown(user))
        return ok

    def snapshot(self) -> dict[str, Any]:
        return {"logins_accepted": self.stats.logins_accepted, "logins_refused": self.stats.logins_refused,
                "denied": dict(self.stats.denied)}


# -- amqtt plugins and broker hooks ----------------------------------------------------------


class SecurityAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt authentication through :class:`BrokerSecurity`."""

    @dataclass
    class Config:
        security: Any = None

    async def authenticate(self, *, session: Any) -> bool:
        security: BrokerSecurity = self.context.config.security
        return await security.authenticate(session.client_id, session.username, session.password,
                                           session.remote_address)


_ACTIONS: dict[Any, Literal["read", "write", "subscribe"]] = {
    Action.PUBLISH: "write", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "read",
}


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


@dataclass(frozen=True, slots=True)
class BrokerPlan:
    """What amqtt is built from: its config dict, and the TLS context of each listener by name."""

    config: dict[str, Any]
    ssl_contexts: dict[str, ssl.SSLContext]
    names: dict[str, str]  # listener name -> "type host:port", for the log


def broker_plan(settings: BrokerSettings, security: BrokerSecurity) -> BrokerPlan:
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{settings.host}:{settings.port}"}}
    contexts: dict[str, ssl.SSLContext] = {}
    names = {"default": f"tcp {settings.host}:{settings.port}"}
    for i, listener in enumerate(settings.listeners):
        name = f"listener-{i}"
        host = listener.host or settings.host
        listeners[name] = {"type": "ws" if listener.type in ("ws", "wss") else "tcp", "bind": f"{host}:{listener.port}"}
        names[name] = f"{listener.type} {host}:{listener.port}"
        if listener.type in ("tls", "wss"):
            tls = listener.tls or settings.tls
            assert tls is not None  # BrokerSettings checks this
            where = f"broker.listeners[{i}].tls" if listener.tls else "broker.tls"
            contexts[name] = listener_ssl_context(tls, where)
    # Name the plugins: amqtt's defaults (packet logger, $SYS...) cost a third of throughput. The ACL
    # is not a topic plugin: amqtt runs plugin calls as tasks, ~400 us per delivered message (bench/auth.py).
    plugins: dict[str, Any] = {f"{__name__}.SecurityAuthPlugin": {"security": security}}
    return BrokerPlan({"listeners": listeners, "plugins": plugins}, contexts, names)


_PREAUTHENTICATED = "iotgw.authenticated"
_DEFERRED_DELETES = "iotgw.deferred_deletes"
_PREVIOUS_FIELDS = "iotgw.previous_fields"
# What amqtt copies from a CONNECT onto an existing persistent session before authenticating it.
_CONNECT_FIELDS = ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive", "username",
                   "password")
_CONNECTING: ContextVar[list[str] | None] = ContextVar("iotgw_connecting", default=None)


class SecureBrokerMixin:
    """Hooks for amqtt's ``Broker`` (mixed in before it):

    - a refused client leaves the session under its client id as it was: amqtt deletes that session
      (clean-session CONNECT), or copies the CONNECT's username, password and will onto it, before it
      authenticates, and then takes over (disconnects) a client connected under that id;
    - retained messages go to a new subscription only where the client may read their topic;
    - TLS listeners use our own context (amqtt's never requires a client certificate);
    - topic checks (publish, subscribe, every delivery) go straight to :attr:`security`'s ACL.
    """

    listener_ssl: dict[str, ssl.SSLContext]
    security: BrokerSecurity | None = None

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        security = self.security
        if security is None:
            result: bool = await super()._topic_filtering(session, topic, action)  # type: ignore[misc]
            return result
        act = _ACTIONS.get(action)
        if act is None or session is None or topic is None:
            return False
        return security.allowed(act, topic, session.client_id, session.username)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str, remote_port: int
                                         ) -> tuple[Any, Any]:
        deferred: list[str] = []
        sessions: dict[str, tuple[Any, Any]] = self._sessions  # type: ignore[attr-defined]
        before = {cid: tuple(getattr(s, f) for f in _CONNECT_FIELDS) for cid, (s, _) in sessions.items()}
        token = _CONNECTING.set(deferred)
        try:
            handler, session = await super()._initialize_client_session(  # type: ignore[misc]
                reader, writer, remote_address, remote_port)
        finally:
            _CONNECTING.reset(token)
        session.attributes[_DEFERRED_DELETES] = deferred
        if session.parent and session.client_id in before:  # an existing session, updated from this CONNECT
            session.attributes[_PREVIOUS_FIELDS] = before[session.client_id]
        return handler, session

    async def _delete_session(self, client_id: str) -> None:
        deferred = _CONNECTING.get()
        if deferred is not None:  # a CONNECT not yet authenticated: delete only once it is
            deferred.append(client_id)
            return
        await super()._delete_session(client_id)  # type: ignore[misc]

    async def _handle_client_session(  # noqa: PLR0917  (amqtt's signature)
        self, reader: Any, writer: Any, client_session: Any, handler: Any, server: Any, listener_name: str
    ) -> None:
        parent: Any = super()
        config = self.listeners_config[listener_name]  # type: ignore[attr-defined]
        deferred = client_session.attributes.pop(_DEFERRED_DELETES, [])
        previous = client_session.attributes.pop(_PREVIOUS_FIELDS, None)
        if not await parent._authenticate(client_session, config):
            if previous is not None:  # the refused CONNECT must not change another connection's session
                for name, value in zip(_CONNECT_FIELDS, previous, strict=True):
                    setattr(client_session, name, value)
            refused = Session()
            refused.client_id = client_session.client_id  # parent 0: no session present [MQTT-3.2.2-4]
            handler.attach(refused, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        for client_id in deferred:
            await self._delete_session(client_id)
        client_session.attributes[_PREAUTHENTICATED] = True
        await parent._handle_client_session(reader, writer, client_session, handler, server, listener_name)

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        if session.attributes.pop(_PREAUTHENTICATED, False):
            return True
        result: bool = await super()._authenticate(session, listener)  # type: ignore[misc]
        return result

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        broker: Any = self
        topic_filter, qos = subscription
        handler = broker._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(broker._retained_messages.items()):
            if not topic_matches(topic, topic_filter):
                continue
            if not await broker._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            out_qos = min(qos, retained.qos if retained.qos is not None else qos)
            tasks.append(asyncio.ensure_future(handler.mqtt_publish(retained.topic, retained.data, out_qos,
                                                                    retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        context = getattr(self, "listener_ssl", {}).get(listener_name, ssl_context)
        return await super()._create_server_instance(  # type: ignore[misc]
            listener_name, listener_type, address, port, context)
