"""``[storage]``: where the store lives, how long it keeps each resolution, and its disk budget."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from gateway.settings import Model
from pipeline.store import StoreLimits


class StorageSettings(Model):
    data_dir: Path = Path("iotgw-data")
    raw_retention_days: float = Field(default=7, gt=0, description="raw readings")
    rollup_1m_retention_days: float = Field(default=90, gt=0, description="1-minute rollups (and closed alerts)")
    rollup_1h_retention_days: float = Field(default=730, gt=0, description="1-hour rollups")
    max_bytes: int = Field(default=1024**3, ge=1024 * 1024, description="disk budget of the store (WAL aside)")
    maintenance_interval_s: float = Field(default=60.0, gt=0, description="retention and budget pass period")
    commit_interval_s: float = Field(
        default=1.0, ge=0, le=60,
        description="under light load, the journal and the outboxes commit (an fsync each) at most once per "
                    "interval, and the store once per journal commit: fewer writes to wear an SD card, for a QoS 1 "
                    "PUBACK that waits up to this long; 0: commit within milliseconds (lowest latency, most writes)",
    )

    def store_limits(self, reserved: int = 0) -> StoreLimits:
        """The store's limits; ``reserved``: bytes of the budget taken by others (the broker's sessions)."""
        return StoreLimits(self.raw_retention_days, self.rollup_1m_retention_days, self.rollup_1h_retention_days,
                           self.max_bytes - reserved)
