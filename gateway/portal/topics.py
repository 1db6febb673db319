"""The topics the embedded broker carried lately, for the portal's subscription tester.

:class:`RecentTopics` stands between the broker and the traffic learner (the broker's ``Traffic``
interface): it passes every call on and remembers each topic published, with when and how often, up
to ``limit`` topics (the least recently published go first). One dictionary update per message.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LiveTopic", "RecentTopics", "Traffic"]


class Traffic(Protocol):
    def published(self, topic: str, origin: str | None, count: int = 1) -> None:
        """``count`` messages on ``topic`` just now (a burst's, counted at once)."""

    def subscribed(self, client: str, topic_filter: str) -> None: ...

    def unsubscribed(self, client: str, topic_filter: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LiveTopic:
    topic: str
    last_seen_ms: int
    messages: int


class RecentTopics:
    def __init__(self, inner: Traffic, *, limit: int = 2000, clock: Callable[[], float] = time.time) -> None:
        self._inner = inner
        self._limit = limit
        self._clock = clock
        self._topics: OrderedDict[str, list[int]] = OrderedDict()  # topic -> [last seen ms, messages]

    def published(self, topic: str, origin: str | None, count: int = 1) -> None:
        self._inner.published(topic, origin, count)
        now = int(self._clock() * 1000)
        seen = self._topics.get(topic)
        if seen is None:
            self._topics[topic] = [now, count]
            if len(self._topics) > self._limit:
                self._topics.popitem(last=False)
        else:
            seen[0] = now
            seen[1] += count
            self._topics.move_to_end(topic)

    def subscribed(self, client: str, topic_filter: str) -> None:
        self._inner.subscribed(client, topic_filter)

    def unsubscribed(self, client: str, topic_filter: str) -> None:
        self._inner.unsubscribed(client, topic_filter)

    def topics(self) -> list[LiveTopic]:
        """Newest first."""
        return [LiveTopic(topic, last, count) for topic, (last, count) in reversed(self._topics.items())]
