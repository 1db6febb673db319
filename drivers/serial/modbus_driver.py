"""The Modbus RTU driver: polls a device's registers through pymodbus's async serial client, one
request per contiguous block, and survives unplugs like the stream driver (reopens the same path
with capped, jittered backoff; logs the outage once and the recovery once).

A poll that fails is counted by reason and sent to the reject path: ``timeout`` (no reply),
``bad_crc`` / ``truncated`` / ``garbage`` / ``wrong_unit`` (a reply pymodbus discarded, classified
from the bytes it saw), ``exception_<code>`` (a Modbus exception response, e.g. ``exception_2`` for
an illegal data address).

After a read that got no usable reply, the driver stays quiet for ``QUIET_AFTER_FAILURE_S`` (at most
the timeout) before its next request, as libmodbus's error recovery flushes the line: a reply that comes
late (a slow device, or this gateway's loop stalled past the timeout) arrives then, with no request
waiting, and pymodbus drops it. RTU replies carry no request id, so one arriving during the next read
would be taken as that read's answer. A reply later still is caught when it does not fit the read (another
function: ``wrong_function``; another size: ``bad_length``), and the driver goes quiet again; one that
fits (the previous poll's reply to the same block) cannot be told from the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusException

from drivers.base import DriverReading, DriverStats, Sink
from drivers.errors import DriverError
from drivers.reading import FrameError
from drivers.serial.modbus import FUNCTION, Block, RegisterSpec, classify_reply, decode_block, plan_blocks
from pipeline.retry import StateLog, backoff_delay, raise_swallowed_cancel

log = logging.getLogger(__name__)
logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)  # it logs every timeout; we count them
QUIET_AFTER_FAILURE_S = 0.25


class PortLost(DriverError):
    """The serial port went away (unplugged)."""


class ModbusDriver:
    def __init__(
        self, device_id: str, port: str, baudrate: int, *, unit_id: int, registers: Sequence[RegisterSpec],
        poll_interval_s: float, timeout_s: float,
    ) -> None:
        if not registers:
            raise DriverError(f"modbus device {device_id}: no registers to poll")
        self.name = f"modbus:{device_id}"
        self.device_id = device_id
        self.port = port
        self.baudrate = baudrate
        self.unit_id = unit_id
        self.blocks = plan_blocks(registers)
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.stats = DriverStats()
        self.polls = 0
        self.requests = 0
        self._state = StateLog(log, f"modbus device {device_id} on {port}")
        self._rx = b""

    def _trace(self, sending: bool, data: bytes) -> bytes:
        """pymodbus hands every packet through here: remember what the device sent since our request."""
        if sending:
            self._rx = b""
        elif data:
            self._rx = bytes(data)
        return data

    async def run(self, sink: Sink) -> None:
        attempt = 0
        while True:
            client = AsyncModbusSerialClient(
                self.port, baudrate=self.baudrate, timeout=self.timeout_s, retries=0, reconnect_delay=0,
                trace_packet=self._trace,
            )
            try:
                connected = await client.connect()
            except (OSError, ModbusException) as exc:
                connected, reason = False, str(exc)
            else:
                reason = "cannot open the port"
            if not connected:
                client.close()
                raise_swallowed_cancel()
                self._state.down(reason)
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt))
                continue
            self._state.up()
            self.stats.connected = True
            attempt = 0
            try:
                raise_swallowed_cancel()  # pymodbus connects and reads with 3.11's asyncio.wait_for
                await self._poll_forever(client, sink)
            except PortLost as exc:
                self.stats.disconnects += 1
                self._state.down(str(exc))
            finally:
                self.stats.connected = False
                client.close()
            await asyncio.sleep(backoff_delay(1))

    async def _poll_forever(self, client: AsyncModbusSerialClient, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while True:
            for block in self.blocks:
                await self._read_block(client, block, sink)
            self.polls += 1
            next_poll = max(next_poll + self.poll_interval_s, loop.time())
            await asyncio.sleep(next_poll - loop.time())

    async def _read_block(self, client: AsyncModbusSerialClient, block: Block, sink: Sink) -> None:
        if not client.connected:
            raise PortLost("the serial port closed")
        read = client.read_holding_registers if block.kind == "holding" else client.read_input_registers
        self.requests += 1
        try:
            response = await read(block.address, count=block.count, device_id=self.unit_id)
        except ModbusException as exc:
            raise_swallowed_cancel()
            if not client.connected:
                raise PortLost(str(exc)) from None
            failure = classify_reply(self._rx, self.unit_id, FUNCTION[block.kind], block.count)
            if failure.reason == "no_reply":
                failure = FrameError("timeout", f"no reply within {self.timeout_s} s")
            await self._reject(sink, failure)
            await self._quiet()
            return
        raise_swallowed_cancel()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            detail = f"exception response {code} to a read at {block.address}"
            await self._reject(sink, FrameError(f"exception_{code}", detail))
            return
        function = FUNCTION[block.kind]
        if response.function_code != function:  # the answer to another read, later than the quiet time
            detail = f"a function {response.function_code} reply to a {function} read"
            await self._reject(sink, FrameError("wrong_function", detail))
            await self._quiet()  # this read's own reply is on its way: let it pass
            return
        self.stats.frames += 1
        items = decode_block(block, response.registers)
        for item in items:
            if isinstance(item, FrameError):
                await self._reject(sink, item)
                continue
            self.stats.readings += 1
            await sink.reading(DriverReading(self.device_id, item.metric, item.value, item.unit))
        if items and isinstance(items[0], FrameError) and items[0].reason == "bad_length":
            await self._quiet()  # another read's answer too (decode_block checks the size)

    async def _quiet(self) -> None:
        """After a read with no usable reply: wait, so that a late reply arrives with no request waiting
        (pymodbus drops it) instead of during the next read."""
        await asyncio.sleep(min(QUIET_AFTER_FAILURE_S, self.timeout_s))

    async def _reject(self, sink: Sink, error: FrameError) -> None:
        self.stats.errors[error.reason] += 1
        await sink.error(self.device_id, error.reason, error.detail, self._rx)
