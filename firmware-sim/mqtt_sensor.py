"""A simulated MQTT-native device: paho-mqtt over TCP, QoS 1, a last will, automatic reconnect.

It publishes the raw-stage JSON contract: ``{"value", "unit", "ts", "seq"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
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
        seed: int | None = None,
    ) -> None:
        """``topics`` maps each metric to (topic, unit, starting value)."""
        self.device_id = device_id
        self.topics = dict(topics)
        self.interval_s = interval_s
        self.spike_every = spike_every
        self.status_topic = status_topic
        self._host, self._port = host, port
        self._rng = random.Random(seed)
        self._values = {metric: start for metric, (_, _, start) in self.topics.items()}
        self._task: asyncio.Task[None] | None = None
        self.seq = 0
        self.acked = 0
        self.spikes_sent = 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{device_id}", protocol=mqtt.MQTTv311
        )
        self._client.will_set(status_topic, b"offline", qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._client.on_publish = self._on_publish

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        self.acked += 1

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
        while self.acked < self.seq and time.monotonic() < deadline:  # noqa: ASYNC110 - paho's thread sets it
            await asyncio.sleep(0.02)
        self._client.publish(self.status_topic, b"offline", qos=1, retain=True)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    async def _firmware(self) -> None:
        while not self._client.is_connected():  # noqa: ASYNC110 - paho's thread connects
            await asyncio.sleep(0.05)
        self._client.publish(self.status_topic, b"online", qos=1, retain=True)
        while True:
            for metric, (topic, unit, _) in self.topics.items():
                self.seq += 1
                value = self._values[metric] = round(self._values[metric] + self._rng.uniform(-0.5, 0.5), 2)
                if self.spike_every and self.seq % self.spike_every == 0:
                    value = 1e6  # a glitch the clean stage must catch
                    self.spikes_sent += 1
                body = {"value": value, "unit": unit, "ts": round(time.time(), 3), "seq": self.seq}
                self._client.publish(topic, json.dumps(body), qos=1)
            await asyncio.sleep(self.interval_s)
