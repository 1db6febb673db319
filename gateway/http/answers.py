"""How the HTTP API answers: JSON from its models, and errors as RFC 9457 problem objects."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from gateway.errors import GatewayError
from gateway.http import models as m

__all__ = ["HttpError", "bad", "json_response", "problem_response"]


class HttpError(GatewayError):
    """An answer other than 200, as a problem object."""

    def __init__(self, status: int, title: str, detail: str, parameter: str | None = None) -> None:
        super().__init__(detail)
        self.problem = m.Problem(title=title, status=status, detail=detail, parameter=parameter)


def bad(parameter: str, detail: str) -> HttpError:
    return HttpError(400, "Bad parameter", f"{parameter}: {detail}", parameter)


def problem_response(problem: m.Problem, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=problem.status, text=problem.model_dump_json(), content_type="application/problem+json",
        headers=headers,
    )


def json_response(model: BaseModel | list[BaseModel]) -> web.Response:
    if isinstance(model, list):
        body = "[" + ",".join(x.model_dump_json(by_alias=True) for x in model) + "]"
    else:
        body = model.model_dump_json(by_alias=True)
    return web.Response(text=body, content_type="application/json")
