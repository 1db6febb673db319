"""BTHome v2 advertisement decoding, through the ``bthome-ble`` library.

A BLE backend hands each advertisement to the driver as an
:class:`Advertisement`; the driver keeps one :class:`BTHomeDecoder` per device
address and calls :meth:`BTHomeDecoder.decode`, which returns

* ``None`` when the advertisement carries no BTHome service data at all;
* a :class:`BTHomeReading` with the decoded measurements;
* a :class:`~drivers.reading.FrameError` for BTHome data that cannot be
  used.  Reasons: ``truncated`` (empty service data, or an encrypted payload
  too short to hold counter and MIC), ``unsupported`` (BTHome v1 UUIDs or a
  version other than 2 in the device-info byte), ``no_bindkey`` (encrypted,
  no key configured), ``downgrade`` (plaintext from a device whose bindkey is
  configured -- refused, as the library does), ``decrypt_failed`` (wrong key,
  corrupted data, or an address that is not a MAC so no nonce can be built),
  ``replayed`` (encryption counter went backwards), ``decode_failed`` (no
  object could be decoded, or the library raised).

Library usage: one ``BTHomeBluetoothDeviceData`` per decoder, fed with a
``habluetooth.BluetoothServiceInfoBleak`` built per advertisement (the plain
``BluetoothServiceInfo`` has no ``time`` slot, which the parser reads).  The
library keeps per-device state; this module relies on it only for the
encryption-counter replay protection.  Its packet-id de-duplication is
switched off (``packet_id`` is reset before each call), so every
advertisement is decoded on its own -- de-duplicate on
:attr:`BTHomeReading.packet_id` if needed.  Its ``update()`` result
accumulates entity values across calls, so the per-call "updates" dicts are
cleared before each call (private attributes of ``sensor_state_data``; a
test pins this behaviour, and :class:`BTHomeDecoder` falls back to a fresh
library object per call, carrying the replay state over, if they vanish).

Events (button presses, dimmer turns) and non-numeric sensors (text, raw,
timestamp) are not measurements and are left out; binary sensors become
``0.0``/``1.0`` with unit ``None``.  The library's ``signal_strength`` and
``packet_id`` entities go to :attr:`BTHomeReading.rssi` and
:attr:`BTHomeReading.packet_id` instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from bleak.backends.device import BLEDevice
from bthome_ble import BTHomeBluetoothDeviceData
from habluetooth import BluetoothServiceInfoBleak
from sensor_state_data import BaseDeviceClass, SensorDeviceClass, SensorUpdate

from drivers.ble.advert import Advertisement
from drivers.reading import FrameError, Measurement

__all__ = [
    "BTHOME_UUID",
    "Advertisement",
    "BTHomeDecoder",
    "BTHomeReading",
]

BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
"""Service-data UUID of BTHome v2 (16-bit 0xFCD2)."""

_BTHOME_V1_UUIDS = frozenset({"0000181c-0000-1000-8000-00805f9b34fb", "0000181e-0000-1000-8000-00805f9b34fb"})

_FLAG_ENCRYPTED = 0x01
_FLAG_MAC_INCLUDED = 0x02
_BTHOME_VERSION = 2
_MAC_LEN = 6
# An encrypted payload holds at least 2 bytes of ciphertext (the library's
# minimum), a 4-byte counter and a 4-byte MIC.
_MIN_ENCRYPTED = 2 + 4 + 4
# The library refuses a counter that went backwards only at/above this value
# (lower values are taken as a device reset).
_REPLAY_FLOOR = 100

_SOURCE = "iotgw"

# Library device-class names that differ from the gateway's metric names.
_METRIC_ALIASES: dict[str, str] = {
    "pm25": "pm2_5",
    "carbon_dioxide": "co2",
}
_SIGNAL_STRENGTH = SensorDeviceClass.SIGNAL_STRENGTH.value
_PACKET_ID = SensorDeviceClass.PACKET_ID.value

# Per-call "updates" dicts of sensor_state_data.SensorData that update() never
# clears (it only clears the events one).
_UPDATE_DICTS = (
    "_sensor_descriptions_updates",
    "_sensor_values_updates",
    "_binary_sensor_descriptions_updates",
    "_binary_sensor_values_updates",
)


@dataclass(frozen=True, slots=True)
class BTHomeReading:
    """The measurements decoded from one BTHome advertisement."""

    address: str
    packet_id: int | None
    measurements: tuple[Measurement, ...]
    rssi: int
    encrypted: bool


def _normalise_unit(unit: str | None) -> str | None:
    """A library unit as a plain ``str`` with one spelling per unit
    (micro sign U+00B5, ``°C`` rather than the ``℃`` ligature)."""
    if unit is None:
        return None
    text = str(unit)  # Units is a str enum; keep only the text
    return text.replace("\u03bc", "\u00b5").replace("\u2103", "°C").replace("\u2109", "°F")


def _metric_name(device_class: str, key: str) -> str:
    """The gateway metric for a library entity ``key`` of ``device_class``
    (the key is the device class plus ``_<n>`` when a payload repeats it)."""
    suffix = key[len(device_class) :] if key.startswith(device_class) else ""
    return _METRIC_ALIASES.get(device_class, device_class) + suffix


def _find_payload(service_data: Mapping[str, bytes]) -> bytes | None:
    payload = service_data.get(BTHOME_UUID)
    if payload is None and service_data:
        for uuid, data in service_data.items():
            if isinstance(uuid, str) and uuid.lower() == BTHOME_UUID:
                return bytes(data)
        return None
    return None if payload is None else bytes(payload)


def _is_v1(service_data: Mapping[str, bytes]) -> bool:
    return any(isinstance(u, str) and u.lower() in _BTHOME_V1_UUIDS for u in service_data)


def _mac_from_address(address: str) -> bytes | None:
    try:
        raw = bytes.fromhex(address.replace(":", ""))
    except ValueError:
        return None
    return raw if len(raw) == _MAC_LEN else None


class BTHomeDecoder:
    """Decoder for the advertisements of one BTHome device.

    ``bindkey`` is the device's 16-byte AES key, if it encrypts.  Raises
    ``ValueError`` at construction for a key of the wrong length; ``decode``
    never raises.
    """

    __slots__ = ("_bindkey", "_ble_device", "_lib", "_reuse_lib")

    def __init__(self, bindkey: bytes | None = None) -> None:
        if bindkey is not None and len(bindkey) != 16:  # AES-128 only in BTHome
            raise ValueError(f"a BTHome bindkey is 16 bytes, got {len(bindkey)}")
        self._bindkey = bindkey
        self._lib = BTHomeBluetoothDeviceData(bindkey=bindkey)
        self._reuse_lib = all(hasattr(self._lib, name) for name in _UPDATE_DICTS)
        self._ble_device: BLEDevice | None = None

    def decode(self, adv: Advertisement) -> BTHomeReading | FrameError | None:
        """Decode one advertisement; see the module docstring."""
        try:
            return self._decode(adv)
        except Exception as exc:  # third-party parser: bad data must not escape
            return FrameError("decode_failed", f"{type(exc).__name__}: {exc}")

    def _decode(self, adv: Advertisement) -> BTHomeReading | FrameError | None:
        payload = _find_payload(adv.service_data)
        if payload is None:
            if _is_v1(adv.service_data):
                return FrameError("unsupported", "BTHome v1")
            return None
        error = self._precheck(adv, payload)
        if error is not None:
            return error
        encrypted = bool(payload[0] & _FLAG_ENCRYPTED)
        lib = self._prepare_lib()
        update = lib.update(self._service_info(adv, payload))
        if encrypted and lib.decryption_failed:
            return FrameError("decrypt_failed", "MIC mismatch: wrong bindkey or corrupted")
        measurements, decoded_any = _measurements(update)
        if not decoded_any:
            return FrameError("decode_failed", f"no object decoded from {payload.hex()}")
        return BTHomeReading(
            address=adv.address,
            packet_id=None if lib.packet_id is None else int(lib.packet_id),
            measurements=measurements,
            rssi=adv.rssi,
            encrypted=encrypted,
        )

    def _precheck(self, adv: Advertisement, payload: bytes) -> FrameError | None:
        """Refuse, with a precise reason, what the library would silently drop."""
        if not payload:
            return FrameError("truncated", "empty BTHome service data")
        info = payload[0]
        version = info >> 5
        if version != _BTHOME_VERSION:
            return FrameError("unsupported", f"BTHome version {version}")
        if not info & _FLAG_ENCRYPTED:
            if self._bindkey is not None:
                return FrameError("downgrade", "plaintext from a device with a bindkey")
            return None
        return self._precheck_encrypted(adv, payload)

    def _precheck_encrypted(self, adv: Advertisement, payload: bytes) -> FrameError | None:
        if self._bindkey is None:
            return FrameError("no_bindkey", "encrypted advertisement, no bindkey set")
        mac_included = bool(payload[0] & _FLAG_MAC_INCLUDED)
        body_start = 1 + _MAC_LEN if mac_included else 1
        if len(payload) - body_start < _MIN_ENCRYPTED:
            return FrameError("truncated", f"encrypted payload of {len(payload)} bytes")
        if not mac_included and _mac_from_address(adv.address) is None:
            return FrameError("decrypt_failed", f"address {adv.address!r} is not a MAC")
        # The library's replay rule, checked first to report it as such.
        counter = int.from_bytes(payload[-8:-4], "little")
        lib = self._lib
        if lib.bindkey_verified and _REPLAY_FLOOR <= counter < lib.encryption_counter:
            return FrameError("replayed", f"counter {counter} < last {int(lib.encryption_counter)}")
        return None

    def _prepare_lib(self) -> BTHomeBluetoothDeviceData:
        """The library object, with the state of the previous call cleared."""
        if self._reuse_lib:
            lib = self._lib
            for name in _UPDATE_DICTS:
                getattr(lib, name).clear()
        else:  # only if sensor_state_data changes its internals
            old = self._lib
            lib = BTHomeBluetoothDeviceData(bindkey=self._bindkey)
            lib.encryption_counter = old.encryption_counter
            lib.bindkey_verified = old.bindkey_verified
            lib.decryption_failed = old.decryption_failed
            self._lib = lib
        # No packet-id history: never drop an advertisement as a duplicate.
        lib.packet_id = None
        return lib

    def _service_info(self, adv: Advertisement, payload: bytes) -> BluetoothServiceInfoBleak:
        device = self._ble_device
        if device is None or device.address != adv.address:
            device = self._ble_device = BLEDevice(adv.address, adv.name, None)
        return BluetoothServiceInfoBleak(
            adv.name or adv.address,  # the library needs a str name
            adv.address,
            adv.rssi,
            {},
            {BTHOME_UUID: payload},
            [],
            _SOURCE,
            device,
            None,
            False,
            0.0,  # constant: the library's time-based de-duplication stays off
            None,
        )


@lru_cache(maxsize=1024)
def _entity(key: str, device_class: BaseDeviceClass | None, unit: str | None) -> tuple[str, str | None]:
    """(metric, unit) of a library entity; metric ``""`` for the RSSI and
    packet-id entities, which are not measurements."""
    class_name = key if device_class is None else str(device_class.value)
    if class_name in (_SIGNAL_STRENGTH, _PACKET_ID):
        return "", None
    return _metric_name(class_name, key), _normalise_unit(unit)


def _measurements(update: SensorUpdate) -> tuple[tuple[Measurement, ...], bool]:
    """The measurements in one library update, and whether it decoded any
    object at all (including packet id, events and non-numeric values)."""
    out: list[Measurement] = []
    decoded_any = bool(update.events) or bool(update.binary_entity_values)
    descriptions = update.entity_descriptions
    for device_key, value in update.entity_values.items():
        key = device_key.key
        if key == _SIGNAL_STRENGTH:
            continue  # added by the library from the RSSI, not decoded
        decoded_any = True
        description = descriptions.get(device_key)
        if description is None:
            metric, unit = _entity(key, None, None)
        else:
            metric, unit = _entity(key, description.device_class, description.native_unit_of_measurement)
        native = value.native_value
        if metric and isinstance(native, int | float) and math.isfinite(native):
            out.append(Measurement(metric, float(native), unit))
    binary_descriptions = update.binary_entity_descriptions
    for device_key, binary in update.binary_entity_values.items():
        if binary.native_value is None:
            continue
        binary_description = binary_descriptions.get(device_key)
        metric, _ = _entity(
            device_key.key,
            None if binary_description is None else binary_description.device_class,
            None,
        )
        if metric:
            out.append(Measurement(metric, 1.0 if binary.native_value else 0.0, None))
    return tuple(out), decoded_any
