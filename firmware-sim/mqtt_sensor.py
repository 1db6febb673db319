"""A simulated MQTT-native device: paho-mqtt over TCP, QoS 1, a last will, automatic reconnect.

It publishes the raw-stage JSON contract: ``{"value", "unit", "ts", "seq"}``. Fault knobs (0 = off,
counted per message in ``faults``): ``spike_every`` (a value of 1e6: the clean stage rejects it as
``out_of_range``), ``bad_json_every`` (a payload that is not JSON: ``invalid_json``),
``stuck_every`` (values freeze for ``stuck_for`` rounds), ``clock_drift_s`` (the ``ts`` gains this
much per round), ``disconnect_every`` (after every N rounds the TCP connection is dropped without
a DISCONNECT, so the broker publishes the last will; paho reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class MqttSensorSim:
    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        topics: Mapping[str, tuple[str, str, float]],
        *,
        status_topic: str,
        interval_s: float = 1.0,
        spike_every: int = 0,
        bad_json_every: int = 0,
        stuck_every: int = 0,
        stuck_for: int = 3,
        clock_drift_s: float = 0.0,
        disconnect_every: int = 0,
        seed: int | None = None,
    ) -> None:
        """``topics`` maps each metric to (topic, unit, starting value)."""
        self.device_id = device_id
        self.topics = dict(topics)
        self.interval_s = interval_s
        self.spike_every = spike_every
        self.bad_json_every = bad_json_every
        self.stuck_every, self.stuck_for = stuck_every, stuck_for
        self.clock_drift_s = clock_drift_s
        self.disconnect_every = disconnect_every
        self.faults: Counter[str] = Counter()
        self.history: list[tuple[str, float]] = []  # (metric, value) of each valid reading published
        self.status_topic = status_topic
        self._host, self._port = host, port
        self._rng = random.Random(seed)
        self._values = {metric: start for metric, (_, _, start) in self.topics.items()}
        self._task: asyncio.Task[None] | None = None
        self.seq = 0
        self.acked = 0
        self._lock = threading.Lock()
        self._sent_mids: set[int] = set()
        self._acked_mids: set[int] = set()
        self.spikes_sent = 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{device_id}", protocol=mqtt.MQTTv311
        )
        self._client.will_set(status_topic, b"offline", qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._client.on_publish = self._on_publish

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        with self._lock:
            self.acked += 1
            self._acked_mids.add(mid)

    def _send(self, topic: str, payload: bytes | str) -> None:
        """A QoS 1 reading; :attr:`unacked` counts those not acknowledged yet."""
        info = self._client.publish(topic, payload, qos=1)
        with self._lock:
            self._sent_mids.add(info.mid)

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._sent_mids - self._acked_mids)

    async def __aenter__(self) -> Self:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()
        self._task = asyncio.create_task(self._firmware(), name=f"sim-mqtt-{self.device_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = time.monotonic() + 2.0  # let in-flight QoS 1 messages be acknowledged
        while self.unacked and time.monotonic() < deadline:  # noqa: ASYNC110 - paho's thread sets it
            await asyncio.sleep(0.02)
        self._client.publish(self.status_topic, b"offline", qos=1, retain=True)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    async def _firmware(self) -> None:
        while not self._client.is_connected():  # noqa: ASYNC110 - paho's thread connects
            await asyncio.sleep(0.05)
        self._client.publish(self.status_topic, b"online", qos=1, retain=True)
        rounds, stuck_left, drift = 0, 0, 0.0
        while True:
            rounds += 1
            drift += self.clock_drift_s
            if stuck_left:
                stuck_left -= 1
            elif self.stuck_every and rounds % self.stuck_every == 0:
                self.faults["stuck"] += 1
                stuck_left = self.stuck_for - 1
            for metric, (topic, unit, _) in self.topics.items():
                self.seq += 1
                if not stuck_left:
                    self._values[metric] = round(self._values[metric] + self._rng.uniform(-0.5, 0.5), 2)
                value = self._values[metric]
                if self.bad_json_every and self.seq % self.bad_json_every == 0:
                    self.faults["bad_json"] += 1
                    self._send(topic, b'{"value": 1, "unit": ')  # cut short
                    continue
                if self.spike_every and self.seq % self.spike_every == 0:
                    value = 1e6  # a glitch the clean stage must catch
                    self.spikes_sent += 1
                    self.faults["spike"] += 1
                else:
                    self.history.append((metric, value))
                body = {"value": value, "unit": unit, "ts": round(time.time() + drift, 3), "seq": self.seq}
                self._send(topic, json.dumps(body))
            if self.disconnect_every and rounds % self.disconnect_every == 0:
                await self._drop_connection()
            await asyncio.sleep(self.interval_s)

    async def _drop_connection(self) -> None:
        """Lose the TCP connection without a DISCONNECT (a power cut, a Wi-Fi drop)."""
        while self.unacked:  # noqa: ASYNC110 - paho's thread acknowledges; QoS 1 in flight first
            await asyncio.sleep(0.02)
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            return
        self.faults["disconnect"] += 1
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # paho notices, the broker sees the connection die
        while self._client.is_connected():  # noqa: ASYNC110 - paho's thread notices
            await asyncio.sleep(0.02)
        while not self._client.is_connected():  # noqa: ASYNC110 - and reconnects by itself
            await asyncio.sleep(0.05)
        sock.close()  # paho has let go of it (closing twice is harmless)
        self._client.publish(self.status_topic, b"online", qos=1, retain=True)
