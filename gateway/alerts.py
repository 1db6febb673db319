"""The gateway's own alerts (the alert rules' alerts are raised by pipeline/analyze.py).

Today one condition: a full outbox dropped its oldest events (``outbox_dropped``). Drops are
counted as they happen (the forwarder's ``on_drop``) and raised as alert events on the broker at
most once per destination per interval; an alert stays active in the :class:`AlertLog` until one
interval passes without drops. The HTTP API shows the log through its ``AlertView`` protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.publish import Publisher
from pipeline.model import ALERT_TYPE, cloudevent, new_event_id

log = logging.getLogger(__name__)
ALERT_INTERVAL_S = 10.0


@dataclass(slots=True)
class Alert:
    """An alert as the HTTP API shows it: the gateway's own, or an alert rule's (from the store)."""

    id: str
    name: str  # e.g. outbox_dropped
    subject: str  # what it is about: a destination, a device
    severity: str
    raised_at: datetime
    detail: dict[str, Any] = field(default_factory=dict)
    cleared_at: datetime | None = None


class AlertLog:
    """Alerts raised by the gateway: ``raise_`` again while active updates the alert; ``clear_others``
    clears every active alert of a name whose subject was not raised this round."""

    def __init__(self, keep: int = 200) -> None:
        self._active: dict[tuple[str, str], Alert] = {}
        self._recent: deque[Alert] = deque(maxlen=keep)

    def raise_(self, alert_id: str, name: str, subject: str, *, detail: dict[str, Any], severity: str = "warning",
               now: datetime | None = None) -> Alert:
        now = datetime.now(UTC) if now is None else now
        alert = self._active.get((name, subject))
        if alert is None:
            alert = self._active[(name, subject)] = Alert(alert_id, name, subject, severity, now, dict(detail))
            self._recent.appendleft(alert)
        else:
            alert.detail.update(detail)
        return alert

    def clear_others(self, name: str, still: set[str], now: datetime | None = None) -> None:
        now = datetime.now(UTC) if now is None else now
        for key in [k for k in self._active if k[0] == name and k[1] not in still]:
            self._active.pop(key).cleared_at = now

    def active(self) -> list[Alert]:
        return sorted(self._active.values(), key=lambda a: a.raised_at, reverse=True)

    def recent(self, limit: int) -> list[Alert]:
        return list(self._recent)[:limit]


class GatewayAlerts:
    """``dropped`` is the forwarder's ``on_drop``; ``run()`` raises the alerts every interval until
    cancelled, ``publish()`` once more at a stop."""

    def __init__(self, publisher: Publisher, *, site: str, gateway_id: str,
                 interval_s: float = ALERT_INTERVAL_S) -> None:
        self._publisher = publisher
        self._site = site
        self._gateway_id = gateway_id
        self._interval_s = interval_s
        self._drops: dict[str, int] = {}
        self.log = AlertLog()

    def dropped(self, destination: str, count: int) -> None:
        self._drops[destination] = self._drops.get(destination, 0) + count

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.publish()

    async def publish(self) -> None:
        """The drops since the last call, as one alert event per destination."""
        drops, self._drops = self._drops, {}
        self.log.clear_others("outbox_dropped", set(drops))
        for destination, count in drops.items():
            topic = f"alert/raised/1.0/{self._site}/gateway/{self._gateway_id}/outbox_dropped"
            event = cloudevent(
                event_id=new_event_id(), source=f"/iotgw/{self._site}/{self._gateway_id}", type_=ALERT_TYPE,
                subject=topic, time=datetime.now(UTC),
                data={"alert": "outbox_dropped", "destination": destination, "dropped": count,
                      "policy": "drop_oldest"},
            )
            log.warning("forward %s: outbox full, dropped %d oldest event(s)", destination, count)
            self.log.raise_(event["id"], "outbox_dropped", destination, detail=event["data"])
            await self._publisher.event(topic, event)
