"""What the HTTP API answers, as pydantic models: the OpenAPI description's schemas come from these.
Also where it answers: :data:`API`, the path prefix of its JSON resources."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.status import GatewayStatus

API = "/api/v1"


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Problem(_Out):
    """An error (RFC 9457 problem details)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    parameter: str | None = Field(default=None, description="the query parameter at fault, for a 400")


class Health(_Out):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict, description="component -> 'up' or why it is not")


class Device(_Out):
    device_id: str
    transport: str
    device_class: str
    site: str
    first_seen: str = Field(description="RFC 3339, UTC")
    last_seen: str = Field(description="RFC 3339, UTC")
    metrics: list[str]
    rssi_dbm: float | None = Field(default=None, description="signal strength where a radio reported one")
    battery_pct: float | None = Field(default=None, description="the latest value of a 'battery' metric")


class LatestValue(_Out):
    device_id: str
    metric: str
    unit: str | None
    ts: str
    value: float


class SeriesPoint(_Out):
    ts: str
    value: float


class Series(_Out):
    device_id: str
    metric: str
    unit: str | None
    agg: str | None = Field(description="null for raw points")
    bucket_ms: int | None = Field(description="bucket size; null for raw points")
    from_: str | None = Field(alias="from", description="start of the range asked for (RFC 3339), if any")
    to: str | None = Field(description="end of the range asked for (RFC 3339), if any")
    points: list[SeriesPoint]


class AlertOut(_Out):
    id: str
    name: str
    subject: str
    severity: str
    raised_at: str
    cleared_at: str | None
    detail: dict[str, Any]


class Alerts(_Out):
    active: list[AlertOut]
    recent: list[AlertOut]


class EventTypeOut(_Out):
    type: str
    description: str
    topic: str
    schema_: dict[str, Any] = Field(alias="schema", description="JSON Schema of the event's data")
    producers: list[str]
    consumers: list[str]


class Catalog(_Out):
    types: list[EventTypeOut]


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Problem, Health, Device, LatestValue, SeriesPoint, Series, AlertOut, Alerts, EventTypeOut, Catalog,
    GatewayStatus,  # /api/v1/stats: the gateway's status model itself
)
