"""The amqtt adapter (gateway/broker/amqtt_adapter.py), pinned: every amqtt name it overrides or calls
exists in the installed amqtt, every method it overrides overrides one, and amqtt's packet reader
still hands each kind of packet to the method the adapter overrides. An amqtt release that renames or
removes one of them fails here, naming it, instead of silently bypassing the gateway's handling."""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

import pytest
from amqtt.session import Session
from mqttwire import PacketRecorder, connect, packet, publish, pubrel, string, subscribe

from gateway.broker.amqtt_adapter import PINNED, SESSION_FIELDS, AmqttProtocol, _Handler
from gateway.broker.firewall import PacketFirewall

PINS = [(cls, name) for cls, names in PINNED.items() for name in names]


def test_the_pinned_release_is_installed() -> None:
    assert version("amqtt") == "0.12.1", "amqtt moved: check every pin below, then pyproject.toml"


@pytest.mark.parametrize(("cls", "name"), PINS, ids=[f"{c.__name__}.{n}" for c, n in PINS])
def test_amqtt_still_has_each_name_the_adapter_uses(cls: type, name: str) -> None:
    assert callable(getattr(cls, name, None)), (
        f"amqtt {version('amqtt')}: {cls.__module__}.{cls.__qualname__}.{name} is gone; "
        "gateway/broker/amqtt_adapter.py overrides or calls it")


def test_each_override_overrides_an_amqtt_method_and_is_pinned() -> None:
    pinned = {name for names in PINNED.values() for name in names}
    for name, value in vars(_Handler).items():
        if name.startswith("__") or not callable(value):
            continue
        bases = [base for base in _Handler.__mro__[1:] if name in vars(base)]
        assert bases, f"_Handler.{name} overrides nothing in amqtt {version('amqtt')}: amqtt would never call it"
        assert name in pinned, f"_Handler.{name} overrides amqtt but is not in PINNED"


def test_the_session_fields_read_from_a_connect_exist() -> None:
    session = Session()
    missing = [name for name in SESSION_FIELDS if not hasattr(session, name)]
    assert not missing, f"amqtt {version('amqtt')}: Session has no {missing}"
    signature = inspect.signature(_Handler.init_from_connect)
    assert list(signature.parameters)[:3] == ["reader", "writer", "plugins_manager"], signature


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._more = asyncio.Event()

    async def read(self, n: int) -> bytes:
        if not self._data:
            await self._more.wait()  # the peer stays silent
        chunk, self._data = self._data[:n], self._data[n:]
        return chunk


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        return None

    def buffered(self) -> int:
        return 0

    def get_peer_info(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        self.aborted = True

    def abort(self) -> None:
        self.aborted = True


class _Sink(PacketRecorder):
    """Records, and says when the client has said goodbye."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    def disconnect(self) -> None:
        super().disconnect()
        self.done.set()


async def test_every_packet_reaches_the_sink_in_order() -> None:
    wire_in = (
        connect("pin-1", clean=False, will=("w/t", b"bye", 1), username="u", password="p")  # noqa: S106
        + publish("a/b", b"x", qos=1, packet_id=3) + publish("a/c", b"", qos=0) + pubrel(4)
        + packet(0x40, b"\x00\x05") + packet(0x50, b"\x00\x06") + packet(0x70, b"\x00\x07")
        + subscribe("s/#", 2, packet_id=8) + packet(0xA2, b"\x00\x09" + string("s/#")) + b"\xc0\x00" + b"\xe0\x00"
    )
    transport = _Transport()

    async def gate() -> None:
        return None

    reader = PacketFirewall(_Bytes(wire_in), transport.abort, max_packet_bytes=4096, connect_timeout_s=5, gate=gate,
                            offence=lambda reason: pytest.fail(f"the firewall refused a valid packet: {reason}"))
    connected = await AmqttProtocol().read_connect(reader, transport)
    assert connected is not None
    request, channel = connected
    assert (request.client_id, request.clean, request.username, request.password) == ("pin-1", False, "u", "p")
    assert request.will is not None
    assert (request.will.topic, request.will.payload, request.will.qos) == ("w/t", b"bye", 1)
    sink = _Sink()
    await channel.start(sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    await channel.stop()
    assert sink.got[:10] == [
        ("publish", "a/b", b"x", 1, False, 3, False), ("publish", "a/c", b"", 0, False, None, False), ("pubrel", 4),
        ("puback", 5), ("pubrec", 6), ("pubcomp", 7), ("subscribe", 8, [("s/#", 2)]), ("unsubscribe", 9, ["s/#"]),
        ("ping",), ("disconnect",)]
    assert transport.written == b""  # amqtt wrote nothing: the gateway answers every packet itself
