"""Serial frame protocols, registered by the name used in config (``protocol = "sds011"``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from drivers.reading import FrameError, Measurement
from drivers.serial.nmea import NmeaStream
from drivers.serial.pms5003 import Pms5003Stream
from drivers.serial.sds011 import Sds011Stream, encode_command
from drivers.serial.textlines import JsonLinesStream, KeyValueStream


class Frame(Protocol):
    def measurements(self) -> tuple[Measurement, ...]: ...


class FrameStream(Protocol):
    """An incremental decoder: bytes as they arrive in, whole frames (or counted errors) out."""

    def feed(self, data: bytes) -> Sequence[Frame | FrameError]: ...


PROTOCOLS: dict[str, Callable[[], FrameStream]] = {
    "sds011": Sds011Stream,  # Nova SDS011 particulate sensor, 10-byte frames
    "pms5003": Pms5003Stream,  # Plantower PMS5003, 32-byte frames
    "nmea": NmeaStream,  # NMEA 0183 GPS sentences (GGA, RMC)
    "jsonlines": JsonLinesStream,  # one JSON object of metric -> number a line
    "kv": KeyValueStream,  # key=value text lines, optional unit suffix
}


CommandEncoder = Callable[[str, Mapping[str, object]], bytes]

# Protocols whose devices take commands (downlink): name -> encoder (raises DecodeError when invalid).
COMMANDS: dict[str, CommandEncoder] = {
    "sds011": encode_command,
}
