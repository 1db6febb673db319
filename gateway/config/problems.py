"""A pydantic ``ValidationError`` as the lines a user reads: one ``field.path: reason`` per problem,
``devices[2].baudrate: must be one of 1200, 2400, ...``."""

from __future__ import annotations

from pydantic import ValidationError

from gateway.config.devices import TRANSPORTS
from gateway.config.rules import RULE_KINDS
from gateway.forward.registry import FORWARD_TYPES


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    previous: int | str | None = None
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(previous, int) and item in (*TRANSPORTS, *FORWARD_TYPES, *RULE_KINDS):
            pass  # the discriminated union's tag: not a field the user wrote
        else:
            parts.append(("." if parts else "") + item)
        previous = item
    return "".join(parts) or "(root)"


def problems(exc: ValidationError) -> list[str]:
    """One line per error, its location written as in the file (``forward[1].url``)."""
    lines = []
    for error in exc.errors():
        reason = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            reason = "unknown field"
        elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            forward = error["loc"][:1] == ("forward",)
            key, allowed = ("type", FORWARD_TYPES) if forward else ("transport", TRANSPORTS)
            if error["loc"][:1] == ("rules",):
                key, allowed = "kind", RULE_KINDS
            missing = error["type"] == "union_tag_not_found"
            choices = ", ".join(allowed)
            reason = f"missing {key} (one of {choices})" if missing else f"must be one of {choices}"
        lines.append(f"{_format_loc(tuple(error['loc']))}: {reason}")
    return lines
