"""Simulated BTHome v2 sensor firmware: builds the service data of its
advertisements.

Written from the BTHome v2 format (https://bthome.io/format/), independently of
the gateway's decoder.  The service data sent under :data:`BTHOME_UUID` is::

    device-info byte | objects...                          (plain)
    device-info byte | ciphertext | counter (4) | MIC (4)  (encrypted)

Device-info byte: bits 5..7 = version (2), bit 0 = encrypted, so ``0x40``
plain and ``0x41`` encrypted.  Objects are an object id followed by its
little-endian value, in ascending object id order:

====  ===========  ======  ======
id    quantity     type    factor
====  ===========  ======  ======
0x00  packet id    uint8   1
0x01  battery %    uint8   1
0x02  temperature  sint16  0.01
0x03  humidity %   uint16  0.01
====  ===========  ======  ======

Encryption is AES-CCM with the 16-byte bindkey and a 4-byte MIC, no
associated data, and the 13-byte nonce ``MAC (6, as written) | 0xD2 0xFC |
device-info byte | counter (4, little-endian)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from firmware_sim.encoding import mac_bytes, scaled

__all__ = ["BTHOME_UUID", "Encryption", "encode_service_data"]

BTHOME_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"

_VERSION_2 = 2 << 5
_ENCRYPTED = 0x01
_UUID16_LE = b"\xd2\xfc"

_OBJ_PACKET_ID = 0x00
_OBJ_BATTERY = 0x01
_OBJ_TEMPERATURE = 0x02
_OBJ_HUMIDITY = 0x03


@dataclass(frozen=True, slots=True)
class Encryption:
    """What an encrypting device needs besides its readings."""

    bindkey: bytes
    """16-byte AES-128 key shared with the gateway."""
    mac: str
    """The advertiser's MAC, "AA:BB:CC:DD:EE:FF" (part of the nonce)."""
    counter: int = 0
    """uint32 encryption counter; should increase with every advertisement."""


def encode_service_data(
    *,
    packet_id: int,
    temperature: float | None = None,
    humidity: float | None = None,
    battery: int | None = None,
    encryption: Encryption | None = None,
) -> bytes:
    """BTHome v2 service data for one advertisement.

    ``temperature`` in °C (-327.68..327.67, sent in 0.01 steps), ``humidity``
    in % (0..100, 0.01 steps), ``battery`` in % (0..100).  Absent values are
    not sent.  With ``encryption`` the objects are encrypted with its bindkey,
    the nonce built from its MAC and counter.

    Raises ``ValueError`` for a value the format cannot carry.
    """
    if not 0 <= packet_id <= 0xFF:
        raise ValueError(f"packet_id {packet_id!r} is not a uint8")
    objects = bytearray((_OBJ_PACKET_ID, packet_id))
    if battery is not None:
        if not 0 <= battery <= 100:
            raise ValueError(f"battery {battery!r} is not a percentage")
        objects += bytes((_OBJ_BATTERY, battery))
    if temperature is not None:
        raw_t = scaled(temperature, "temperature", 0.01, -0x8000, 0x7FFF, encoding="BTHome")
        objects.append(_OBJ_TEMPERATURE)
        objects += raw_t.to_bytes(2, "little", signed=True)
    if humidity is not None:
        raw_h = scaled(humidity, "humidity", 0.01, 0, 10_000, encoding="BTHome")
        objects.append(_OBJ_HUMIDITY)
        objects += raw_h.to_bytes(2, "little")
    if encryption is None:
        return bytes((_VERSION_2,)) + objects
    return _encrypt(bytes(objects), encryption)


def _encrypt(objects: bytes, encryption: Encryption) -> bytes:
    if len(encryption.bindkey) != 16:  # BTHome keys are AES-128
        raise ValueError("a BTHome bindkey is 16 bytes")
    if not 0 <= encryption.counter <= 0xFFFF_FFFF:
        raise ValueError(f"counter {encryption.counter!r} is not a uint32")
    info = _VERSION_2 | _ENCRYPTED
    counter_le = encryption.counter.to_bytes(4, "little")
    nonce = mac_bytes(encryption.mac) + _UUID16_LE + bytes((info,)) + counter_le
    sealed = AESCCM(encryption.bindkey, tag_length=4).encrypt(nonce, objects, None)
    ciphertext, mic = sealed[:-4], sealed[-4:]
    return bytes((info,)) + ciphertext + counter_le + mic
