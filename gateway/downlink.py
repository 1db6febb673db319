"""What comes back from the backbone: events of other gateways (a mesh) and downlink commands.

Every inbound message is published on the embedded broker, marked with the destination it came
through (so it is not forwarded back there). A command (``cmd/{site}/{device_id}/{command}``) is
also delivered: a serial device whose protocol has commands (drivers/serial/protocols.py) gets the
encoded frame written to its port; any other device gets it on the broker, if it subscribes. The
outcome is published as a command acknowledgement on ``cmdack/{site}/{device_id}/{command}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from drivers.errors import DecodeError
from drivers.serial.driver import SerialDriver
from drivers.serial.protocols import COMMANDS
from gateway.forward.base import InboundMessage
from gateway.forward.forwarder import ORIGIN_PREFIX
from gateway.publish import Broker, Publisher
from pipeline.model import COMMAND_ACK_TYPE, cloudevent, new_event_id

log = logging.getLogger(__name__)


class CommandBroker(Broker, Protocol):
    def has_subscriber(self, topic: str) -> bool: ...


class Downlink:
    """``inbound`` is the forwarder's ``on_inbound``; ``status()`` counts commands by outcome."""

    def __init__(self, broker: CommandBroker, publisher: Publisher, serial_driver: Callable[[str], SerialDriver | None],
                 *, site: str, gateway_id: str) -> None:
        """``serial_driver(device_id)``: the running serial driver of a device, if it has one."""
        self._broker = broker
        self._publisher = publisher
        self._serial_driver = serial_driver
        self._site = site
        self._source = f"/iotgw/{site}/{gateway_id}"
        self._commands: dict[str, int] = {}

    async def inbound(self, destination: str, message: InboundMessage) -> None:
        """From the backbone through ``destination``: a downlink command, or an event from another gateway."""
        await self._broker.publish(message.topic, message.payload, event_id=message.event_id,
                                   origin=ORIGIN_PREFIX + destination)
        levels = message.topic.split("/")
        if len(levels) >= 4 and levels[0] == "cmd" and levels[1] == self._site:
            device_id, command = levels[2], "/".join(levels[3:])
            outcome = await self._deliver(device_id, command, message.payload, message.topic)
            self._commands[outcome] = self._commands.get(outcome, 0) + 1
            topic = f"cmdack/{self._site}/{device_id}/{command}"
            await self._publisher.event(topic, cloudevent(
                event_id=new_event_id(), source=self._source, type_=COMMAND_ACK_TYPE, subject=topic,
                time=datetime.now(UTC),
                data={"device_id": device_id, "command": command, "status": outcome, "via": destination,
                      "command_event_id": message.event_id},
            ))

    async def _deliver(self, device_id: str, command: str, payload: bytes, topic: str) -> str:
        driver = self._serial_driver(device_id)
        if driver is None or driver.protocol not in COMMANDS:
            return "delivered" if self._broker.has_subscriber(topic) else "no_subscriber"
        try:
            args = json.loads(payload) if payload.strip() else {}
            frame = COMMANDS[driver.protocol](command, args if isinstance(args, dict) else {})
        except (ValueError, DecodeError) as exc:
            log.warning("command %s for %s refused: %s", command, device_id, exc)
            return exc.reason if isinstance(exc, DecodeError) else "invalid_argument"
        return "delivered" if await driver.send(frame) else "device_offline"

    def status(self) -> dict[str, int]:
        """Commands by outcome: delivered, no_subscriber, device_offline, invalid_argument, ..."""
        return dict(self._commands)
