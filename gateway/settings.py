"""The building blocks of every settings model: a frozen model that refuses unknown fields, names that
become topic levels, and secrets given inline, in a file or in an environment variable.

Shared by :mod:`gateway.config` (the sections of the file) and the destinations of
:mod:`gateway.forward` (each owns its ``[[forward]]`` model), so neither imports the other for them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

_LEVEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _level(value: str) -> str:
    """A value that becomes one topic level: letters, digits, '_', '-', '.'."""
    if not _LEVEL.fullmatch(value):
        raise ValueError("must be letters, digits, '_', '-' or '.' (it becomes a topic level)")
    return value


Level = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_level)]


class Model(BaseModel):
    """Every settings model: immutable once loaded, and a misspelt field is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret_file(value: object) -> object:
    if not isinstance(value, str | Path):
        return value  # let the type check name the problem
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read {value} ({reason})") from None
    return SecretStr(text.rstrip("\r\n"))


def _read_secret_env(value: object) -> object:
    if not isinstance(value, str):
        return value
    if value not in os.environ:
        raise ValueError(f"environment variable {value} is not set")
    return SecretStr(os.environ[value])


# The secrets convention: a field ``x: SecretStr | None`` of a :class:`WithSecrets` model may be given
# instead as ``x_file = "path"`` (the file's text, without its final newline) or ``x_env = "VARIABLE"``.
SecretFile = Annotated[SecretStr, BeforeValidator(_read_secret_file)]
SecretEnv = Annotated[SecretStr, BeforeValidator(_read_secret_env)]


class WithSecrets(Model):
    """Folds ``x_file`` / ``x_env`` into ``x`` (read at load time; at most one of the three)."""

    @model_validator(mode="after")
    def _fold_secrets(self) -> WithSecrets:
        fields = type(self).model_fields
        for name in fields:
            for source in (f"{name}_file", f"{name}_env"):
                value = getattr(self, source, None) if source in fields else None
                if value is None:
                    continue
                if getattr(self, name) is not None:
                    raise ValueError(f"give only one of {name}, {name}_file, {name}_env")
                self.__dict__[name] = value  # frozen model: set once, during validation
        return self
