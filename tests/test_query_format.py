"""`iotgw query` prints values as a person reads them: a mean's binary noise (21.449999999999996) is
rounded away, in every format, while every digit a sensor could report stays."""

from __future__ import annotations

import json

import pytest

from gateway.query import Point, render_points, shown


@pytest.mark.parametrize(("value", "text"), [
    (21.449999999999996, "21.45"),
    ((0.1 + 0.2) / 3 * 3, "0.3"),
    (650.0, "650.0"),
    (-2.0, "-2.0"),
    (0.1, "0.1"),
    (1013.25, "1013.25"),
    (123456.789, "123456.789"),
    (123_456_789_012.0, "123456789012.0"),  # a 12-digit energy counter keeps every digit
    (1.5e-7, "1.5e-07"),
])
def test_shown(value: float, text: str) -> None:
    assert repr(shown(value)) == text


def test_every_format_rounds_the_noise() -> None:
    points = [Point(1_700_000_000_000, 21.449999999999996)]
    assert render_points(points, "table").split() == ["2023-11-14T22:13:20.000Z", "21.45"]
    assert render_points(points, "csv").splitlines()[1] == "2023-11-14T22:13:20.000Z,21.45"
    assert '"value": 21.45' in render_points(points, "json")
    assert json.loads(render_points(points, "json"))[0]["value"] == 21.45
