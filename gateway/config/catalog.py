"""``[catalog]``: declared event types, in the configuration file and in catalog files of their own."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from gateway.config.problems import problems
from gateway.settings import Level, Model
from pipeline.catalog import CatalogError, check_declarations, check_name


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


class _CatalogFile(Model):
    types: list[CatalogType] = Field(default_factory=list)


class CatalogSettings(Model):
    """``[catalog]``: declared event types, in this file and in catalog files (TOML, ``[[types]]``)."""

    strict: bool = Field(default=False, description="reject readings of metrics no declared type covers")
    files: list[Path] = Field(default_factory=list, description="relative paths start at the working directory")
    types: list[CatalogType] = Field(default_factory=list)
    flush_interval_s: float = Field(default=5.0, ge=0.5, le=3600,
                                    description="how often learned producers/consumers are written to disk")
    _file_types: list[CatalogType] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _load(self) -> CatalogSettings:
        loaded: list[CatalogType] = []
        for path in self.files:
            loaded += _load_catalog_file(path)
        self._file_types = loaded
        try:
            check_declarations(self.all_types)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def all_types(self) -> list[CatalogType]:
        """The types declared here, then those of the catalog files."""
        return [*self.types, *self._file_types]


def _load_catalog_file(path: Path) -> list[CatalogType]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    try:
        return _CatalogFile.model_validate(data).types
    except ValidationError as exc:
        raise ValueError(f"{path}: " + "; ".join(problems(exc))) from None
