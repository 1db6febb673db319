"""``[catalog]``: declared event types and applications, in the configuration file and in catalog files
of their own; ``portal_file`` is the catalog file the event portal writes new definitions to."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from gateway.config.problems import problems
from gateway.settings import Level, Model
from pipeline.catalog import CatalogError, builtin_types, check_declarations, check_name
from pipeline.topics import TopicTemplate

_APP_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.:/@+-]{0,63}$"
_CLIENT = r"^(mqtt|forward|driver|gateway):\S{1,256}$"


class CatalogValue(Model):
    """The measurement itself (the reading's ``value``): its unit and valid range."""

    unit: str | None = Field(default=None, description="declared unit; a reading without one gets it")
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


class CatalogField(Model):
    """An extra field of a declared reading, read from the device's raw JSON object."""

    type: Literal["number", "integer", "string", "boolean", "datetime"]
    unit: str | None = None
    description: str = ""
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None


class CatalogType(Model):
    """A declared event type: readings of one metric from the given device classes."""

    name: str = Field(description="CloudEvents type ending in .v<MAJOR>, e.g. com.example.temperature.v1")
    version: str = Field(description="MAJOR.MINOR: the topic's version level")
    metric: Level
    device_classes: list[Level] = Field(min_length=1)
    description: str = ""
    value: CatalogValue = CatalogValue()
    fields: dict[Level, CatalogField] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _named(self) -> CatalogType:
        problem = check_name(self.name, self.version)
        if problem is not None:
            raise ValueError(problem)
        return self


class CatalogApplication(Model):
    """An application of the event mesh, declared with the event types it produces and consumes, and the
    clients the gateway sees it as (learned traffic is matched to it by them)."""

    name: str = Field(pattern=_APP_NAME, description="e.g. billing, hvac-controller")
    description: str = ""
    owner: str = Field(default="", description="the team or person to ask")
    clients: list[str] = Field(default_factory=list, description="as learned from traffic: mqtt:<client id>, "
                               "forward:<destination>, driver:<device id>, gateway:<gateway id>")
    produces: list[str] = Field(default_factory=list, description="event type names (CloudEvents type)")
    consumes: list[str] = Field(default_factory=list, description="event type names (CloudEvents type)")

    @field_validator("clients")
    @classmethod
    def _clients(cls, value: list[str]) -> list[str]:
        for client in value:
            if not re.fullmatch(_CLIENT, client):
                raise ValueError(f"{client!r}: a client as the gateway learns it, e.g. mqtt:billing-service or "
                                 "forward:central")
        return value


class _CatalogFile(Model):
    types: list[CatalogType] = Field(default_factory=list)
    applications: list[CatalogApplication] = Field(default_factory=list)


class CatalogSettings(Model):
    """``[catalog]``: declared event types, in this file and in catalog files (TOML, ``[[types]]``)."""

    strict: bool = Field(default=False, description="reject readings of metrics no declared type covers")
    files: list[Path] = Field(default_factory=list, description="relative paths start at the working directory")
    types: list[CatalogType] = Field(default_factory=list)
    applications: list[CatalogApplication] = Field(default_factory=list)
    portal_file: Path | None = Field(
        default=None, description="the catalog file the event portal writes definitions to (read like files; "
        "created by the first definition)",
    )
    flush_interval_s: float = Field(default=5.0, ge=0.5, le=3600,
                                    description="how often learned producers/consumers are written to disk")
    _file_types: list[CatalogType] = PrivateAttr(default_factory=list)
    _file_applications: list[CatalogApplication] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _load(self) -> CatalogSettings:
        types: list[CatalogType] = []
        applications: list[CatalogApplication] = []
        for path in self.catalog_files:
            if path == self.portal_file and not path.exists():
                continue  # the portal has not written it yet
            loaded = _load_catalog_file(path)
            types += loaded.types
            applications += loaded.applications
        self._file_types, self._file_applications = types, applications
        try:
            check_declarations(self.all_types)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        check_applications(self.all_applications, {t.name for t in self.all_types})
        return self

    @property
    def catalog_files(self) -> list[Path]:
        """``files``, then ``portal_file`` unless it is one of them."""
        extra = [self.portal_file] if self.portal_file is not None and self.portal_file not in self.files else []
        return [*self.files, *extra]

    @property
    def all_types(self) -> list[CatalogType]:
        """The types declared here, then those of the catalog files."""
        return [*self.types, *self._file_types]

    @property
    def all_applications(self) -> list[CatalogApplication]:
        """The applications declared here, then those of the catalog files."""
        return [*self.applications, *self._file_applications]

    def reread(self) -> CatalogSettings:
        """The same settings with the catalog files read again (the portal wrote one).

        Raises:
            pydantic.ValidationError: when the files no longer make a valid catalog.
        """
        return CatalogSettings.model_validate(self.model_dump())


BUILTIN_TYPE_NAMES = frozenset(t.name for t in builtin_types(TopicTemplate(), lenient_readings=True))


def check_applications(applications: list[CatalogApplication], declared: set[str]) -> None:
    """Unique names, and only event types the catalog has (built-in or declared)."""
    seen: set[str] = set()
    for app in applications:
        if app.name in seen:
            raise ValueError(f"application {app.name!r} is declared twice")
        seen.add(app.name)
        for role in ("produces", "consumes"):
            for name in getattr(app, role):
                if name not in declared and name not in BUILTIN_TYPE_NAMES:
                    raise ValueError(f"application {app.name!r} {role} {name!r}, which the catalog does not have")


def _load_catalog_file(path: Path) -> _CatalogFile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    try:
        return _CatalogFile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: " + "; ".join(problems(exc))) from None
