"""Home Assistant MQTT discovery: every device and metric the gateway knows appears in a Home Assistant
on the same broker, without configuration.

For each series (device, metric) the store holds, and each one the config declares before it has reported
(a Modbus device's registers, a GATT sensor's metric: :func:`configured_series`), a retained sensor config
is published on ``<prefix>/sensor/iotgw_<gateway_id>/<device>_<metric>/config``: the valid-stage topic as
its state topic (the value read from the CloudEvent's ``data.value``), the unit, a device class and state
class where the metric and unit make one (Home Assistant's table of units per device class), the device it belongs to,
and availability tied to the gateway's retained online/offline status. New series are found every
``interval_s``; everything is published again after each (re)connection to the broker. Either broker takes
them (gateway/broker/base.py ``RetainedBroker``): the embedded one keeps them with its retained messages,
and then also the gateway's status, so a Home Assistant connected to the gateway itself sees the fleet.

A device removed from the config has its configs removed (an empty retained message each), and is not
discovered again unless it sends a reading after its removal. What was published is remembered in
``DATA_DIR/homeassistant.json``, so removals survive restarts.

:func:`sensor_config` is pure (and what the tests validate against Home Assistant's documented schema);
:class:`HomeAssistantDiscovery` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from gateway.config import BleDevice, GatewayConfig, SerialDevice
from pipeline.store import StoreError, StoreReader
from pipeline.topics import TopicFields, TopicTemplate

log = logging.getLogger(__name__)
STATE_FILE: Final = "homeassistant.json"
ORIGIN: Final = {"name": "iotgw", "sw_version": "0.1.0"}
_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9_-]+")

# Home Assistant's units per sensor device class (homeassistant/components/sensor/const.py,
# DEVICE_CLASS_UNITS), for the classes the gateway's metrics map to. A unit outside its class's set makes
# Home Assistant refuse the class: then no device class is sent.
DEVICE_CLASS_UNITS: Final[dict[str, frozenset[str | None]]] = {
    "temperature": frozenset({"°C", "°F", "K"}),
    "humidity": frozenset({"%"}),
    "moisture": frozenset({"%"}),
    "battery": frozenset({"%"}),
    "pressure": frozenset({"Pa", "hPa", "kPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi"}),
    "atmospheric_pressure": frozenset({"Pa", "hPa", "kPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi"}),
    "carbon_dioxide": frozenset({"ppm"}),
    "pm25": frozenset({"µg/m³"}),
    "pm10": frozenset({"µg/m³"}),
    "pm1": frozenset({"µg/m³"}),
    "illuminance": frozenset({"lx"}),
    "power": frozenset({"mW", "W", "kW", "MW", "GW", "TW"}),
    "apparent_power": frozenset({"mVA", "VA", "kVA"}),
    "reactive_power": frozenset({"mvar", "var", "kvar"}),
    "power_factor": frozenset({"%", None}),
    "energy": frozenset({"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh"}),
    "voltage": frozenset({"µV", "mV", "V", "kV", "MV"}),
    "current": frozenset({"mA", "A"}),
    "frequency": frozenset({"Hz", "kHz", "MHz", "GHz"}),
    "signal_strength": frozenset({"dB", "dBm"}),
    "speed": frozenset({"m/s", "km/h", "mph", "kn", "ft/s", "in/d", "in/h", "in/s", "mm/d", "mm/h", "mm/s"}),
    "distance": frozenset({"km", "m", "cm", "mm", "mi", "nmi", "yd", "in", "ft"}),
}
# Device classes whose state is a running total (DEVICE_CLASS_STATE_CLASSES); every other one is a measurement.
TOTAL_CLASSES: Final = frozenset({"energy"})

# Metric names, or words of them, -> device class (two-word names are looked for first).
_BY_NAME: Final = {
    "apparent_power": "apparent_power", "reactive_power": "reactive_power", "power_factor": "power_factor",
    "battery_voltage": "voltage", "dew_point": "temperature", "sea_pressure": "atmospheric_pressure",
    "soil_moisture": "moisture", "pm2_5": "pm25", "pm25": "pm25", "pm10": "pm10", "pm1": "pm1",
    "temperature": "temperature", "humidity": "humidity", "battery": "battery", "pressure": "pressure",
    "co2": "carbon_dioxide", "illuminance": "illuminance", "lux": "illuminance", "power": "power",
    "energy": "energy", "voltage": "voltage", "current": "current", "frequency": "frequency",
    "rssi": "signal_strength", "speed": "speed", "distance": "distance",
}


def device_class(metric: str, unit: str | None) -> str | None:
    """Home Assistant's sensor device class for a metric in ``unit`` (``switch_0_power`` in W: power), or
    None: a plain numeric sensor (no class fits, or the unit is not one Home Assistant allows for it)."""
    words = re.split(r"[_\-]+", metric.lower())
    for size in (2, 1):
        for i in range(len(words) - size + 1):
            cls = _BY_NAME.get("_".join(words[i:i + size]))
            if cls is not None:
                return cls if unit in DEVICE_CLASS_UNITS[cls] else None
    return None


def object_id(text: str) -> str:
    """A discovery topic level: letters, digits, ``_`` and ``-`` only."""
    return _UNSAFE.sub("_", text).strip("_") or "_"


@dataclass(frozen=True, slots=True)
class Series:
    """A series the gateway knows: its device, metric and unit."""

    site: str
    device_class: str
    device_id: str
    metric: str
    unit: str | None
    transport: str = ""


@dataclass(frozen=True, slots=True)
class Availability:
    topic: str
    online: str = "online"
    offline: str = "offline"


def sensor_config(series: Series, *, gateway_id: str, template: TopicTemplate, version: str, prefix: str,
                  availability: Availability) -> tuple[str, dict[str, Any]]:
    """(discovery topic, retained config) of one series as a Home Assistant MQTT sensor."""
    node = object_id(f"iotgw_{gateway_id}")
    obj = object_id(f"{series.device_id}_{series.metric}")
    state_topic = template.format(TopicFields("valid", version, series.site, series.device_class, series.device_id,
                                              series.metric))
    config: dict[str, Any] = {
        "name": series.metric.replace("_", " "),
        "unique_id": f"{node}_{obj}",
        "object_id": obj,
        "state_topic": state_topic,
        "value_template": "{{ value_json.data.value }}",
        "availability": [{"topic": availability.topic, "payload_available": availability.online,
                          "payload_not_available": availability.offline}],
        "device": {
            "identifiers": [object_id(f"iotgw_{series.site}_{series.device_id}")],
            "name": series.device_id,
            "manufacturer": "iotgw",
            "model": f"{series.device_class} ({series.transport})" if series.transport else series.device_class,
        },
        "origin": dict(ORIGIN),
    }
    if series.unit is not None:
        config["unit_of_measurement"] = series.unit
    cls = device_class(series.metric, series.unit)
    if cls is not None:
        config["device_class"] = cls
    config["state_class"] = "total_increasing" if cls in TOTAL_CLASSES else "measurement"
    return f"{prefix}/sensor/{node}/{obj}/config", config


class RetainedBroker(Protocol):
    """Where discovery goes (gateway/broker/base.py ``RetainedBroker``: the embedded broker or the external one)."""

    async def publish_retained(self, topic: str, payload: bytes) -> bool: ...


def known_series(data_dir: Path) -> tuple[list[Series], dict[str, int]]:
    """Every series in the store, and each device's last reading (ms)."""
    try:
        with StoreReader(data_dir) as store:
            devices = {d.device_id: d for d in store.devices()}
            units = {(device_id, metric): unit for device_id, metric, unit, _, _ in store.latest()}
    except StoreError:
        return [], {}
    series = [
        Series(d.site, d.device_class, d.device_id, metric, units.get((d.device_id, metric)), d.transport)
        for d in devices.values() for metric in d.metrics
    ]
    return series, {d.device_id: d.last_seen_ms for d in devices.values()}


def configured_series(config: GatewayConfig) -> list[Series]:
    """The series the config declares before any reading: a Modbus device's registers and a GATT sensor's
    metric, with their units. Other devices declare no metrics (their protocol or payload names them):
    they are discovered from their first reading."""
    series: list[Series] = []
    for device in config.devices:
        declared: list[tuple[str, str | None]] = []
        if isinstance(device, SerialDevice):
            declared = [(register.name, register.unit) for register in device.registers]
        elif isinstance(device, BleDevice) and device.metric is not None:
            declared = [(device.metric, device.unit)]
        series += [Series(config.site, config.device_class(device), device.id, metric, unit, device.transport)
                   for metric, unit in declared]
    return series


def merged(stored: list[Series], configured: list[Series]) -> list[Series]:
    """The store's series, then the configured ones it does not hold yet (the store's unit is the one
    readings carry after cleaning)."""
    seen = {(s.device_id, s.metric) for s in stored}
    return stored + [s for s in configured if (s.device_id, s.metric) not in seen]


class HomeAssistantDiscovery:
    """``run()`` until cancelled: discovery for new series, removal for devices removed from the config."""

    def __init__(self, config: GatewayConfig, broker: RetainedBroker, template: TopicTemplate) -> None:
        self._broker = broker
        self._template = template
        self._state_path = config.storage.data_dir / STATE_FILE
        self._published: dict[str, dict[str, str]] = {}  # device id -> metric -> discovery topic
        self._configured: set[str] = set()
        self._removed: dict[str, int] = {}  # device id -> when it was removed from the config (ms)
        self._lock = asyncio.Lock()
        self.published = 0
        self.removed = 0
        self._loaded = False
        self.configure(config)

    def configure(self, config: GatewayConfig) -> None:
        settings = config.homeassistant
        self._config = config
        self._prefix = settings.prefix
        self._interval_s = settings.interval_s
        self._availability = Availability(config.status_topic, config.liveness.online, config.liveness.offline)

    def _load(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(self._state_path.read_text())
            self._published = {d: dict(m) for d, m in state.get("published", {}).items()}
            self._configured = set(state.get("configured", []))
            self._removed = {d: int(t) for d, t in state.get("removed", {}).items()}

    def _save(self) -> None:
        state = {"published": self._published, "configured": sorted(self._configured), "removed": self._removed}
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self._state_path)

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:
                log.exception("Home Assistant discovery failed; trying again in %.0f s", self._interval_s)
            await asyncio.sleep(self._interval_s)

    async def republish(self) -> None:
        """After a (re)connection: every config again (a broker without persistence lost them)."""
        await self.sync(force=True)

    async def sync(self, *, force: bool = False) -> None:
        """Remove what the config removed, publish what is new (everything with ``force``)."""
        async with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True
            now_ms = int(time.time() * 1000)
            configured = {d.id for d in self._config.devices}
            for device_id in self._configured - configured:
                self._removed[device_id] = now_ms
            for device_id in configured:
                self._removed.pop(device_id, None)
            self._configured = configured
            stored, last_seen = await asyncio.to_thread(known_series, self._config.storage.data_dir)
            series = merged(stored, configured_series(self._config))
            gone = [d for d, removed_at in self._removed.items() if last_seen.get(d, 0) <= removed_at]
            for device_id in gone:
                await self._remove(device_id)
            for item in series:
                if item.device_id in gone:
                    continue
                known = self._published.get(item.device_id, {})
                if item.metric in known and not force:
                    continue
                topic, config = sensor_config(item, gateway_id=self._config.effective_gateway_id,
                                              template=self._template, version=self._config.topics.version,
                                              prefix=self._prefix, availability=self._availability)
                if await self._broker.publish_retained(topic, json.dumps(config).encode()):
                    self._published.setdefault(item.device_id, {})[item.metric] = topic
                    self.published += 1
            self._save()

    async def _remove(self, device_id: str) -> None:
        topics = self._published.get(device_id, {})
        for metric, topic in list(topics.items()):
            if not await self._broker.publish_retained(topic, b""):
                return  # not connected: again at the next pass
            del topics[metric]
            self.removed += 1
        if not topics:
            self._published.pop(device_id, None)
            log.info("Home Assistant: %s removed (no longer configured)", device_id)

    def published_topics(self) -> Iterable[str]:
        return (topic for metrics in self._published.values() for topic in metrics.values())
