"""Stream names from topics: a template over the taxonomy's fields (pure, no client library).

``{stage}``, ``{version}``, ``{site}``, ``{device_class}``, ``{device_id}`` and ``{metric}`` are the
fields of a topic the taxonomy parses (:class:`pipeline.topics.TopicTemplate`); ``{level0}``,
``{level1}``, ... are the topic's levels. A topic outside the taxonomy (``alert/raised/...``,
``cmdack/...``) has its first level as ``{stage}``, so the default ``iotgw:{stage}`` gives
``iotgw:valid``, ``iotgw:agg``, ``iotgw:alert``, ``iotgw:cmdack``; any other placeholder with no value
(a level past the end, an empty level, a field outside the taxonomy) is ``_``.
"""

from __future__ import annotations

import string
from typing import Final

from pipeline.topics import TopicTemplate

__all__ = ["ABSENT", "StreamNames"]

ABSENT: Final = "_"
_FIELDS: Final = ("stage", "version", "site", "device_class", "device_id", "metric")
_CACHE_SIZE: Final = 4096


class StreamNames:
    """``names(topic)``: the stream an event on ``topic`` goes to."""

    __slots__ = ("_cache", "_parts", "_taxonomy", "template")

    def __init__(self, template: str, taxonomy: TopicTemplate) -> None:
        self.template = template
        self._taxonomy = taxonomy
        self._parts = [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]
        self._cache: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.template!r})"

    def __call__(self, topic: str) -> str:
        name = self._cache.get(topic)
        if name is None:
            name = self._name(topic)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = name
        return name

    def _name(self, topic: str) -> str:
        levels = topic.split("/")
        fields = self._taxonomy.parse(topic)
        values: dict[str, str] = (
            {f: getattr(fields, f) for f in _FIELDS} if fields is not None else {"stage": levels[0]}
        )
        out: list[str] = []
        for literal, name in self._parts:
            out.append(literal)
            if name is None:
                continue
            if name.startswith("level"):
                index = int(name[5:])
                value = levels[index] if index < len(levels) else ""
            else:
                value = values.get(name, "")
            out.append(value or ABSENT)
        return "".join(out)
