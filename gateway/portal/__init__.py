"""The event portal: the design-time and run-time view of the event mesh, in the dashboard.

- :mod:`.types`: event types as records (fields, learned producers and consumers, declaring
  applications), a search over them, and each type's versions side by side with what changed;
- :mod:`.applications`: declared applications beside learned traffic, differences flagged;
- :mod:`.define`: a definition from the form, validated as catalog files are and appended to one;
- :mod:`.topics`: the topics the broker carried lately (for the subscription tester);
- :mod:`.service`: :class:`Portal`, what the HTTP API asks.
"""

from __future__ import annotations

from gateway.portal.define import DefinitionRefused, FieldProblem
from gateway.portal.service import FilterMatch, Portal, PortalUnavailableError, with_applications
from gateway.portal.topics import LiveTopic, RecentTopics

__all__ = [
    "DefinitionRefused",
    "FieldProblem",
    "FilterMatch",
    "LiveTopic",
    "Portal",
    "PortalUnavailableError",
    "RecentTopics",
    "with_applications",
]
