"""``[[devices]]`` (serial, Modbus, BLE and MQTT devices, by ``transport``) and ``[ble]``, the scanner
they share."""

from __future__ import annotations

import itertools
import re
import struct
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.settings import Level, Model

BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400)
_MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


class _Device(Model):
    id: Level
    device_class: Level | None = None


class ModbusRegister(Model):
    """One value of a Modbus device: ``[[devices.registers]]``."""

    name: Level = Field(description="the metric")
    address: int = Field(ge=0, le=65535)
    kind: Literal["holding", "input"] = "holding"
    type: Literal["uint16", "int16", "uint32", "int32", "float32"] = "uint16"
    word_order: Literal["big", "little"] = Field(default="big", description="of 32-bit values: high word first")
    scale: float = Field(default=1.0, allow_inf_nan=False, description="value = raw * scale")
    unit: str | None = None

    @property
    def end(self) -> int:
        """One past its last register."""
        return self.address + (1 if self.type in ("uint16", "int16") else 2)


MODBUS_ONLY = ("unit_id", "poll_interval_s", "timeout_s")


class SerialDevice(_Device):
    transport: Literal["serial"]
    port: str = Field(min_length=1, description="prefer a stable /dev/serial/by-id/... path")
    protocol: Literal["sds011", "pms5003", "nmea", "jsonlines", "kv", "modbus"]
    baudrate: int = 9600
    max_clock_skew_s: float = Field(default=5.0, gt=0, description="device clock vs gateway: counted as clock_skew")
    # Modbus RTU (protocol = "modbus") only:
    unit_id: int = Field(default=1, ge=1, le=247)
    poll_interval_s: float = Field(default=5.0, gt=0, le=86400)
    timeout_s: float = Field(default=1.0, gt=0, le=60, description="for each reply")
    registers: list[ModbusRegister] = Field(default_factory=list, validate_default=True)

    @field_validator("baudrate")
    @classmethod
    def _baud(cls, value: int) -> int:
        if value not in BAUDRATES:
            raise ValueError(f"must be one of {', '.join(map(str, BAUDRATES))}")
        return value

    @field_validator(*MODBUS_ONLY)
    @classmethod
    def _modbus_only(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("protocol", "modbus") != "modbus":
            raise ValueError('only for protocol = "modbus"')
        return value

    @field_validator("registers")
    @classmethod
    def _registers(cls, value: list[ModbusRegister], info: ValidationInfo) -> list[ModbusRegister]:
        protocol = info.data.get("protocol")
        if protocol is None:
            return value  # the protocol itself is wrong: that error is enough
        if protocol != "modbus":
            if value:
                raise ValueError('only for protocol = "modbus"')
            return value
        if not value:
            raise ValueError("a modbus device needs at least one [[devices.registers]]")
        problems: list[str] = []
        names: dict[str, int] = {}
        for i, reg in enumerate(value):
            if reg.name in names:
                problems.append(f"[{i}].name {reg.name!r} is also registers[{names[reg.name]}]")
            names.setdefault(reg.name, i)
            if reg.end > 65536:
                problems.append(f"[{i}] runs past address 65535")
        for kind in ("holding", "input"):
            regs = sorted(((r.address, r.end, i) for i, r in enumerate(value) if r.kind == kind))
            for (_, end_a, a), (start_b, _, b) in itertools.pairwise(regs):
                if start_b < end_a:
                    problems.append(f"[{b}] ({kind} {value[b].address}) overlaps registers[{a}] ({value[a].name})")
        if problems:
            raise ValueError("; ".join(problems))
        return value


class BleDevice(_Device):
    transport: Literal["ble"]
    address: str
    protocol: Literal["bthome", "ruuvi", "atc", "gatt"]
    bindkey: str | None = Field(default=None, description="32 hex digits for encrypted BTHome")
    # protocol = "gatt": a connectable sensor, one characteristic read or subscribed through BleakClient
    characteristic: str | None = Field(default=None, description="gatt: the characteristic's UUID")
    mode: Literal["poll", "notify"] = "poll"
    poll_interval_s: float = Field(default=30.0, gt=0, le=86_400)
    metric: Level | None = Field(default=None, description="gatt: the metric its value is")
    unit: str | None = None
    value_format: str = Field(default="<h", description="gatt: struct format of the value, e.g. <h, <H, <i, <f")
    scale: float = Field(default=1.0, description="gatt: value = raw * scale + offset")
    offset: float = 0.0

    def log_secrets(self) -> list[str]:
        """The BTHome bindkey decrypts the sensor's advertisements: never in a log (gateway/ops/logs.py)."""
        return [self.bindkey] if self.bindkey else []

    @field_validator("address")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.upper()
        if not _MAC.fullmatch(value):
            raise ValueError("must be a MAC address like A4:C1:38:00:00:01")
        return value

    @field_validator("characteristic")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if re.fullmatch(r"[0-9a-f]{4}", value):
            value = f"0000{value}-0000-1000-8000-00805f9b34fb"
        if not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", value):
            raise ValueError("must be a UUID, 128-bit (0000xxxx-0000-1000-8000-00805f9b34fb) or 16-bit (2a6e)")
        return value

    @field_validator("value_format")
    @classmethod
    def _struct(cls, value: str) -> str:
        try:
            size = len(struct.unpack(value, bytes(struct.calcsize(value))))
        except struct.error as exc:
            raise ValueError(f"not a struct format: {exc}") from None
        if size != 1 or value[-1] in "sp?":
            raise ValueError("must hold exactly one number, e.g. <h, <H, <i, <f")
        return value

    @model_validator(mode="after")
    def _gatt(self) -> BleDevice:
        if self.protocol == "gatt":
            missing = [name for name in ("characteristic", "metric") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)}: required with protocol gatt")
        elif self.characteristic is not None or self.metric is not None:
            raise ValueError("characteristic, metric: only protocol gatt takes them")
        return self

    @field_validator("bindkey")
    @classmethod
    def _key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("protocol", "bthome") != "bthome":
            raise ValueError(f"only protocol bthome takes a bindkey, not {info.data['protocol']}")
        if value is not None and not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
            raise ValueError("must be 32 hexadecimal digits (a 128-bit key)")
        return value


class MqttDevice(_Device):
    transport: Literal["mqtt"]


Device = Annotated[SerialDevice | BleDevice | MqttDevice, Field(discriminator="transport")]
TRANSPORTS = ("serial", "ble", "mqtt")
DEFAULT_DEVICE_CLASS = {"serial": "particulate", "ble": "environment", "mqtt": "generic"}

class BleSettings(Model):
    backend: Literal["bleak", "simulated"] = "bleak"
    scanning: Literal["passive", "active"] = Field(
        default="passive", description="passive falls back to active where BlueZ refuses it"
    )
    adapter: str | None = Field(default=None, description="e.g. hci0; default: BlueZ's first adapter")
    watchdog_s: float = Field(
        default=60.0, ge=0, description="restart the scanner after this long without any advertisement; 0: off"
    )
