"""BTHome v2 decoder (through bthome-ble) and simulated-firmware encoder."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.ble.bthome import (
    BTHOME_UUID,
    Advertisement,
    BTHomeDecoder,
    BTHomeReading,
)
from drivers.reading import FrameError, Measurement
from firmware_sim.bthome import BTHOME_UUID as SIM_BTHOME_UUID
from firmware_sim.bthome import Encryption, encode_service_data

MAC = "A4:C1:38:0D:7E:41"
KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")

# Hand-built BTHome v2 service data:
#   40        device info: version 2 (0b010 << 5), not encrypted
#   00 2A     packet id 42
#   01 5D     battery 0x5D = 93 %
#   02 CA 08  temperature sint16 0x08CA = 2250 x 0.01 = 22.50 °C
#   03 BF 13  humidity uint16 0x13BF = 5055 x 0.01 = 50.55 %
VECTOR = bytes.fromhex("40 002A 015D 02CA08 03BF13")
VECTOR_READING = BTHomeReading(
    address=MAC,
    packet_id=42,
    measurements=(
        Measurement("battery", 93.0, "%"),
        Measurement("temperature", 22.5, "°C"),
        Measurement("humidity", 50.55, "%"),
    ),
    rssi=-67,
    encrypted=False,
)

# Objects the simulator does not send, to pin the metric/unit mapping:
#   04 13 8A 01  pressure uint24 0x018A13 = 100883 x 0.01 = 1008.83 mbar
#   05 13 8A 14  illuminance uint24 0x148A13 = 1346067 x 0.01 = 13460.67 lx
#   0D 0C 00     pm2.5 uint16 12 µg/m³
#   11 01        opening (binary) = open
#   12 E2 04     CO2 uint16 0x04E2 = 1250 ppm
WIDE_VECTOR = bytes.fromhex("40 04138A01 05138A14 0D0C00 1101 12E204")
WIDE_MEASUREMENTS = (
    Measurement("pressure", 1008.83, "mbar"),
    Measurement("illuminance", 13460.67, "lx"),
    Measurement("pm2_5", 12.0, "µg/m³"),
    Measurement("co2", 1250.0, "ppm"),
    Measurement("opening", 1.0, None),
)


def adv(service_data: bytes, *, address: str = MAC, rssi: int = -67, name: str | None = None) -> Advertisement:
    return Advertisement(address, rssi, {BTHOME_UUID: service_data}, name)


def error_reason(result: BTHomeReading | FrameError | None) -> str:
    assert isinstance(result, FrameError), result
    return result.reason


@pytest.fixture(autouse=True)
def _quiet_library_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="bthome_ble")


# ---------------------------------------------------------------- vectors


def test_known_vector_decodes_to_whole_reading() -> None:
    assert BTHomeDecoder().decode(adv(VECTOR, name="ATC_0D7E41")) == VECTOR_READING


def test_sim_encoder_produces_known_vector() -> None:
    assert SIM_BTHOME_UUID == BTHOME_UUID
    data = encode_service_data(packet_id=42, temperature=22.5, humidity=50.55, battery=93)
    assert data == VECTOR


def test_sim_encoder_negative_temperature_and_omitted_values() -> None:
    # -5.25 °C -> -525 = 0xFDF3 (two's complement) -> F3 FD
    assert encode_service_data(packet_id=1, temperature=-5.25) == bytes.fromhex("40 0001 02F3FD")
    assert encode_service_data(packet_id=255) == bytes.fromhex("40 00FF")


def test_metric_and_unit_mapping() -> None:
    result = BTHomeDecoder().decode(adv(WIDE_VECTOR))
    assert isinstance(result, BTHomeReading)
    assert result.packet_id is None
    assert result.measurements == WIDE_MEASUREMENTS


def test_repeated_object_gets_numbered_metrics() -> None:
    # Two temperatures: 02 D007 = 20.00 °C, 02 6400 = 1.00 °C
    result = BTHomeDecoder().decode(adv(bytes.fromhex("40 02D007 026400")))
    assert isinstance(result, BTHomeReading)
    assert result.measurements == (
        Measurement("temperature_1", 20.0, "°C"),
        Measurement("temperature_2", 1.0, "°C"),
    )


@pytest.mark.parametrize(
    "service_data",
    [
        pytest.param({}, id="no-service-data"),
        pytest.param({"0000fe95-0000-1000-8000-00805f9b34fb": b"\x30\x58"}, id="xiaomi-uuid"),
        pytest.param({"0000180f-0000-1000-8000-00805f9b34fb": b"\x64"}, id="battery-svc"),
    ],
)
def test_non_bthome_is_none(service_data: dict[str, bytes]) -> None:
    assert BTHomeDecoder().decode(Advertisement(MAC, -50, service_data)) is None


def test_uppercase_uuid_is_recognised() -> None:
    result = BTHomeDecoder().decode(Advertisement(MAC, -67, {BTHOME_UUID.upper(): VECTOR}))
    assert result == VECTOR_READING


# ------------------------------------------------------------ per-call state


def test_no_state_leaks_between_advertisements() -> None:
    decoder = BTHomeDecoder()
    first = decoder.decode(adv(encode_service_data(packet_id=1, temperature=20.0)))
    second = decoder.decode(adv(encode_service_data(packet_id=2, humidity=40.0)))
    assert isinstance(first, BTHomeReading)
    assert isinstance(second, BTHomeReading)
    assert first.measurements == (Measurement("temperature", 20.0, "°C"),)
    assert second.measurements == (Measurement("humidity", 40.0, "%"),)


def test_same_packet_id_is_not_dropped() -> None:
    # The library's own de-duplication is off: that is the caller's job.
    decoder = BTHomeDecoder()
    assert decoder.decode(adv(VECTOR)) == VECTOR_READING
    assert decoder.decode(adv(VECTOR)) == VECTOR_READING


def test_fresh_library_fallback_keeps_working() -> None:
    decoder = BTHomeDecoder(KEY)
    decoder._reuse_lib = False  # as if sensor_state_data's internals changed
    for counter in (500, 501):
        data = encode_service_data(packet_id=counter % 256, battery=50, encryption=Encryption(KEY, MAC, counter))
        result = decoder.decode(adv(data))
        assert isinstance(result, BTHomeReading)
        assert result.measurements == (Measurement("battery", 50.0, "%"),)
    old = encode_service_data(packet_id=1, battery=50, encryption=Encryption(KEY, MAC, 400))
    assert error_reason(decoder.decode(adv(old))) == "replayed"


# ---------------------------------------------------------------- encryption


def test_encrypted_round_trip() -> None:
    data = encode_service_data(
        packet_id=7,
        temperature=22.5,
        humidity=50.55,
        battery=93,
        encryption=Encryption(KEY, MAC, 0x11223344),
    )
    assert data[0] == 0x41
    assert data[-8:-4] == bytes.fromhex("44332211")
    assert VECTOR[3:] not in data  # the objects are not in clear
    result = BTHomeDecoder(KEY).decode(adv(data))
    assert result == BTHomeReading(
        address=MAC,
        packet_id=7,
        measurements=VECTOR_READING.measurements,
        rssi=-67,
        encrypted=True,
    )


def _encrypted(counter: int, key: bytes = KEY) -> bytes:
    return encode_service_data(packet_id=counter % 256, temperature=21.0, encryption=Encryption(key, MAC, counter))


def test_replayed_counter_is_refused() -> None:
    decoder = BTHomeDecoder(KEY)
    assert isinstance(decoder.decode(adv(_encrypted(1000))), BTHomeReading)
    assert isinstance(decoder.decode(adv(_encrypted(1001))), BTHomeReading)
    assert error_reason(decoder.decode(adv(_encrypted(999)))) == "replayed"
    # Low counters are taken as a device restart, as the library does.
    assert isinstance(decoder.decode(adv(_encrypted(3))), BTHomeReading)


@pytest.mark.parametrize(
    ("decoder_key", "data", "address", "reason"),
    [
        pytest.param(None, _encrypted(5), MAC, "no_bindkey", id="encrypted-no-key"),
        pytest.param(KEY, VECTOR, MAC, "downgrade", id="plaintext-with-key"),
        pytest.param(bytes(16), _encrypted(5), MAC, "decrypt_failed", id="wrong-key"),
        pytest.param(KEY, _encrypted(5), "11:22:33:44:55:66", "decrypt_failed", id="wrong-mac"),
        pytest.param(
            KEY,
            _encrypted(5),
            "6c3b9a0e-5d1f-4c2a-9b7e-0123456789ab",
            "decrypt_failed",
            id="address-not-a-mac",
        ),
        pytest.param(
            KEY,
            _encrypted(5)[:3] + bytes([_encrypted(5)[3] ^ 1]) + _encrypted(5)[4:],
            MAC,
            "decrypt_failed",
            id="flipped-ciphertext-bit",
        ),
        pytest.param(KEY, bytes.fromhex("41 00 01020304 05060708"), MAC, "truncated", id="short"),
    ],
)
def test_encryption_errors(decoder_key: bytes | None, data: bytes, address: str, reason: str) -> None:
    assert error_reason(BTHomeDecoder(decoder_key).decode(adv(data, address=address))) == (reason)


def test_bad_bindkey_length_is_a_construction_error() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        BTHomeDecoder(bytes(15))


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize(
    ("advertisement", "reason"),
    [
        pytest.param(adv(b""), "truncated", id="empty"),
        pytest.param(adv(bytes.fromhex("20 0001")), "unsupported", id="version-1-bits"),
        pytest.param(adv(bytes.fromhex("60 0001")), "unsupported", id="version-3"),
        pytest.param(
            Advertisement(MAC, -60, {"0000181c-0000-1000-8000-00805f9b34fb": b"\x02\x00"}),
            "unsupported",
            id="bthome-v1-uuid",
        ),
        pytest.param(adv(b"\x40"), "decode_failed", id="no-objects"),
        pytest.param(adv(bytes.fromhex("40 FF01")), "decode_failed", id="unknown-id"),
        pytest.param(adv(bytes.fromhex("40 02")), "decode_failed", id="cut-object"),
        pytest.param(
            Advertisement(MAC, "loud", {BTHOME_UUID: VECTOR}),  # type: ignore[arg-type]
            "decode_failed",
            id="library-raises",
        ),
    ],
)
def test_bad_data(advertisement: Advertisement, reason: str) -> None:
    assert error_reason(BTHomeDecoder().decode(advertisement)) == reason


# Module-level on purpose: one decoder across all examples also checks that
# nothing leaks from one advertisement into the next.
_SHARED = BTHomeDecoder()


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    packet_id=st.integers(0, 255),
    temperature=st.none() | st.floats(-40.0, 85.0),
    humidity=st.none() | st.floats(0.0, 100.0),
    battery=st.none() | st.integers(0, 100),
)
def test_sim_round_trip(packet_id: int, temperature: float | None, humidity: float | None, battery: int | None) -> None:
    data = encode_service_data(packet_id=packet_id, temperature=temperature, humidity=humidity, battery=battery)
    result = _SHARED.decode(adv(data))
    assert isinstance(result, BTHomeReading)
    assert (result.packet_id, result.encrypted, result.rssi) == (packet_id, False, -67)
    got = {m.metric: m for m in result.measurements}
    sent = {"temperature": temperature, "humidity": humidity, "battery": battery}
    assert set(got) == {k for k, v in sent.items() if v is not None}
    for metric, value in sent.items():
        if value is not None:
            assert got[metric].value == pytest.approx(value, abs=0.005 + 1e-9)
    if temperature is not None:
        assert got["temperature"].unit == "°C"


@settings(max_examples=50)
@given(
    temperature=st.floats(-40.0, 85.0),
    counter=st.integers(0, 0xFFFF_FFFF),
)
def test_sim_encrypted_round_trip(temperature: float, counter: int) -> None:
    data = encode_service_data(packet_id=1, temperature=temperature, encryption=Encryption(KEY, MAC, counter))
    result = BTHomeDecoder(KEY).decode(adv(data))
    assert isinstance(result, BTHomeReading)
    assert result.encrypted
    assert result.measurements[0].value == pytest.approx(temperature, abs=0.005 + 1e-9)


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_garbage_never_raises(data: bytes) -> None:
    result = _SHARED.decode(adv(data))
    assert isinstance(result, BTHomeReading | FrameError)


@settings(max_examples=100)
@given(st.binary(max_size=40))
def test_garbage_never_raises_with_bindkey(data: bytes) -> None:
    result = BTHomeDecoder(KEY).decode(adv(data))
    assert isinstance(result, BTHomeReading | FrameError)


@settings(max_examples=100)
@given(
    info=st.integers(0, 255).filter(lambda b: b >> 5 != 2),
    rest=st.binary(max_size=30),
)
def test_not_version_2_is_always_an_error(info: int, rest: bytes) -> None:
    assert error_reason(_SHARED.decode(adv(bytes([info]) + rest))) == "unsupported"


@settings(max_examples=100)
@given(st.binary(min_size=1, max_size=30))
def test_unknown_object_id_first_is_an_error(rest: bytes) -> None:
    # 0xFE is not a BTHome object id, so nothing can be decoded.
    assert error_reason(_SHARED.decode(adv(b"\x40\xfe" + rest))) == "decode_failed"
