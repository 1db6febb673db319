"""RuuviTag (data format 5) and ATC1441/pvvx decoders: known-byte vectors, the simulators'
encoders against them, the protocol registry, and property tests that no decoder raises."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.ble.advert import Advertisement, BleReading, uuid16
from drivers.ble.atc import ATC_UUID, AtcDecoder
from drivers.ble.bthome import BTHOME_UUID
from drivers.ble.driver import BleDeviceSpec, BleDriver
from drivers.ble.protocols import PROTOCOLS, or_patterns
from drivers.ble.ruuvi import RUUVI_COMPANY_ID, RuuviDecoder
from drivers.ble.sources import SimulatedRadio
from drivers.reading import FrameError, Measurement
from firmware_sim.atc import ATC_UUID as SIM_ATC_UUID
from firmware_sim.atc import encode_atc
from firmware_sim.ble_sensor import BLE_SIMULATORS
from firmware_sim.ruuvi import encode_df5
from gateway.config import BleDevice, parse_config
from gateway.errors import ConfigError

RUUVI_MAC = "CB:B8:33:4C:88:4F"
ATC_MAC = "A4:C1:38:0D:7E:41"


def ruuvi(data: bytes, address: str = RUUVI_MAC) -> Advertisement:
    return Advertisement(address, -70, {}, manufacturer_data={RUUVI_COMPANY_ID: data})


def atc(data: bytes, address: str = ATC_MAC) -> Advertisement:
    return Advertisement(address, -70, {ATC_UUID: data})


def _ruuvi_full(t: float, rh: float, hpa: float, acc: tuple[float, float, float], *, mv: float, tx: float,
                movement: float) -> tuple[Measurement, ...]:
    return (
        Measurement("temperature", t, "°C"), Measurement("humidity", rh, "%"), Measurement("pressure", hpa, "hPa"),
        Measurement("acceleration_x", acc[0], "mg"), Measurement("acceleration_y", acc[1], "mg"),
        Measurement("acceleration_z", acc[2], "mg"), Measurement("battery_voltage", mv, "mV"),
        Measurement("tx_power", tx, "dBm"), Measurement("movement_count", movement, None),
    )


# The test vectors of Ruuvi's dataformat_05 specification (the library rounds to 0.01).
@pytest.mark.parametrize(
    ("hex_data", "expected"),
    [
        pytest.param("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F",
                     BleReading(205, _ruuvi_full(24.3, 53.49, 1000.44, (4, -4, 1036), mv=2977, tx=4, movement=66)),
                     id="valid"),
        pytest.param("057FFFFFFEFFFE7FFF7FFF7FFFFFDEFEFFFECBB8334C884F",
                     BleReading(65534, _ruuvi_full(163.84, 163.84, 1155.34, (32767,) * 3, mv=3646, tx=20,
                                                   movement=254)),
                     id="maximum"),
        pytest.param("058001000000008001800180010000000000CBB8334C884F",
                     BleReading(0, _ruuvi_full(-163.84, 0, 500, (-32767,) * 3, mv=1600, tx=-40, movement=0)),
                     id="minimum"),
        # Every field at its "invalid / not available" value: nothing to store, no packet id.
        pytest.param("058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF", BleReading(None, ()), id="invalid"),
    ],
)
def test_ruuvi_df5_spec_vectors(hex_data: str, expected: BleReading) -> None:
    assert RuuviDecoder().decode(ruuvi(bytes.fromhex(hex_data))) == expected


def test_ruuvi_sim_encodes_the_spec_vector() -> None:
    data = encode_df5(mac=RUUVI_MAC, sequence=205, temperature=24.3, humidity=53.49, pressure_hpa=1000.44,
                      acceleration_mg=(4, -4, 1036), battery_mv=2977, tx_power_dbm=4, movement=66)
    assert data.hex().upper() == "0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F"
    assert encode_df5(mac="FF:FF:FF:FF:FF:FF", sequence=None).hex().upper() == \
        "058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF"


@pytest.mark.parametrize(
    ("advertisement", "reason"),
    [
        pytest.param(ruuvi(b""), "truncated", id="empty"),
        pytest.param(ruuvi(bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C88")), "truncated", id="short"),
        pytest.param(ruuvi(bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F00")), "bad_length",
                     id="long"),
        pytest.param(ruuvi(bytes.fromhex("03291A1ECE1EFC18F94202CA0B53")), "unsupported", id="format-3"),
    ],
)
def test_ruuvi_errors(advertisement: Advertisement, reason: str) -> None:
    result = RuuviDecoder().decode(advertisement)
    assert isinstance(result, FrameError), result
    assert result.reason == reason


def test_ruuvi_ignores_other_advertisements() -> None:
    assert RuuviDecoder().decode(Advertisement(RUUVI_MAC, -70, {BTHOME_UUID: b"\x40"})) is None
    assert RuuviDecoder().decode(Advertisement(RUUVI_MAC, -70, {}, manufacturer_data={0x004C: b"\x02\x15"})) is None


# ATC1441: A4C1380D7E41 | 00E1 (22.5 °C) | 37 (55 %) | 5A (90 %) | 0B9E (2974 mV) | 2A (frame 42)
ATC1441 = bytes.fromhex("A4C1380D7E41 00E1 37 5A 0B9E 2A")
# pvvx: 417E0D38C1A4 (reversed) | CAF8 (-18.46 °C) | 0F13 (48.79 %) | 9E0B (2974 mV) | 5A (90 %) | 07 | 04 (flags)
PVVX = bytes.fromhex("417E0D38C1A4 CAF8 0F13 9E0B 5A 07 04")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(ATC1441, BleReading(42, (
            Measurement("temperature", 22.5, "°C"), Measurement("humidity", 55.0, "%"),
            Measurement("battery", 90.0, "%"), Measurement("battery_voltage", 2974.0, "mV"),
        )), id="atc1441"),
        pytest.param(PVVX, BleReading(7, (
            Measurement("temperature", -18.46, "°C"), Measurement("humidity", 48.79, "%"),
            Measurement("battery", 90.0, "%"), Measurement("battery_voltage", 2974.0, "mV"),
        )), id="pvvx"),
    ],
)
def test_atc_vectors(data: bytes, expected: BleReading) -> None:
    assert AtcDecoder().decode(atc(data)) == expected


def test_atc_sim_encodes_the_vectors() -> None:
    assert SIM_ATC_UUID == ATC_UUID
    assert encode_atc(mac=ATC_MAC, counter=42, temperature=22.5, humidity=55, battery=90, battery_mv=2974,
                      layout="atc1441") == ATC1441
    assert encode_atc(mac=ATC_MAC, counter=7, temperature=-18.46, humidity=48.79, battery=90, battery_mv=2974,
                      layout="pvvx", flags=4) == PVVX


@pytest.mark.parametrize(
    ("advertisement", "reason"),
    [
        pytest.param(atc(ATC1441[:-1]), "bad_length", id="short"),
        pytest.param(atc(PVVX + b"\x00"), "bad_length", id="long"),
        pytest.param(atc(b""), "bad_length", id="empty"),
        pytest.param(atc(ATC1441, address="A4:C1:38:00:00:02"), "mac_mismatch", id="foreign-mac"),
    ],
)
def test_atc_errors(advertisement: Advertisement, reason: str) -> None:
    result = AtcDecoder().decode(advertisement)
    assert isinstance(result, FrameError), result
    assert result.reason == reason


def test_atc_uppercase_uuid_and_no_service_data() -> None:
    assert isinstance(AtcDecoder().decode(Advertisement(ATC_MAC, -1, {ATC_UUID.upper(): ATC1441})), BleReading)
    assert AtcDecoder().decode(Advertisement(ATC_MAC, -1, {uuid16(0x181C): ATC1441})) is None


def test_registry_names_and_passive_patterns() -> None:
    assert set(PROTOCOLS) == {"bthome", "ruuvi", "atc"}
    assert [name for name, p in PROTOCOLS.items() if p.encrypts] == ["bthome"]
    assert or_patterns({"ruuvi", "atc"}) == [(0, 0x16, b"\x1a\x18"), (0, 0xFF, b"\x99\x04")]
    assert or_patterns({"bthome"}) == [(0, 0x16, b"\xd2\xfc")]


_payloads = st.binary(max_size=40)


@given(
    protocol=st.sampled_from(sorted(PROTOCOLS)),
    service=st.dictionaries(st.sampled_from([BTHOME_UUID, ATC_UUID, uuid16(0x181C), "not-a-uuid"]), _payloads,
                            max_size=3),
    manufacturer=st.dictionaries(st.sampled_from([RUUVI_COMPANY_ID, 0x004C, 0]), _payloads, max_size=2),
    address=st.sampled_from([RUUVI_MAC, ATC_MAC, "not a mac", ""]),
    key=st.sampled_from([None, bytes(range(16))]),
)
def test_no_decoder_raises_on_arbitrary_bytes(
    protocol: str, service: dict[str, bytes], manufacturer: dict[int, bytes], address: str, key: bytes | None,
) -> None:
    spec = PROTOCOLS[protocol]
    decoder = spec.decoder(key if spec.encrypts else None)
    result = decoder.decode(Advertisement(address, -50, service, manufacturer_data=manufacturer))
    if isinstance(result, FrameError):
        assert result.reason.isidentifier()
    elif result is not None:
        assert all(isinstance(m, Measurement) for m in result.measurements)
        assert result.packet_id is None or isinstance(result.packet_id, int)


@given(body=st.binary(min_size=7, max_size=10), pvvx=st.booleans())
def test_atc_any_values_with_a_matching_mac_decode(body: bytes, pvvx: bool) -> None:
    mac = bytes.fromhex(ATC_MAC.replace(":", ""))
    data = (mac[::-1] if pvvx else mac) + body
    result = AtcDecoder().decode(atc(data))
    if len(data) in ((15,) if pvvx else (13,)):
        assert isinstance(result, BleReading)
        assert len(result.measurements) == 4
    else:
        assert isinstance(result, FrameError)


@given(body=st.binary(min_size=20, max_size=26))
def test_ruuvi_any_df5_body_is_a_reading_or_a_length_error(body: bytes) -> None:
    result = RuuviDecoder().decode(ruuvi(b"\x05" + body))
    if len(body) == 23:
        assert isinstance(result, BleReading)
    else:
        assert isinstance(result, FrameError)
        assert result.reason in ("truncated", "bad_length")


def test_config_bindkey_only_with_bthome_and_ble_defaults() -> None:
    device = {"id": "r-1", "transport": "ble", "address": RUUVI_MAC, "protocol": "ruuvi", "bindkey": "00" * 16}
    with pytest.raises(ConfigError) as caught:
        parse_config({"devices": [device]})
    assert str(caught.value) == "devices[0].bindkey: only protocol bthome takes a bindkey, not ruuvi"
    ok = parse_config({"devices": [device | {"protocol": "bthome"}, {**device, "id": "a", "protocol": "atc",
                                                                       "bindkey": None}]})
    assert [d.protocol for d in ok.devices if isinstance(d, BleDevice)] == ["bthome", "atc"]
    assert (ok.ble.scanning, ok.ble.watchdog_s) == ("passive", 60.0)


async def test_simulators_have_one_shape_and_count_each_injected_fault() -> None:
    radio = SimulatedRadio(maxsize=10_000)
    addresses = {"bthome": "A4:C1:38:00:00:01", "ruuvi": RUUVI_MAC, "atc": ATC_MAC}
    sims = [BLE_SIMULATORS[kind](address=address, radio=radio, seed=7, duplicate_every=2, garble_every=3,
                                 spike_every=4, stuck_every=5)
            for kind, address in addresses.items()]
    for sim in sims:
        for _ in range(60):
            sim.step()  # the firmware's step, without its timing
    driver = BleDriver({a: BleDeviceSpec(kind, a, kind) for kind, a in addresses.items()}, radio)
    sink = _Collector()
    task = asyncio.create_task(driver.run(sink))
    try:
        sent = sum(s.transmissions for s in sims)
        async with asyncio.timeout(20):
            while driver.stats.frames + sum(driver.stats.errors.values()) + driver.stats.skipped.total() < sent:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for sim in sims:
        assert sim.faults == {"duplicate": 20, "garbled": 20, "spike": 15, "stuck": sim.faults["stuck"]}
        assert sim.faults["stuck"] >= 15
    assert dict(driver.stats.errors) == {"decode_failed": 20, "truncated": 20, "bad_length": 20}  # garbled, by protocol
    assert driver.stats.skipped["duplicate"] == sum(s.faults["duplicate"] for s in sims)
    assert driver.stats.frames == sum(len(s.history) for s in sims)


class _Collector:
    async def reading(self, reading: object) -> None:
        pass

    async def error(self, device_id: str, reason: str, detail: str, raw: bytes) -> None:
        pass
