"""The real-peer fixtures work: Mosquitto relays and persists a queued QoS 1 message through kill -9,
and nats-server's JetStream deduplicates by Nats-Msg-Id and keeps acked messages through kill -9."""

from __future__ import annotations

import time

import nats
import paho.mqtt.client as mqtt
import pytest
from nats.js.api import StreamConfig
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from peers import (
    Mosquitto,
    MqttCollector,
    NatsServer,
    PeerError,
    StoredMessage,
    jetstream_messages,
    mosquitto_fixture,  # noqa: F401  (pytest fixture)
    mqtt_publish,
    nats_server_fixture,  # noqa: F401  (pytest fixture)
)


def test_mosquitto_relays_qos1(mosquitto: Mosquitto) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    with MqttCollector(mosquitto.url, ["gw/#"], client_id="relay") as collector:
        mqtt_publish(mosquitto.url, [("gw/a", b"one"), ("gw/b/c", "two"), ("other", b"x")])
        got = collector.wait_for(2)
        time.sleep(0.1)  # nothing else may arrive
        assert [(m.topic, m.payload) for m in collector.messages] == [("gw/a", b"one"), ("gw/b/c", b"two")]
        assert got[0].user_properties == {}


def test_mosquitto_mqtt5_user_properties(mosquitto: Mosquitto) -> None:
    with MqttCollector(mosquitto.url, ["gw/#"], client_id="v5", protocol=MQTTProtocolVersion.MQTTv5) as collector:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        try:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = [("trace", "t-1")]
            pub.publish("gw/v5", b"p", qos=1, properties=props).wait_for_publish(5)
        finally:
            pub.disconnect()
            pub.loop_stop()
        [msg] = collector.wait_for(1)
        assert msg == ("gw/v5", b"p", {"trace": "t-1"})


def test_mosquitto_queued_message_survives_kill(mosquitto: Mosquitto) -> None:
    MqttCollector(mosquitto.url, ["gw/#"], client_id="keeper").close()  # leaves a persistent session behind
    mqtt_publish(mosquitto.url, [("gw/queued", b"kept")])  # queued for the offline session
    mosquitto.wait_persisted()  # autosave_interval 1: the next save, at most ~2 s away
    pid = mosquitto.pid
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.restart()
    assert mosquitto.pid != pid
    with MqttCollector(mosquitto.url, ["gw/#"], client_id="keeper") as collector:
        assert collector.session_present is True
        assert [(m.topic, m.payload) for m in collector.wait_for(1)][:1] == [("gw/queued", b"kept")]
    assert "mosquitto version 2" in mosquitto.log_text()


def test_start_failure_shows_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = Mosquitto(tmp_path_factory.mktemp("bad"), extra_config=["no_such_option 1"])
    with pytest.raises(PeerError, match="no_such_option"):
        server.start()
    assert not server.running


async def test_nats_jetstream_dedup_and_survives_kill(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="GW", subjects=["gw.>"]))
        first = await js.publish("gw.s1.temp", b"21.5", headers={"Nats-Msg-Id": "m-1"})
        again = await js.publish("gw.s1.temp", b"21.5", headers={"Nats-Msg-Id": "m-1"})
        other = await js.publish("gw.s2.temp", b"19.0", headers={"Nats-Msg-Id": "m-2"})
        assert (first.duplicate, again.duplicate, other.duplicate) == (None, True, None)
        assert again.seq == first.seq
    finally:
        await nc.close()

    nats_server.kill()
    nats_server.restart()
    stored = await jetstream_messages(nats_server.url, "GW")
    assert stored == [
        StoredMessage("gw.s1.temp", b"21.5", {"Nats-Msg-Id": "m-1"}),
        StoredMessage("gw.s2.temp", b"19.0", {"Nats-Msg-Id": "m-2"}),
    ]
    only_s2 = await jetstream_messages(nats_server.url, "GW", "gw.s2.>")
    assert [m.subject for m in only_s2] == ["gw.s2.temp"]
    assert await jetstream_messages(nats_server.url, "GW", "gw.none.>") == []
