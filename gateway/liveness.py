"""Liveness at work: the inactivity alerts' clock (pipeline/liveness.py), and which devices it watches
from the start: the configured ones and those the store has heard from before."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.publish import Publisher
from pipeline.liveness import InactivityStage
from pipeline.stage import Emitter
from pipeline.store import StoreError, StoreReader

log = logging.getLogger(__name__)
TICK_S = 1.0


def watch_known_devices(stage: InactivityStage, config: GatewayConfig, data_dir: Path) -> None:
    """Devices not heard from yet in this run: those in the store since their last reading, the
    configured ones (never heard from) since now."""
    if not stage.rules:
        return
    try:
        with StoreReader(data_dir) as store:
            for row in store.devices():
                stage.watch(row.device_id, row.device_class, last_s=row.last_seen_ms / 1000, site=row.site)
    except StoreError:
        pass  # no store yet
    for device in config.devices:
        stage.watch(device.id, config.device_class(device))


class InactivityWatch:
    """Raises the inactivity alerts every tick until cancelled."""

    def __init__(self, stage: InactivityStage, publisher: Publisher, *, tick_s: float = TICK_S) -> None:
        self._stage = stage
        self._publisher = publisher
        self._tick_s = tick_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            if not self._stage.rules:
                continue
            emit = Emitter()
            await self._stage.tick(emit)
            await self._publisher.results(emit)
