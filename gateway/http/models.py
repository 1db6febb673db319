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


# -- the event portal ---------------------------------------------------------------------------------


class FieldError(_Out):
    field: str = Field(description="the definition's field at fault, as a path (fields.accuracy.required); "
                                   "empty: the definition as a whole")
    message: str


class ValidationProblem(Problem):
    """A definition the catalog refuses (422), field by field."""

    errors: list[FieldError]


class DataField(_Out):
    name: str
    type: str = Field(description="JSON type; a trailing ? is not shown: see required")
    unit: str | None
    required: bool
    minimum: float | None
    maximum: float | None
    description: str


class LearnedProducer(_Out):
    client: str
    messages: int
    last_seen: str
    declared: bool | None = Field(description="an application declares producing this type by this client; "
                                              "null for devices and the gateway itself")


class LearnedConsumer(_Out):
    client: str
    filter: str
    active: bool
    last_seen: str
    declared: bool | None = Field(description="an application declares consuming this type by this client")


class DeclaredBy(_Out):
    application: str
    seen: bool = Field(description="one of its clients was seen doing so (any version of the type)")


class TypeVersion(_Out):
    key: str
    type: str = Field(description="CloudEvents type")
    version: str
    variant: str
    description: str
    topic: str
    source: str = Field(description="built-in, config, or the catalog file that declares it")
    builtin: bool
    device_classes: list[str]
    metric: str | None
    extra_fields: list[str] = Field(description="declared fields read from the device's raw JSON object")
    matched: bool = Field(description="the search matched this version (a type is shown with all its versions)")
    fields: list[DataField]
    producers: list[LearnedProducer]
    consumers: list[LearnedConsumer]
    declared_producers: list[DeclaredBy]
    declared_consumers: list[DeclaredBy]


class FieldChange(_Out):
    field: str
    kind: Literal["added", "removed", "changed"]
    before: str | None
    after: str | None


class VersionStepOut(_Out):
    before: str
    after: str
    compatible: bool = Field(description="same major: readers of the earlier version read this one")
    changes: list[FieldChange]


class TypeGroupOut(_Out):
    name: str
    versions: list[TypeVersion] = Field(description="oldest first")
    steps: list[VersionStepOut]


class PortalTypes(_Out):
    query: str
    portal_file: str | None = Field(description="where definitions are written; null: none can be made here")
    types: list[TypeGroupOut]


class AppEventOut(_Out):
    type: str
    role: Literal["produces", "consumes"]
    seen: bool
    seen_by: list[str]


class ApplicationOut(_Out):
    name: str
    description: str
    owner: str
    clients: list[str]
    events: list[AppEventOut]


class UndeclaredOut(_Out):
    client: str
    role: Literal["produces", "consumes"]
    type: str
    application: str | None = Field(description="the application the client belongs to, which does not declare this")


class Applications(_Out):
    applications: list[ApplicationOut]
    undeclared: list[UndeclaredOut] = Field(description="seen in traffic, declared by no application")


class FilterType(_Out):
    key: str
    type: str
    version: str
    topic: str


class LiveTopicOut(_Out):
    topic: str
    type: str | None = Field(description="the event type the topic belongs to, if any")
    last_seen: str
    messages: int


class SubscriptionTest(_Out):
    filter: str
    syntax: Literal["mqtt", "smf"] = Field(description="the syntax the filter was read in")
    types: list[FilterType]
    topics: list[LiveTopicOut] = Field(description="topics the broker carried lately that it matches, newest first")


class Defined(_Out):
    key: str
    type: str
    version: str
    file: str


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Problem, Health, Device, LatestValue, SeriesPoint, Series, AlertOut, Alerts, EventTypeOut, Catalog,
    GatewayStatus,  # /api/v1/stats: the gateway's status model itself
    ValidationProblem, PortalTypes, Applications, SubscriptionTest, Defined,
)
