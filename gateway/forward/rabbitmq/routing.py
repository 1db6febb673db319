"""Topics as AMQP routing keys, topic filters as binding keys (pure functions, no client library).

An AMQP topic exchange routes on *words* separated by ``.``; a binding key matches a word with ``*``
(exactly one word, which may be empty) and any number of words, none included, with ``#``. A topic's
levels become the routing key's words; inside a level the characters AMQP gives a meaning to are
percent-escaped, as the NATS mapping does (:func:`pipeline.topics.topic_to_subject`):

==========  =======  ==================================================================
character   written  why
==========  =======  ==================================================================
``.``       ``%2E``  the word separator (``1.0`` -> ``1%2E0``)
``*``       ``%2A``  a whole-word ``*`` in a binding is a wildcard
``#``       ``%23``  the same for ``#``
``%``       ``%25``  the escape character itself
==========  =======  ==================================================================

so ``telemetry/valid/1.0/site-a/air/co2-1/co2`` is routed as
``telemetry.valid.1%2E0.site-a.air.co2-1.co2``, and :func:`routing_key_to_topic` is its exact inverse.
Empty levels are empty words (AMQP has them too). A routing key is at most 255 bytes.

Filters map faithfully where AMQP can say the same thing, and to the narrowest broader binding
where it cannot; :func:`binding_key` says which (``exact``), so a consumer checks what arrives
against the filter itself:

==================  ====================  ==========================================================
filter              binding key           same set of topics?
==================  ====================  ==========================================================
MQTT ``+``          ``*``                 yes (both take one level, empty too)
MQTT ``a/#``        ``a.#``               yes (both also match the parent ``a``)
MQTT ``#``          ``#``                 broader: MQTT's ``#`` skips ``$`` topics
smf ``>``           ``*.#``               yes (one level or more)
smf ``*``           ``*``                 broader: smf's ``*`` needs a non-empty level
smf ``ab*``         ``*``                 broader: AMQP has no prefix wildcard
==================  ====================  ==========================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pipeline.errors import TopicError
from pipeline.topics import TopicFilter, validate_topic

__all__ = ["MAX_ROUTING_KEY_BYTES", "Binding", "binding_key", "routing_key_to_topic", "topic_to_routing_key"]

MAX_ROUTING_KEY_BYTES: Final = 255  # an AMQP 0-9-1 shortstr
_ESCAPES: Final = {".": "%2E", "*": "%2A", "#": "%23", "%": "%25"}
_ESCAPE_RE: Final = re.compile(r"[.*#%]")
_UNESCAPE_RE: Final = re.compile(r"%(2E|2A|23|25)")
_UNESCAPES: Final = {code[1:]: char for char, code in _ESCAPES.items()}


def _escape(level: str) -> str:
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], level) if _ESCAPE_RE.search(level) else level


def topic_to_routing_key(topic: str) -> str:
    """The routing key of ``topic`` (levels -> words, AMQP's characters escaped).

    Raises:
        TopicError: for a topic that is not valid, or whose key is longer than 255 bytes.
    """
    validate_topic(topic)
    key = ".".join([_escape(level) for level in topic.split("/")])
    if len(key.encode("utf-8")) > MAX_ROUTING_KEY_BYTES:
        raise TopicError(f"topic {topic!r}: its AMQP routing key would be longer than {MAX_ROUTING_KEY_BYTES} bytes")
    return key


def routing_key_to_topic(key: str) -> str:
    """The topic a routing key made by :func:`topic_to_routing_key` came from.

    Raises:
        TopicError: when the key does not decode to a valid topic (a ``/`` in a word, say).
    """
    words = key.split(".")
    if any("/" in word for word in words):
        raise TopicError(f"routing key {key!r} has a '/' inside a word: not a mapped topic")
    return validate_topic("/".join(_UNESCAPE_RE.sub(lambda m: _UNESCAPES[m.group(1)], w) for w in words))


@dataclass(frozen=True, slots=True)
class Binding:
    """The binding key for a filter, and whether it matches exactly the filter's topics (when not, it
    matches more, and what arrives must be checked against the filter)."""

    key: str
    exact: bool


def binding_key(f: TopicFilter) -> Binding:
    """The binding key that delivers every topic ``f`` matches (see the table in the module docstring).

    Raises:
        TopicError: when the binding key would be longer than 255 bytes.
    """
    single, multi = ("+", "#") if f.syntax == "mqtt" else ("*", ">")
    words: list[str] = []
    exact = True
    levels = f.pattern.split("/")
    for i, level in enumerate(levels):
        if level == multi and i == len(levels) - 1:
            if f.syntax == "mqtt":
                words.append("#")
                exact = exact and i > 0  # a leading '#' skips '$' topics in MQTT, never in AMQP
            else:
                words += ["*", "#"]
                exact = exact and i > 0
            break
        if level == single:
            words.append("*")
            # MQTT '+' takes an empty level like AMQP's '*'; smf '*' does not. A leading wildcard
            # skips '$' topics in both syntaxes, never in AMQP.
            exact = exact and f.syntax == "mqtt" and i > 0
        elif f.syntax == "smf" and level.endswith("*"):
            words.append("*")  # a Solace prefix wildcard: AMQP has none
            exact = False
        else:
            words.append(_escape(level))
    key = ".".join(words)
    if len(key.encode("utf-8")) > MAX_ROUTING_KEY_BYTES:
        raise TopicError(f"filter {f.pattern!r}: its AMQP binding key would be longer than {MAX_ROUTING_KEY_BYTES} "
                         "bytes")
    return Binding(key, exact)
