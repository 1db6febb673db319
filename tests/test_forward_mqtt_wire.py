"""The MQTT bridge packs its PUBLISH user properties itself (gateway/forward/mqtt/destination.py):
the bytes must be paho's own, and paho must take the object where it takes its Properties."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.forward.mqtt.destination import UserProperties, utf8_pair


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([("event-id", "01HZX3K8J6Q1W2E3R4T5Y6U7I8"), ("iotgw-gateway", "gw-a")], id="usual"),
        pytest.param([("k", "é°C µg/m³"), ("", "")], id="unicode-and-empty"),
        pytest.param([("a", "x" * 300)], id="long-value"),
        pytest.param([("k", str(i)) for i in range(40)], id="many-pairs"),
        pytest.param([("k", "v" * 40_000)], id="longer-than-two-length-bytes"),
    ],
)
def test_user_properties_pack_as_paho_packs_them(pairs: list[tuple[str, str]]) -> None:
    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.UserProperty = pairs
    assert UserProperties(pairs).pack() == reference.pack()  # type: ignore[no-untyped-call]
    packed = b"".join(utf8_pair(k, v) for k, v in pairs)
    assert UserProperties(pairs, packed=packed).pack() == reference.pack()  # type: ignore[no-untyped-call]


def test_user_properties_are_paho_properties_that_print() -> None:
    props = UserProperties([("event-id", "1")])
    assert isinstance(props, Properties)
    assert props.UserProperty == [("event-id", "1")]
    assert "event-id" in str(props)
