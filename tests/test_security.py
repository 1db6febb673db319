"""Broker security against independent clients: passwords (Mosquitto-compatible files, both ways),
topic ACLs (SUBACK 0x80, dropped publishes, retained messages), TLS and WebSocket listeners, and
secrets that never leave the config."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, free_port, iotgw
from paho.mqtt.enums import CallbackAPIVersion
from peers import Mosquitto

from gateway.app import Gateway
from gateway.broker.auth import Acl, hash_password, read_password_file, verify_password
from gateway.broker.embedded import EmbeddedBroker, Resend
from gateway.cli.main import main
from gateway.config import AclRule, BrokerSettings, parse_config
from gateway.errors import ConfigError
from pipeline.topics import filter_covers, topic_matches

NOT_AUTHORIZED = 135  # paho reports the 3.1.1 CONNACK code 5 as the MQTT 5 reason "Not authorized"
FAST = 1000  # iterations for test users: the hash's cost is not what these tests measure


class Client:
    """A paho MQTT 3.1.1 client in its own thread; records CONNACK, SUBACK codes and messages."""

    def __init__(self, port: int, client_id: str, *, username: str | None = None, password: str | None = None,
                 transport: Literal["tcp", "websockets"] = "tcp", context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1", clean: bool = True) -> None:
        self.rc: int | None = None
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subacks: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._answered = threading.Event()
        self._subscribed = threading.Condition(self._lock)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport,
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False, clean_session=clean)
        if username is not None:
            self.client.username_pw_set(username, password)
        if context is not None:
            self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self._answered.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        try:
            self.client.connect(host, port)
        except (OSError, ssl.SSLError):
            self._answered.set()
            return
        self.client.loop_start()
        assert self._answered.wait(20), "no answer to CONNECT"

    @property
    def accepted(self) -> bool:
        return self.rc == 0

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.rc = reason.value
        self._answered.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._subscribed:
            self.subacks[mid] = [c.value for c in codes]
            self._subscribed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> list[int]:
        _, mid = self.client.subscribe(list(filters))
        assert mid is not None
        with self._subscribed:
            assert self._subscribed.wait_for(lambda: mid in self.subacks, 20), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(20)
        assert info.is_published()

    async def subscribe_async(self, filters: Sequence[tuple[str, int]]) -> list[int]:
        return await asyncio.to_thread(self.subscribe, filters)

    async def publish_async(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False) -> None:
        await asyncio.to_thread(self.publish, topic, payload, qos, retain=retain)

    def wait_for(self, topic: str, timeout: float = 20) -> list[tuple[str, bytes, bool]]:
        """Every message up to and including the first one on ``topic``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for i, (t, _, _) in enumerate(self.messages):
                    if t == topic:
                        return self.messages[: i + 1]
            time.sleep(0.02)
        raise AssertionError(f"no message on {topic}; got {self.topics()}")

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def connect(port: int, client_id: str, **kwargs: Any) -> Client:
    return await asyncio.to_thread(Client, port, client_id, **kwargs)


class Ingested:
    """The gateway's ingest reduced to a list of topics."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    async def __call__(self, topic: str, payload: bytes, origin: str | None, event_id: str | None,
                       resend: Resend | None) -> list[asyncio.Future[None]]:
        self.topics.append(topic)
        return []


async def _room() -> None:
    return None


@contextlib.asynccontextmanager
async def running(settings: BrokerSettings, ingest: Ingested | None = None) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(settings, ingest or Ingested(), _room, port_option="--mqtt-port") as broker:
        yield broker


def passwd_file(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(f"{u}:{hash_password(p, iterations=FAST)}\n" for u, p in users.items()))
    return path


def _passwd_cli(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "passwd", *args], input=password, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


# -- password files ----------------------------------------------------------------------------


def test_mosquitto_passwd_files_verify(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret:with colon"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(path), "bob", "hunter2"], check=True)
    users = read_password_file(path)
    assert users["alice"].startswith("$7$")  # Debian's mosquitto_passwd: PBKDF2-SHA512
    assert verify_password("s3cret:with colon", users["alice"])
    assert verify_password("hunter2", users["bob"])
    assert not verify_password("hunter3", users["bob"])
    assert not verify_password("s3cret:with colon", users["bob"])


def test_iotgw_passwd_writes_a_file_mosquitto_accepts(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert _passwd_cli("--password-stdin", str(path), "alice", password="first\n").returncode == 0
    assert _passwd_cli("--password-stdin", str(path), "bob", password="b0b\n").returncode == 0
    assert _passwd_cli("--password-stdin", str(path), "alice", password="correct horse\n").returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]  # no temporary file left behind
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]  # updated in place, not appended
    assert lines[0].startswith("alice:$7$50000$")
    assert "correct horse" not in path.read_text()

    deleted = _passwd_cli("-D", str(path), "bob")
    missing = _passwd_cli("-D", str(path), "carol")
    empty = _passwd_cli("--password-stdin", str(path), "dave", password="\n")
    assert deleted.returncode == 0
    assert (missing.returncode, empty.returncode) == (1, 1)
    assert "carol" in missing.stderr
    assert list(read_password_file(path)) == ["alice"]

    # Mosquitto itself accepts the file: the right password logs in, a wrong one is refused.
    with Mosquitto(tmp_path / "mq", extra_config=[f"password_file {path}"]) as mosquitto:
        port = int(mosquitto.url.rsplit(":", 1)[1])
        good = Client(port, "m-good", username="alice", password="correct horse")
        bad = Client(port, "m-bad", username="alice", password="first")
        good.close()
    assert good.accepted
    assert bad.rc not in (0, None)


def test_iotgw_passwd_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "passwd"
    answers = iter(["one", "two", "same", "same"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert main(["passwd", str(path), "alice"]) == 1  # the two entries differ
    assert not path.exists()
    assert main(["passwd", "--iterations", str(FAST), str(path), "alice"]) == 0
    assert verify_password("same", read_password_file(path)["alice"])
    assert "same" not in capsys.readouterr().err


# -- authentication ----------------------------------------------------------------------------


def test_run_on_a_non_loopback_address_without_a_password_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"  # Mosquitto 2's rule: a listener other machines reach needs authentication
    path.write_text(f'[broker]\nhost = "0.0.0.0"\nport = {free_port()}\n[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    result = iotgw("run", "--config", str(path), "--seconds", "5")
    checked = iotgw("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("broker.password_file: required when a listener binds a non-loopback address "
                                    "(broker.host = '0.0.0.0')")
    assert checked.returncode == 2
    assert checked.stdout.startswith("broker.password_file: required")
    assert not (tmp_path / "d").exists()  # nothing started


async def test_logins_and_one_log_line_per_storm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = passwd_file(tmp_path / "passwd", {"alice": "right-pass"})
    settings = BrokerSettings(port=free_port(), password_file=path)
    async with running(settings) as broker:
        good = await connect(settings.port, "dev-1", username="alice", password="right-pass")
        wrong = [await connect(settings.port, f"x-{i}", username="alice", password=f"guess-{i}") for i in range(6)]
        nobody = await connect(settings.port, "x-n", username="mallory", password="guess")
        anonymous = await connect(settings.port, "x-a")
        again = await connect(settings.port, "dev-2", username="alice", password="right-pass")
        good.close()
        again.close()
        stats = broker.security.snapshot() if broker.security else {}
    assert good.accepted
    assert again.accepted
    assert [c.rc for c in (*wrong, nobody, anonymous)] == [NOT_AUTHORIZED] * 8
    assert (stats["logins_accepted"], stats["logins_refused"]) == (2, 8)
    refusals = [r.getMessage() for r in caplog.records if "login refused" in r.getMessage()]
    assert len(refusals) == 3  # alice, mallory, anonymous: one line each, not one per attempt
    assert any("'alice' logged in after 6 refused attempt(s)" in r.getMessage() for r in caplog.records)
    assert "guess" not in caplog.text
    assert "right-pass" not in caplog.text


async def test_a_refused_client_cannot_take_over_a_session(tmp_path: Path) -> None:
    path = passwd_file(tmp_path / "passwd", {"alice": "pw"})
    settings = BrokerSettings(port=free_port(), password_file=path)
    async with running(settings) as broker:
        owner = await connect(settings.port, "dev-1", username="alice", password="pw")
        assert await owner.subscribe_async([("t/#", 1)]) == [1]
        intruder = await connect(settings.port, "dev-1", username="alice", password="nope")
        await broker.publish("t/after", b"1")
        got = await asyncio.to_thread(owner.wait_for, "t/after")
        owner.close()
    assert intruder.rc == NOT_AUTHORIZED
    assert got[-1][0] == "t/after"  # still connected, still subscribed


async def test_a_refused_connect_does_not_change_a_persistent_session(tmp_path: Path) -> None:
    """amqtt copies a CONNECT's username onto an existing session before authenticating: a refused
    CONNECT as "admin" would otherwise give the connected client admin's rights."""
    path = passwd_file(tmp_path / "passwd", {"admin": "adm", "dev": "d"})
    settings = BrokerSettings.model_validate({"port": free_port(), "password_file": str(path), "acl": [
        {"user": "admin", "topic": "#", "access": "readwrite"}, {"user": "dev", "topic": "dev/#", "access": "read"},
    ]})
    async with running(settings):
        dev = await asyncio.to_thread(Client, settings.port, "dev-1", username="dev", password="d", clean=False)
        intruder = await asyncio.to_thread(Client, settings.port, "dev-1", username="admin", password="guess",
                                           clean=False)
        codes = await dev.subscribe_async([("admin/#", 0), ("dev/#", 0)])
        dev.close()
    assert intruder.rc == NOT_AUTHORIZED
    assert codes == [0x80, 0]


async def test_demo_allows_anonymous_clients_from_loopback_only(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    settings = BrokerSettings(host="0.0.0.0", port=free_port(), allow_anonymous="loopback")  # noqa: S104
    async with running(settings):
        local = await connect(settings.port, "local")
        remote = await connect(settings.port, "remote", host=address)
        local.close()
    assert local.accepted
    assert remote.rc == NOT_AUTHORIZED


# -- ACLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "requested", "covered"), [
    ("#", "a/b", True), ("#", "#", True), ("a/#", "a", True), ("a/#", "a/+/c", True), ("a/#", "#", False),
    ("a/+", "a/b", True), ("a/+", "a/+", True), ("a/+", "a/#", False), ("a/+", "a/b/c", False),
    ("a/b", "a/+", False), ("+/b", "x/b", True), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
])
def test_filter_covers(rule: str, requested: str, covered: bool) -> None:
    assert filter_covers(rule, requested) is covered


@pytest.mark.parametrize(("topic", "pattern", "matched"), [
    ("a/b", "a/+", True), ("a", "a/#", True), ("a/b/c", "a/+", False), ("$SYS/x", "#", False), ("a/b", "a/b", True),
])
def test_topic_matches(topic: str, pattern: str, matched: bool) -> None:
    assert topic_matches(topic, pattern) is matched


def test_acl_first_match_per_action_and_fail_closed_patterns() -> None:
    acl = Acl([
        AclRule(topic="devices/%c/secret", access="deny"),
        AclRule(topic="devices/#", access="read"),
        AclRule(topic="devices/%c/#", access="write"),
        AclRule(topic="users/%u/#", access="readwrite"),
    ], None)
    assert acl.default == "deny"
    assert acl.allows("write", "devices/m-1/out", "m-1", None)  # the read rule says nothing about writing
    assert not acl.allows("write", "devices/m-2/out", "m-1", None)
    assert acl.allows("read", "devices/m-2/out", "m-1", None)
    assert not acl.allows("read", "devices/m-1/secret", "m-1", None)
    assert acl.allows("read", "devices/m-2/secret", "m-1", None)
    assert not acl.allows("read", "devices/m-2/secret", "m+", None)  # '+' in a client id: the deny covers all
    assert not acl.allows("write", "devices/m+/out", "m+", None)  # ... and the grant is void
    assert acl.allows("subscribe", "users/bob/#", "c", "bob")
    assert not acl.allows("subscribe", "users/+/#", "c", "bob")
    assert not acl.allows("read", "users/bob/x", "c", None)  # %u never matches an anonymous client
    assert Acl([], None).open


ACL = [
    {"topic": "telemetry/raw/+/+/+/%c/#", "access": "write"},
    {"user": "bob", "topic": "secret/#", "access": "deny"},
    {"user": "bob", "topic": "#", "access": "read"},
    {"user": "alice", "topic": "#", "access": "readwrite"},
]


def _acl_settings(tmp_path: Path) -> BrokerSettings:
    path = passwd_file(tmp_path / "passwd", {"alice": "a", "bob": "b", "dev": "d"})
    return BrokerSettings.model_validate({"port": free_port(), "password_file": str(path), "acl": ACL})


async def test_acl_suback_codes_retained_and_live_delivery(tmp_path: Path) -> None:
    settings = _acl_settings(tmp_path)
    async with running(settings) as broker:
        alice = await connect(settings.port, "alice-1", username="alice", password="a")
        await alice.publish_async("secret/plans", b"s", retain=True)
        await alice.publish_async("public/news", b"n", retain=True)
        bob = await connect(settings.port, "bob-1", username="bob", password="b")
        dev = await connect(settings.port, "m-1", username="dev", password="d")
        codes = await bob.subscribe_async([("public/#", 1), ("secret/#", 1), ("#", 0)])
        dev_codes = await dev.subscribe_async([("telemetry/#", 0)])
        retained = await asyncio.to_thread(bob.wait_for, "public/news")
        await alice.publish_async("secret/live", b"s")
        await alice.publish_async("public/live", b"p")
        live = await asyncio.to_thread(bob.wait_for, "public/live")
        stats = broker.security.snapshot() if broker.security else {}
        for c in (alice, bob, dev):
            c.close()
    assert codes == [1, 0x80, 0]  # the deny rule covers secret/#; '#' is granted, then filtered per message
    assert dev_codes == [0x80]  # write-only: default deny for reading
    assert ("secret/plans", b"s", True) not in retained
    assert ("public/news", b"n", True) in retained
    assert [t for t, _, _ in live if t.startswith("secret/")] == []
    assert stats["denied"]["subscribe"] == 2
    assert stats["denied"]["receive"] >= 2  # secret/plans (retained) and secret/live


async def test_acl_denied_publish_is_acknowledged_dropped_and_counted(tmp_path: Path) -> None:
    settings = _acl_settings(tmp_path)
    ingest = Ingested()
    own = "telemetry/raw/1.0/s1/meter/m-1/power"
    other = "telemetry/raw/1.0/s1/meter/m-2/power"
    async with running(settings, ingest) as broker:
        alice = await connect(settings.port, "alice-1", username="alice", password="a")
        assert await alice.subscribe_async([("#", 1)]) == [1]
        dev = await connect(settings.port, "m-1", username="dev", password="d")
        bob = await connect(settings.port, "bob-1", username="bob", password="b")
        await dev.publish_async(other, b"{}", qos=1)  # PUBACK arrives (3.1.1 cannot refuse); the message is dropped
        await bob.publish_async("public/from-bob", b"{}", qos=1)
        await dev.publish_async(own, b"{}", qos=1)
        await broker.publish("secret/internal", b"{}")  # in-process: no write check
        got = await asyncio.to_thread(alice.wait_for, "secret/internal")
        stats = broker.security.snapshot() if broker.security else {}
        for c in (alice, dev, bob):
            c.close()
    assert [t for t, _, _ in got] == [own, "secret/internal"]
    assert ingest.topics == [own, "secret/internal"]
    assert stats["denied"]["publish"] == 2


# -- TLS and WebSocket listeners -------------------------------------------------------------------


def _context(pki: dict[str, Path], *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca_pem"]))
    if with_cert:
        context.load_cert_chain(str(pki["client_pem"]), str(pki["client_key"]))
    return context


async def test_tls_ws_and_wss_listeners(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = passwd_file(tmp_path / "passwd", {"alice": "a"})
    server = {"cert_file": str(pki["server_pem"]), "key_file": str(pki["server_key"]), "ca_file": str(pki["ca_pem"])}
    tls_port, ws_port, wss_port = free_port(), free_port(), free_port()
    settings = BrokerSettings.model_validate({
        "port": free_port(), "password_file": str(path), "tls": server,
        "listeners": [
            {"type": "tls", "port": tls_port, "tls": {**server, "require_client_cert": True}},
            {"type": "ws", "port": ws_port},
            {"type": "wss", "port": wss_port},
        ],
    })
    creds = {"username": "alice", "password": "a"}
    async with running(settings) as broker:
        clients = {
            "tls": await connect(tls_port, "c-tls", context=_context(pki, with_cert=True), **creds),
            "ws": await connect(ws_port, "c-ws", transport="websockets", **creds),
            "wss": await connect(wss_port, "c-wss", transport="websockets", context=_context(pki, with_cert=False),
                                 **creds),
        }
        no_cert = await connect(tls_port, "c-nocert", context=_context(pki, with_cert=False), **creds)
        no_password = await connect(wss_port, "c-anon", transport="websockets",
                                    context=_context(pki, with_cert=False))
        for client in clients.values():
            assert await client.subscribe_async([("hello/#", 1)]) == [1]
        await clients["ws"].publish_async("hello/from-ws", b"hi")
        await broker.publish("hello/all", b"x")
        got = {name: await asyncio.to_thread(c.wait_for, "hello/all") for name, c in clients.items()}
        for client in clients.values():
            client.close()
    assert all(c.accepted for c in clients.values())
    assert not no_cert.accepted  # the handshake fails without a client certificate
    assert no_password.rc == NOT_AUTHORIZED
    for name, messages in got.items():
        assert [t for t, _, _ in messages] == ["hello/from-ws", "hello/all"], name


def test_listener_certificate_problems_name_the_field(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[broker]\nport = {free_port()}\nallow_anonymous = true\n[broker.tls]\ncert_file = "{tmp_path / "no.pem"}"\n'
        f'key_file = "{tmp_path / "no.key"}"\n[[broker.listeners]]\ntype = "tls"\nport = {free_port()}\n'
        f'[storage]\ndata_dir = "{tmp_path / "d"}"\n'
    )
    result = iotgw("run", "--config", str(config), "--seconds", "5")
    assert result.returncode == 1
    assert "broker.tls.cert_file: cannot load" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\n[[broker.listeners]]\ntype = "wss"\nport = 1\n')
    assert iotgw("check-config", str(bad)).stdout.strip() == (
        "broker: listeners[0]: type wss needs [broker.tls] or its own tls"
    )


# -- secrets ---------------------------------------------------------------------------------------


def _forward(**secret: str) -> dict[str, Any]:
    return {"name": "central", "type": "mqtt", "url": "mqtt://127.0.0.1:1", "topics": ["telemetry/#"],
            "username": "gw", **secret}


def test_secrets_from_files_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "backbone.pass"
    secret_file.write_text("from-a-file\n")
    monkeypatch.setenv("IOTGW_TEST_SECRET", "from-the-env")
    monkeypatch.delenv("IOTGW_TEST_UNSET", raising=False)
    by_file = parse_config({"forward": [_forward(password_file=str(secret_file))]}).forward[0]
    by_env = parse_config({"forward": [_forward(password_env="IOTGW_TEST_SECRET")]}).forward[0]
    assert getattr(by_file, "password").get_secret_value() == "from-a-file"  # noqa: B009  (a union member)
    assert getattr(by_env, "password").get_secret_value() == "from-the-env"  # noqa: B009
    assert "from-a-file" not in repr(by_file)

    problems = {}
    for key, value in (("password_env", "IOTGW_TEST_UNSET"), ("password_file", str(tmp_path / "missing"))):
        with pytest.raises(ConfigError) as caught:
            parse_config({"forward": [_forward(**{key: value})]})
        problems[key] = caught.value.problems
    with pytest.raises(ConfigError) as both:
        parse_config({"forward": [_forward(password="inline-secret", password_env="IOTGW_TEST_SECRET")]})
    assert problems["password_env"] == ["forward[0].password_env: environment variable IOTGW_TEST_UNSET is not set"]
    assert problems["password_file"][0].startswith(f"forward[0].password_file: cannot read {tmp_path / 'missing'}")
    assert both.value.problems == ["forward[0]: give only one of password, password_file, password_env"]
    assert "inline-secret" not in str(both.value)
    assert "from-the-env" not in str(both.value)


async def test_backbone_secret_is_used_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The gateway logs in to a real Mosquitto with a password from the environment; the password
    shows up in no log record, no check-config output and no config repr."""
    caplog.set_level(logging.DEBUG)
    secret = "Sup3r-s3cret-backbone"
    monkeypatch.setenv("IOTGW_TEST_BACKBONE", secret)
    mq_passwd = tmp_path / "mq.passwd"
    await asyncio.to_thread(subprocess.run, ["mosquitto_passwd", "-c", "-b", str(mq_passwd), "gw", secret], check=True)
    with Mosquitto(tmp_path / "mq", extra_config=[f"password_file {mq_passwd}"]) as mosquitto:
        raw = {
            "site": "s1", "gateway_id": "gw-sec", "broker": {"port": free_port(), "allow_anonymous": True},
            "storage": {"data_dir": str(tmp_path / "gw")},
            "forward": [{**_forward(password_env="IOTGW_TEST_BACKBONE"), "url": mosquitto.url,
                         "protocol": "3.1.1"}],
        }
        config = parse_config(raw)
        async with Gateway(config) as gw:
            deadline = time.monotonic() + 20
            while not gw.stats()["forward"]["destinations"]["central"]["connected"]:
                assert time.monotonic() < deadline, "the gateway did not log in to the backbone"
                await asyncio.sleep(0.1)
            shown = json.dumps(gw.stats())
    toml = tmp_path / "gw.toml"
    toml.write_text(
        'site = "s1"\n[broker]\nallow_anonymous = true\n[[forward]]\nname = "central"\ntype = "mqtt"\n'
        'url = "mqtt://127.0.0.1:1"\ntopics = ["t/#"]\npassword_env = "IOTGW_TEST_BACKBONE"\n'
    )
    checked = await asyncio.to_thread(iotgw, "check-config", str(toml))  # the environment carries the secret
    assert checked.returncode == 0, checked.stdout
    for text in (caplog.text, shown, repr(config), str(config.model_dump()), checked.stdout, checked.stderr):
        assert secret not in text
