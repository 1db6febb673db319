"""Real peers for tests: Mosquitto, nats-server (JetStream) and VictoriaMetrics (the InfluxDB v2 write
API) as subprocesses on free loopback ports, each with its own directory, plus independent clients to
look at what they hold.

The servers share one lifecycle: ``start()`` (waits until ready), ``stop()`` (SIGTERM), ``kill()``
(SIGKILL: an outage that skips every shutdown path), ``restart()`` (same port, same data directory).
The binaries come from Debian packages that ``./scripts/test`` installs when missing.

Fixtures live here too; a test module imports the ones it uses::

    from peers import mosquitto_fixture, nats_server_fixture  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple, Self
from urllib.parse import urlsplit

import nats
import paho.mqtt.client as mqtt
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path.name}: absent)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name}: empty)"


class PeerError(RuntimeError):
    """A peer server did not start (or stop) as asked; the message carries its log tail."""


class _Peer:
    """A server subprocess with a fixed port and a data directory that outlives restarts."""

    binary: str = ""
    scheme: str = ""
    start_timeout = START_TIMEOUT
    own_process_group = False  # True: signals go to the whole group (a launcher script and the server it runs)

    @property
    def package(self) -> str:
        """The Debian package that installs ``binary``."""
        return self.binary

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self.starts = 0

    # -- what subclasses provide ---------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Beyond accepting TCP: is the server ready for tests? (the port is already open)"""
        return True

    def _executable(self) -> str | None:
        # Debian installs several servers in /usr/sbin, which a normal user's PATH lacks.
        return shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin:/usr/local/sbin:/sbin")

    def _env(self) -> dict[str, str] | None:
        """Environment variables the server needs beyond ours (None: ours)."""
        return None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self._port}"

    @property
    def output_path(self) -> Path:
        """The process's own stdout/stderr (errors before its log file opens land here)."""
        return self.directory / f"{self.binary}.out"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _diagnostics(self) -> str:
        return (
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}\n"
            f"--- {self.output_path} (tail) ---\n{_tail(self.output_path)}"
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        timeout = timeout if timeout is not None else self.start_timeout
        if self.running:
            raise PeerError(f"{self.binary} is already running (pid {self.pid})")
        exe = self._executable()
        if exe is None:
            pytest.fail(
                f"`{self.binary}` is not installed: run ./scripts/test once (it installs the Debian packages "
                "mosquitto, nats-server, victoria-metrics, rabbitmq-server and redis-server), or "
                f"`apt-get install -y {self.package}`",
                pytrace=False,
            )
        self._output = self.output_path.open("ab")
        env = self._env()
        self._proc = subprocess.Popen(
            [exe, *self._command()[1:]], stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT,
            cwd=self.directory, env=None if env is None else {**os.environ, **env},
            start_new_session=self.own_process_group,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise PeerError(f"{self.binary} exited with code {code} while starting\n{self._diagnostics()}")
            if self._accepts() and self._ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise PeerError(
                    f"{self.binary} was not ready on {HOST}:{self._port} within {timeout} s\n{self._diagnostics()}"
                )
            time.sleep(0.02)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((HOST, self._port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait (a clean shutdown: servers save their state). Returns the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL: the process gets no chance to save anything more."""
        return self._end(signal.SIGKILL, STOP_TIMEOUT)

    def restart(self, timeout: float | None = None) -> None:
        """Stop if running, then start again on the same port with the same data directory."""
        if self.running:
            self.stop()
        self.start(timeout)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(proc, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
                self._reap()
                raise PeerError(
                    f"{self.binary} ignored signal {sig} for {timeout} s (killed)\n{self._diagnostics()}"
                ) from None
        code = proc.returncode
        self._reap()
        return code

    def _signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        if self.own_process_group and sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the server too, not only the script that started it
        else:
            proc.send_signal(sig)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
        self._proc = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def close(self) -> None:
        """Stop, and kill when a clean stop fails: always leaves no process behind."""
        try:
            self.stop()
        except PeerError:
            pass
        finally:
            if self._proc is not None:
                self.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} dir={self.directory} pid={self.pid}>"


class Mosquitto(_Peer):
    """``mosquitto -c DIR/mosquitto.conf`` with persistence (autosave every second) in DIR."""

    binary = "mosquitto"
    scheme = "mqtt"

    def __init__(self, directory: Path, port: int | None = None, extra_config: Sequence[str] = ()) -> None:
        super().__init__(directory, port)
        self.extra_config = list(extra_config)

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def persistence_path(self) -> Path:
        return self.directory / "mosquitto.db"

    def _db_state(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.persistence_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def wait_persisted(self, timeout: float = 5.0) -> None:
        """Wait for the next autosave of the database: then everything the broker had acknowledged
        before this call survives ``kill()``. (``autosave_interval 1`` saves when the whole-second clock
        is 2 s past the last save: up to ~2 s from now.)"""
        before = self._db_state()
        deadline = time.monotonic() + timeout
        while self._db_state() == before:
            if not self.running:
                raise PeerError(f"mosquitto is not running\n{self._diagnostics()}")
            if time.monotonic() > deadline:
                raise PeerError(f"mosquitto did not save {self.persistence_path} within {timeout} s")
            time.sleep(0.02)

    def config_text(self) -> str:
        lines = [
            f"listener {self._port} {HOST}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.directory}/",  # the trailing slash is required
            "autosave_interval 1",  # the default (30 min) loses queued messages on kill -9
            f"log_dest file {self.log_path}",  # stdout is block-buffered
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 1000000",  # a persistent session keeps everything through an outage
            "max_queued_bytes 0",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto, who cannot write DIR
        return "\n".join([*lines, *self.extra_config, ""])

    def _command(self) -> list[str]:
        self.config_path.write_text(self.config_text())
        return [self.binary, "-c", str(self.config_path)]


class NatsServer(_Peer):
    """``nats-server -a 127.0.0.1 -p PORT -js -sd DIR/jetstream`` with a monitor port for readiness."""

    binary = "nats-server"
    scheme = "nats"

    def __init__(
        self, directory: Path, port: int | None = None, monitor_port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(directory, port)
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self.extra_args = list(extra_args)

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    @property
    def store_dir(self) -> Path:
        return self.directory / "store"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    def _command(self) -> list[str]:
        return [
            self.binary, "-a", HOST, "-p", str(self._port), "-js", "-sd", str(self.store_dir),
            "-m", str(self.monitor_port), "-n", f"iotgw-test-{self._port}", "-l", str(self.log_path),
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        # /healthz answers 200 only once JetStream is up and its streams are recovered.
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:  # noqa: S310
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False


class VictoriaMetrics(_Peer):
    """``victoria-metrics -httpListenAddr=127.0.0.1:PORT -storageDataPath=DIR/data -retentionPeriod=100y``:
    a real server of the InfluxDB v2 write API (``/api/v2/write``), read back through its export API.
    It does not check org, bucket or token, stores millisecond timestamps, answers 204 even for
    malformed lines, and keeps recent points in memory: :meth:`force_flush` before a ``kill()``."""

    binary = "victoria-metrics"
    scheme = "http"

    @property
    def log_path(self) -> Path:
        return self.output_path  # it logs to stderr

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def _command(self) -> list[str]:
        return [
            self.binary, f"-httpListenAddr={HOST}:{self._port}", f"-storageDataPath={self.data_dir}",
            "-retentionPeriod=100y",  # test points may carry any timestamp
            "-loggerLevel=WARN",
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:  # noqa: S310
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def force_flush(self) -> None:
        """Make every point it acknowledged searchable (and durable)."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10) as resp:  # noqa: S310
            assert int(resp.status) == 200

    def export(self, match: str = '{__name__=~".+"}') -> list[ExportedSeries]:
        """Every series matching ``match`` (after a flush): name, labels, values, timestamps (ms)."""
        self.force_flush()
        body = urllib.parse.urlencode({"match[]": match}).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/export", data=body, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            lines = resp.read().decode().splitlines()
        out = []
        for line in lines:
            item = json.loads(line)
            labels = dict(item["metric"])
            name = labels.pop("__name__")
            out.append(ExportedSeries(name, labels, [float(v) for v in item["values"]],
                                      [int(t) for t in item["timestamps"]]))
        return out


class RabbitMq(_Peer):
    """A RabbitMQ node of its own (Debian's rabbitmq-server 3.10): node name, AMQP and distribution ports,
    database, logs, config and Erlang cookie all under DIR, no plugins. It runs through Debian's launcher
    script, which forwards SIGTERM to the Erlang VM for a clean stop; ``kill()`` SIGKILLs the whole
    process group (the VM included). Starting takes a few seconds. Users: guest/guest (loopback)."""

    binary = "rabbitmq-server"
    scheme = "amqp"
    own_process_group = True
    start_timeout = 60.0  # an Erlang VM and a broker boot: ~5 s idle, much more on a loaded machine
    LAUNCHER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the package's /usr/sbin one switches to user rabbitmq

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory, port)
        self.dist_port = free_port()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self._port}/"

    @property
    def nodename(self) -> str:
        return f"iotgw-test-{self._port}@localhost"

    @property
    def log_path(self) -> Path:
        return self.directory / "log" / f"{self.nodename}.log"

    def _executable(self) -> str | None:
        return self.LAUNCHER if Path(self.LAUNCHER).exists() else None

    def _env(self) -> dict[str, str]:
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq.conf").write_text("log.console = false\nlog.file.level = info\n")
        return {
            "RABBITMQ_NODENAME": self.nodename, "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self._port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"), "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"), "RABBITMQ_PID_FILE": str(self.directory / "pid"),
            "HOME": str(self.directory),  # the Erlang cookie
        }

    def _command(self) -> list[str]:
        return [self.binary]

    def _ready(self) -> bool:
        """The AMQP listener answers a protocol header with Connection.Start (a method frame)."""
        try:
            with socket.create_connection((HOST, self._port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return sock.recv(1)[:1] == b"\x01"
        except OSError:
            return False


class RedisServer(_Peer):
    """``redis-server --port PORT --appendonly yes --appendfsync always --dir DIR`` (Debian's 7.0): every
    acknowledged write is on disk, so even ``kill()`` loses nothing it answered."""

    binary = "redis-server"
    scheme = "redis"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def _command(self) -> list[str]:
        return [
            self.binary, "--port", str(self._port), "--bind", HOST, "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(self.directory), "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]


class ExportedSeries(NamedTuple):
    name: str  # measurement_field
    labels: dict[str, str]  # the tags
    values: list[float]
    timestamps: list[int]  # milliseconds


def _broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or parts.hostname is None:
        raise ValueError(f"not an mqtt:// URL: {url!r}")
    return parts.hostname, parts.port or 1883


class Received(NamedTuple):
    topic: str
    payload: bytes
    user_properties: dict[str, str]


class MqttCollector:
    """An independent paho client (own thread) that records every message on ``topics``.

    It connects with a fixed client id and a persistent session (``clean_session=False``; with MQTT 5,
    ``clean_start=False`` and a long session expiry), subscribing at QoS 1: the broker queues for it while
    it is away, including across a broker restart when the broker persists. Redeliveries (DUP) are recorded
    as they come; dedupe in the test if it matters.
    """

    def __init__(
        self, url: str, topics: Sequence[str], *, client_id: str = "iotgw-test-collector",
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311, timeout: float = 10.0,
    ) -> None:
        self.topics = list(topics)
        self.client_id = client_id
        self.protocol = protocol
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.session_present: bool | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            clean_session=None if protocol == MQTTProtocolVersion.MQTTv5 else False,
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        host, port = _broker_address(url)
        if protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
            self.client.connect(host, port, clean_start=False, properties=props)
        else:
            self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise AssertionError(f"collector {client_id} could not subscribe to {self.topics} on {url}")

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            return
        self.session_present = flags.session_present
        client.subscribe([(t, 1) for t in self.topics])  # again after every reconnect: harmless

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        user: dict[str, str] = {}
        props = getattr(msg, "properties", None)
        if self.protocol == MQTTProtocolVersion.MQTTv5 and props is not None:
            user = {str(k): str(v) for k, v in getattr(props, "UserProperty", [])}
        with self._cond:
            self._messages.append(Received(msg.topic, bytes(msg.payload), user))
            self._cond.notify_all()

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` messages arrived; return them all (AssertionError on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise AssertionError(
                    f"collector {self.client_id}: {len(self._messages)} of {count} messages within {timeout} s: "
                    f"{[m.topic for m in self._messages][:20]}"
                )
            return list(self._messages)

    def close(self) -> None:
        """Disconnect cleanly: the broker keeps the session (and queues for it) until it comes back."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def mqtt_publish(
    url: str, messages: Sequence[tuple[str, bytes | str]], *, qos: int = 1, client_id: str = "iotgw-test-publisher",
    timeout: float = 10.0,
) -> None:
    """Publish and wait until the broker acknowledged each message (QoS 1/2) or it was sent (QoS 0)."""
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_connect = lambda *_: connected.set()
    host, port = _broker_address(url)
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise AssertionError(f"publisher could not connect to {url}")
        infos = [client.publish(topic, payload, qos=qos) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            if not info.is_published():
                raise AssertionError(f"{url} did not acknowledge message {info.mid} within {timeout} s")
    finally:
        client.disconnect()
        client.loop_stop()


class StoredMessage(NamedTuple):
    subject: str
    data: bytes
    headers: dict[str, str]


async def jetstream_messages(
    url: str, stream: str, subject_filter: str | None = None, timeout: float = 5.0
) -> list[StoredMessage]:
    """Everything ``stream`` holds (matching ``subject_filter``), oldest first, through an ephemeral pull
    consumer that acknowledges nothing (the stream is left exactly as it was)."""
    nc = await nats.connect(url, connect_timeout=timeout, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=timeout)
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1,
            inactive_threshold=30.0,
        )
        sub = await js.pull_subscribe(subject_filter or "", stream=stream, config=config)
        pending = (await sub.consumer_info()).num_pending or 0
        out: list[StoredMessage] = []
        async with asyncio.timeout(timeout):
            while len(out) < pending:
                batch = await sub.fetch(min(pending - len(out), 1000), timeout=timeout)
                out += [StoredMessage(m.subject, m.data, dict(m.headers or {})) for m in batch]
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


class AmqpMessage(NamedTuple):
    routing_key: str
    body: bytes
    message_id: str | None
    content_type: str | None
    message_type: str | None
    headers: dict[str, Any]


async def amqp_messages(url: str, queue: str, timeout: float = 10.0) -> list[AmqpMessage]:
    """Everything waiting in ``queue``, oldest first (taken off the queue)."""
    import aiormq  # noqa: PLC0415  only the RabbitMQ tests need it

    async with asyncio.timeout(timeout), aiormq.connect(url) as connection:
        channel = await connection.channel()
        out: list[AmqpMessage] = []
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty
                return out
            p = message.header.properties
            out.append(AmqpMessage(message.routing_key or "", message.body, p.message_id, p.content_type,
                                   p.message_type, dict(p.headers or {})))


async def amqp_publish(url: str, exchange: str, messages: Sequence[tuple[str, bytes]], timeout: float = 10.0) -> None:
    """Publish to ``exchange`` (routing key, body) with publisher confirms, as a backbone application would."""
    import aiormq  # noqa: PLC0415  only the RabbitMQ tests need it

    async with asyncio.timeout(timeout), aiormq.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for key, body in messages:
            await channel.basic_publish(body, exchange=exchange, routing_key=key)


# -- fixtures (function scope: a fresh server, port and directory per test) ----------------------


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    server = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(name="victoria_metrics")
def victoria_metrics_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with VictoriaMetrics(tmp_path_factory.mktemp("victoria-metrics")) as server:
        yield server


@pytest.fixture(name="nats_server")
def nats_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(name="rabbitmq")
def rabbitmq_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMq]:
    with RabbitMq(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
