"""Defining an event type, or a new version of one, from the portal's form.

A definition is validated exactly as a catalog file's ``[[types]]`` table is: the same model
(:class:`gateway.config.catalog.CatalogType`) and the same checks over the whole catalog
(:func:`pipeline.catalog.check_declarations`: names, duplicates, overlaps, and the minor-version rule).
What they refuse comes back field by field (``version``, ``value.unit``, ``fields.accuracy.required``),
so the form can show each problem next to its input. An accepted definition is appended to the
portal's catalog file as TOML, read back and compared before the file is replaced (atomically), so
what is on disk is what was checked.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config.catalog import CatalogSettings, CatalogType
from gateway.errors import GatewayError
from pipeline.catalog import CatalogError, check_declarations

__all__ = ["DEMO_PORTAL_FILE", "DefinitionRefused", "FieldProblem", "append_definition", "check_definition",
           "definition_toml"]

DEMO_PORTAL_FILE = "catalog.toml"  # `iotgw demo`'s portal file, in its data directory
FILE_HEADER = (
    "# Event types defined in the iotgw event portal (the dashboard), checked as every catalog file is.\n"
    "# Edit with care: the gateway reads this file at start and whenever the portal adds a definition.\n"
)


@dataclass(frozen=True, slots=True)
class FieldProblem:
    field: str  # the form field at fault, as a path ("fields.accuracy.required"); "" for the whole definition
    message: str


class DefinitionRefused(GatewayError):
    """The definition is not valid; ``problems`` names each field at fault."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field or 'definition'}: {p.message}" for p in problems))
        self.problems = list(problems)


# What the catalog's checks say, and the field each message is about (its texts: pipeline/catalog.py).
_FIELD_RULES: tuple[tuple[str, str], ...] = (
    (r"^field 'value': unit", "value.unit"),
    (r"^field '([^']+)': type", "fields.{0}.type"),
    (r"^field '([^']+)': unit", "fields.{0}.unit"),
    (r"^field '([^']+)': required", "fields.{0}.required"),
    (r"^field '([^']+)' is new and required", "fields.{0}.required"),
    (r"^field '([^']+)' of \S+ is missing", "fields"),
    (r"^field '([^']+)' is a reading field", "fields.{0}"),
    (r"^metric '[^']*' of device class", "metric"),
    (r"^metric ", "metric"),
    (r"^device class ", "device_classes"),
    (r"^version ", "version"),
    (r"^name '[^']*' ends in", "version"),
    (r"^name ", "name"),
)


def field_of(message: str) -> str:
    """The form field a catalog check's message is about ("" when it is about the whole definition)."""
    text = re.sub(r"^event type \S+ \S+: ", "", message)
    if text.endswith("is declared twice") or " is declared twice" in message:
        return "version"
    for pattern, target in _FIELD_RULES:
        match = re.match(pattern, text)
        if match:
            return target.format(*match.groups())
    return ""


def _path(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc if not isinstance(part, int))


def check_definition(body: object, settings: CatalogSettings) -> CatalogType:
    """``body`` (the form, as JSON) as a declaration the catalog accepts beside the ones it has.

    Raises:
        DefinitionRefused: naming each field at fault.
    """
    if not isinstance(body, dict):
        raise DefinitionRefused([FieldProblem("", "the definition must be a JSON object")])
    try:
        decl = CatalogType.model_validate(body)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(FieldProblem(_path(error["loc"]) or field_of(message), message))
        raise DefinitionRefused(problems) from None
    try:
        check_declarations([*settings.all_types, decl])
    except CatalogError as exc:
        message = str(exc)
        text = re.sub(r"^event type \S+ \S+: ", "", message)  # the form says which type it is
        raise DefinitionRefused([FieldProblem(field_of(message), text)]) from None
    return decl


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _inline(table: dict[str, Any]) -> str:
    items = [f"{key} = {_toml(value)}" for key, value in table.items() if value is not None and value != ""]
    return "{ " + ", ".join(items) + " }" if items else "{}"


def definition_toml(decl: CatalogType) -> str:
    """The ``[[types]]`` table of ``decl``, as a catalog file holds it."""
    lines = ["[[types]]", f"name = {_toml(decl.name)}", f"version = {_toml(decl.version)}",
             f"metric = {_toml(decl.metric)}", f"device_classes = {_toml(list(decl.device_classes))}"]
    if decl.description:
        lines.append(f"description = {_toml(decl.description)}")
    value = decl.value.model_dump()
    if any(v not in (None, "") for v in value.values()):
        lines.append(f"value = {_inline(value)}")
    for name, spec in decl.fields.items():
        dumped = spec.model_dump()
        if not dumped["required"]:
            del dumped["required"]
        lines.append(f"fields.{_toml(name)} = {_inline(dumped)}")
    text = "\n".join(lines) + "\n"
    reread = CatalogType.model_validate(tomllib.loads(text)["types"][0])
    if reread != decl:  # never write what would read back as something else
        raise GatewayError(f"the TOML written for {decl.name} {decl.version} does not read back the same")
    return text


def append_definition(path: Path, decl: CatalogType) -> str | None:
    """Append ``decl`` to the catalog file at ``path`` (created if absent), atomically; return what the
    file held before (None if it did not exist), so a failed reload can put it back."""
    try:
        before: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        before = None
    head = FILE_HEADER if before is None else before.rstrip("\n") + "\n"
    write_atomically(path, head + "\n" + definition_toml(decl))
    return before


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restore(path: Path, before: str | None) -> None:
    """Undo :func:`append_definition`."""
    if before is None:
        path.unlink(missing_ok=True)
    else:
        write_atomically(path, before)
