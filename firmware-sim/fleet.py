"""A fleet of simulated devices described in TOML, and the registry of simulator kinds by name.

::

    site = "fleet"                 # the gateway's site (MQTT devices publish under it)
    [mqtt]                         # where MQTT devices connect (the gateway's embedded broker)
    host = "127.0.0.1"
    port = 1883

    [[device]]
    kind = "sds011"                # a registered kind: see KINDS
    id = "pm-1"
    link = "/tmp/fleet/ttyUSB-pm-1"  # serial kinds: the gateway-side path (default DIR/tty-<id>)
    interval_s = 1.0               # any other key is an option of the kind's simulator
    [device.faults]
    bad_checksum_every = 10

A kind knows how to build its simulator (an async context manager with a ``faults`` Counter) and
the ``[[devices]]`` entry a gateway needs to read it. Registering one is one line::

    register_kind("pms5003", SerialKind(Pms5003Sim))
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from firmware_sim.energy_meter import REGISTERS, EnergyMeterSim
from firmware_sim.mqtt_sensor import MqttSensorSim
from firmware_sim.pty import SocatError
from firmware_sim.serial_sensor import SERIAL_SIMS, SerialSim
from pipeline.topics import DEFAULT_TEMPLATE, DEFAULT_VERSION, TopicFields, TopicTemplate

__all__ = ["KINDS", "Fleet", "FleetDevice", "FleetError", "FleetSpec", "Kind", "load_fleet", "register_kind"]


class FleetError(ValueError):
    """A fleet file that cannot be run: one problem per line in ``problems``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Simulator(Protocol):
    @property
    def faults(self) -> Counter[str]: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> None: ...


@dataclass(frozen=True)
class FleetDevice:
    kind: str
    id: str
    link: Path | None = None
    device_class: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    faults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetEnv:
    """Where the fleet runs: a directory for serial links, the MQTT broker, the topic layout."""

    directory: Path
    site: str = "fleet"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    template: str = DEFAULT_TEMPLATE
    version: str = DEFAULT_VERSION

    def raw_topic(self, device_class: str, device_id: str, metric: str) -> str:
        return TopicTemplate(self.template).format(TopicFields(
            stage="raw", version=self.version, site=self.site, device_class=device_class, device_id=device_id,
            metric=metric))


class Kind(Protocol):
    @property
    def transport(self) -> str:
        """``serial`` kinds start before the gateway (a port must exist to be opened); ``mqtt`` after it."""
        ...

    def simulator(self, device: FleetDevice, env: FleetEnv) -> Simulator: ...

    def gateway_device(self, device: FleetDevice, env: FleetEnv) -> dict[str, Any]: ...

    def ranges(self) -> Mapping[str, tuple[float, float]]: ...


def serial_link(device: FleetDevice, env: FleetEnv) -> Path:
    return device.link or env.directory / f"tty-{device.id}"


@dataclass(frozen=True)
class SerialKind:
    sim: type[SerialSim]
    transport: str = "serial"

    def simulator(self, device: FleetDevice, env: FleetEnv) -> Simulator:
        return self.sim(serial_link(device, env), **device.options, **device.faults)

    def gateway_device(self, device: FleetDevice, env: FleetEnv) -> dict[str, Any]:
        entry = {"id": device.id, "transport": "serial", "protocol": self.sim.protocol,
                 "port": str(serial_link(device, env)), "baudrate": int(device.options.get("baudrate", 9600))}
        if "skew_limit_s" in device.faults:
            entry["max_clock_skew_s"] = float(device.faults["skew_limit_s"])
        return entry | ({"device_class": device.device_class} if device.device_class else {})

    def ranges(self) -> Mapping[str, tuple[float, float]]:
        return self.sim.RANGES


@dataclass(frozen=True)
class EnergyMeterKind:
    transport: str = "serial"
    gateway_options: tuple[str, ...] = ("poll_interval_s", "timeout_s")

    def simulator(self, device: FleetDevice, env: FleetEnv) -> Simulator:
        options = {k: v for k, v in device.options.items() if k not in self.gateway_options}
        return EnergyMeterSim(serial_link(device, env), **options, **device.faults)

    def gateway_device(self, device: FleetDevice, env: FleetEnv) -> dict[str, Any]:
        entry = {"id": device.id, "transport": "serial", "protocol": "modbus", "port": str(serial_link(device, env)),
                 "baudrate": int(device.options.get("baudrate", 9600)),
                 "unit_id": int(device.options.get("unit_id", 1)), "registers": REGISTERS}
        entry |= {k: device.options[k] for k in self.gateway_options if k in device.options}
        return entry | ({"device_class": device.device_class} if device.device_class else {})

    def ranges(self) -> Mapping[str, tuple[float, float]]:
        return EnergyMeterSim.RANGES


DEFAULT_MQTT_METRICS: dict[str, tuple[str, float]] = {"temperature": ("°C", 21.0), "humidity": ("%", 45.0)}


@dataclass(frozen=True)
class MqttKind:
    transport: str = "mqtt"

    def simulator(self, device: FleetDevice, env: FleetEnv) -> Simulator:
        options = dict(device.options)
        metrics = options.pop("metrics", DEFAULT_MQTT_METRICS)
        device_class = device.device_class or "generic"
        topics = {m: (env.raw_topic(device_class, device.id, m), str(unit), float(start))
                  for m, (unit, start) in metrics.items()}
        return MqttSensorSim(device.id, env.mqtt_host, env.mqtt_port, topics,
                             status_topic=f"status/{env.site}/{device.id}", **options, **device.faults)

    def gateway_device(self, device: FleetDevice, env: FleetEnv) -> dict[str, Any]:
        return {"id": device.id, "transport": "mqtt", "device_class": device.device_class or "generic"}

    def ranges(self) -> Mapping[str, tuple[float, float]]:
        return {}


KINDS: dict[str, Kind] = {}


def register_kind(name: str, kind: Kind) -> None:
    KINDS[name] = kind


for _name, _sim in SERIAL_SIMS.items():
    register_kind(_name, SerialKind(_sim))
register_kind("energy_meter", EnergyMeterKind())
register_kind("mqtt", MqttKind())


@dataclass(frozen=True)
class FleetSpec:
    devices: tuple[FleetDevice, ...]
    site: str = "fleet"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883

    def env(self, directory: Path, *, mqtt_port: int | None = None) -> FleetEnv:
        return FleetEnv(directory, self.site, self.mqtt_host, mqtt_port or self.mqtt_port)


_DEVICE_KEYS = {"kind", "id", "link", "device_class", "faults"}


def parse_fleet(data: Mapping[str, Any]) -> FleetSpec:
    problems: list[str] = []
    unknown = set(data) - {"site", "mqtt", "device"}
    problems += [f"{key}: unknown field" for key in sorted(unknown)]
    mqtt = data.get("mqtt", {})
    devices: list[FleetDevice] = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("device", [])):
        where = f"device[{i}]"
        kind, device_id = raw.get("kind"), raw.get("id")
        if kind not in KINDS:
            problems.append(f"{where}.kind: must be one of {', '.join(sorted(KINDS))}")
            continue
        if not isinstance(device_id, str) or not device_id:
            problems.append(f"{where}.id: required")
            continue
        if device_id in seen:
            problems.append(f"{where}.id: {device_id!r} is used twice")
        seen.add(device_id)
        faults = raw.get("faults", {})
        if not isinstance(faults, dict):
            problems.append(f"{where}.faults: must be a table")
            continue
        options = {k: v for k, v in raw.items() if k not in _DEVICE_KEYS}
        device = FleetDevice(kind, device_id, Path(raw["link"]) if "link" in raw else None,
                             raw.get("device_class"), options, faults)
        try:  # the simulator checks its own options and knobs (its constructor does no I/O)
            KINDS[kind].simulator(device, FleetEnv(Path()))
        except (TypeError, ValueError, SocatError) as exc:  # SocatError: a fault that unplugs, without socat
            problems.append(f"{where} ({device_id}): {exc}")
        devices.append(device)
    spec = FleetSpec(tuple(devices), str(data.get("site", "fleet")), str(mqtt.get("host", "127.0.0.1")),
                     int(mqtt.get("port", 1883)))
    if problems:
        raise FleetError(problems)
    return spec


def load_fleet(path: Path) -> FleetSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetError([f"{path}: cannot read ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError([f"{path}: not valid TOML ({exc})"]) from None
    return parse_fleet(data)


class Fleet:
    """The running fleet. Serial devices start first (:meth:`start_local`), network devices once the
    gateway's broker listens (:meth:`start_network`); ``async with`` starts both."""

    def __init__(self, spec: FleetSpec, env: FleetEnv, *, paused: bool = False) -> None:
        """``paused``: serial devices stay silent until :meth:`resume` (tests that count every
        fault start them once the gateway's ports are open)."""
        self.spec = spec
        self.env = env
        self.paused = paused
        self.simulators: dict[str, Simulator] = {}
        self._running: list[str] = []

    async def __aenter__(self) -> Fleet:
        try:
            await self.start_local()
            await self.start_network()
        except BaseException:  # one that cannot start (socat missing, say): stop those that did
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every simulator still running, last started first."""
        await self.stop(*reversed(self._running))

    async def stop(self, *device_ids: str) -> None:
        """Stop these simulators (unplugged, disconnected); their ``faults`` stay readable."""
        for device_id in device_ids:
            if device_id in self._running:
                self._running.remove(device_id)
                await self.simulators[device_id].__aexit__(None, None, None)

    async def _start(self, network: bool) -> None:
        for device in self.spec.devices:
            kind = KINDS[device.kind]
            if (kind.transport == "mqtt") == network and device.id not in self.simulators:
                sim = kind.simulator(device, self.env)
                await sim.__aenter__()
                if self.paused and isinstance(sim, SerialSim):
                    sim.sleeping = True  # before its firmware task first runs
                self.simulators[device.id] = sim
                self._running.append(device.id)

    async def start_local(self) -> None:
        await self._start(network=False)

    async def start_network(self, *, mqtt_host: str | None = None, mqtt_port: int | None = None) -> None:
        """Start the MQTT devices, against the broker given (e.g. the gateway's actual port)."""
        self.env = replace(self.env, mqtt_host=mqtt_host or self.env.mqtt_host,
                           mqtt_port=mqtt_port or self.env.mqtt_port)
        await self._start(network=True)

    def resume(self) -> None:
        self.paused = False
        for sim in self.simulators.values():
            if isinstance(sim, SerialSim):
                sim.sleeping = False

    def gateway_devices(self) -> list[dict[str, Any]]:
        return [KINDS[d.kind].gateway_device(d, self.env) for d in self.spec.devices]

    def ranges(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for d in self.spec.devices:
            out |= KINDS[d.kind].ranges()
        return out

    def faults(self) -> dict[str, Counter[str]]:
        return {device_id: sim.faults for device_id, sim in self.simulators.items()}


def gateway_fragment(fleet: Fleet, default_ranges: Mapping[str, tuple[float, float]]) -> str:
    """A TOML fragment for the gateway: its ``[[devices]]`` and the metric ranges
    (``[pipeline.clean.metrics]``) that catch the fleet's spikes (the defaults included: the table
    replaces them). Anonymous clients are allowed from this machine only: the simulators."""
    lines = [f"# written by iotgw sim: {len(fleet.spec.devices)} simulated device(s)",
             f"site = {_toml(fleet.env.site)}", "", "[broker]", f"port = {fleet.env.mqtt_port}",
             'allow_anonymous = "loopback"', "", "[pipeline.clean.metrics]"]
    for metric, (lo, hi) in sorted({**default_ranges, **fleet.ranges()}.items()):
        lines.append(f"{metric} = {{ min = {lo!r}, max = {hi!r} }}")
    for device in fleet.gateway_devices():
        lines += ["", "[[devices]]"]
        registers = device.pop("registers", [])
        lines += [f"{k} = {_toml(v)}" for k, v in device.items()]
        for reg in registers:
            lines += ["[[devices.registers]]", *(f"{k} = {_toml(v)}" for k, v in reg.items())]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'

