"""Topic names, topic filters, NATS subject mapping and the telemetry taxonomy.

Topics are strings of levels separated by ``/``, for example
``telemetry/raw/1.0/site1/pm/pm-1/pm2_5``.  Subscriptions use *filters*, which
the gateway accepts in two syntaxes (both with ``/`` as level separator):

MQTT 3.1.1 (``syntax="mqtt"``)
    ``+`` matches exactly one level, which may be empty.  ``#`` must be the
    last level and matches zero or more levels, so ``a/#`` matches ``a``,
    ``a/`` and ``a/b/c``; ``#`` alone matches every topic.  ``+`` and ``#``
    anywhere else inside a level are invalid; ``*`` and ``>`` are ordinary
    characters.

Solace SMF / NATS style (``syntax="smf"``)
    ``*`` matches exactly one non-empty level.  ``>`` must be the last level
    and matches one or more levels of any content, so ``a/>`` matches ``a/b``,
    ``a/b/c`` and ``a/`` but not ``a``.  A level that ends in ``*`` after a
    prefix (``ab*``) is a Solace *prefix wildcard*: it matches one level that
    starts with the prefix (``ab``, ``abc``, ...).  ``*`` elsewhere in a level (``*a``, ``a*b``) and
    ``>`` inside a level (``a>``) are invalid; ``+`` and ``#`` are ordinary
    characters.

In both syntaxes a wildcard in the *first* level (``+``, ``#``, ``*``, ``>``)
does not match a topic that starts with ``$`` (MQTT-4.7.2-1): ``#`` does not
match ``$SYS/x`` but ``$SYS/#`` does.  A prefix wildcard is not affected: it
only matches a ``$`` level when its prefix itself starts with ``$``.

Topics map one-to-one onto NATS subjects (levels joined by ``.``, special
characters percent-escaped) and filters onto NATS subject filters; see
:func:`topic_to_subject` and :func:`filter_to_subjects`.

:class:`TopicTemplate` describes the gateway's topic taxonomy
(:data:`DEFAULT_TEMPLATE`) and formats and parses topics of that shape.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Final, Generic, Literal, NoReturn, TypeAlias, TypeVar

from pipeline.errors import TopicError

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEFAULT_VERSION",
    "MAX_TOPIC_BYTES",
    "STAGES",
    "FilterSyntax",
    "SeenTopics",
    "TopicFields",
    "TopicFilter",
    "TopicIndex",
    "TopicTemplate",
    "compile_filter",
    "filter_covers",
    "filter_to_subjects",
    "mqtt_filter",
    "subject_to_topic",
    "topic_matches",
    "topic_to_subject",
    "validate_topic",
]

FilterSyntax: TypeAlias = Literal["mqtt", "smf"]

MAX_TOPIC_BYTES: Final = 65535
"""Longest topic or filter, in UTF-8 bytes (the MQTT string length limit)."""

STAGES: Final = ("raw", "valid", "rejected", "agg")
DEFAULT_TEMPLATE: Final = "telemetry/{stage}/{version}/{site}/{device_class}/{device_id}/{metric}"
DEFAULT_VERSION: Final = "1.0"

_SEP: Final = "/"
_STAGE_SET: Final = frozenset(STAGES)

# Kinds of filter tail.
_NO_TAIL: Final = 0
_HASH_TAIL: Final = 1  # MQTT ``#``: zero or more levels
_GT_TAIL: Final = 2  # smf ``>``: one or more levels
_MQTT_CACHE_SIZE: Final = 4096  # compiled MQTT filters kept (subscriptions, ACL rules per client)


def _fail(message: str) -> NoReturn:
    raise TopicError(message)


def _check_string(kind: str, value: object) -> str:
    """Checks shared by topics and filters: type, non-empty, NUL, UTF-8 length."""
    if not isinstance(value, str):
        _fail(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        _fail(f"{kind} must not be empty")
    if "\0" in value:
        _fail(f"{kind} {value!r} contains a NUL character")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        _fail(f"{kind} {value!r} is not encodable as UTF-8 (lone surrogate)")
    if size > MAX_TOPIC_BYTES:
        _fail(f"{kind} is {size} UTF-8 bytes long; the limit is {MAX_TOPIC_BYTES}")
    return value


def validate_topic(topic: str) -> str:
    """Check a topic name used for publishing and return it unchanged.

    A topic must be a non-empty str of at most 65535 UTF-8 bytes without NUL.
    ``+`` and ``#`` are forbidden anywhere (MQTT).  ``*`` and ``>`` are legal
    characters in MQTT topic names, but a level consisting of exactly ``*`` or
    ``>`` is rejected because it could not be represented as a NATS subject
    token.  Empty levels (``a//b``, ``/a``) are allowed, as in MQTT.

    Raises:
        TopicError: if the topic is not valid.
    """
    _check_string("topic", topic)
    if "+" in topic or "#" in topic:
        _fail(f"topic {topic!r} contains an MQTT wildcard character '+' or '#'")
    if "*" in topic or ">" in topic:
        for level in topic.split(_SEP):
            if level in ("*", ">"):
                _fail(f"topic {topic!r} has a wildcard level {level!r}")
    return topic


# --------------------------------------------------------------------------
# Topic filters
# --------------------------------------------------------------------------


def _split_filter(pattern: str, syntax: str) -> tuple[list[str | None], int]:
    """Validate a filter's levels.

    Returns one token per level before any multi-level wildcard (the literal
    text, a prefix wildcard with its trailing ``*``, or None for a whole-level
    single wildcard) and the kind of tail.
    """
    single, multi = ("+", "#") if syntax == "mqtt" else ("*", ">")
    levels = pattern.split(_SEP)
    tokens: list[str | None] = []
    for i, level in enumerate(levels):
        if level == multi:
            if i != len(levels) - 1:
                _fail(f"topic filter {pattern!r}: {multi!r} must be the last level")
            return tokens, _HASH_TAIL if multi == "#" else _GT_TAIL
        if multi in level or (single == "+" and "+" in level and level != "+"):
            bad = multi if multi in level else single
            _fail(f"topic filter {pattern!r}: {bad!r} must occupy a whole level, found it in level {level!r}")
        if level == single:
            tokens.append(None)
            continue
        if single == "*" and "*" in level and "*" in level[:-1]:
            _fail(
                f"topic filter {pattern!r}: '*' must be a whole level or the "
                f"last character of a prefix wildcard such as 'ab*', found "
                f"level {level!r}"
            )
        tokens.append(level)
    return tokens, _NO_TAIL


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A compiled topic filter.

    Construct it with :func:`compile_filter` (which can detect the syntax), or
    directly as ``TopicFilter(pattern, "mqtt" | "smf")``; the pattern is
    validated and compiled on construction and ``TopicError`` is raised if it
    is invalid.  Equality and hashing use ``pattern`` and ``syntax`` only.

    A filter without wildcards is *exact*; it matches only the identical
    topic, whichever syntax it was compiled with.
    """

    pattern: str
    syntax: FilterSyntax
    # Compiled form, filled in by __post_init__.
    _exact: str | None = field(init=False, repr=False, compare=False)
    _literal_getter: Callable[[list[str]], object] | None = field(init=False, repr=False, compare=False)
    _literal_values: object = field(init=False, repr=False, compare=False)
    _prefixes: tuple[tuple[int, str], ...] = field(init=False, repr=False, compare=False)
    _tokens: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    _tail: int = field(init=False, repr=False, compare=False)
    _min_levels: int = field(init=False, repr=False, compare=False)
    _max_levels: int = field(init=False, repr=False, compare=False)
    _dollar_guard: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = _check_string("topic filter", self.pattern)
        if self.syntax not in ("mqtt", "smf"):
            _fail(f"unknown filter syntax {self.syntax!r}; use 'mqtt' or 'smf'")
        tokens, tail = _split_filter(pattern, self.syntax)
        literals = [(i, t) for i, t in enumerate(tokens) if t is not None]
        # smf single-level checks: (index, prefix); the level must be
        # non-empty and start with the prefix ("" for a plain '*').
        prefixes: list[tuple[int, str]] = []
        if self.syntax == "smf":
            prefixes = [(i, t[:-1]) for i, t in literals if t.endswith("*")]
            prefixes += [(i, "") for i, t in enumerate(tokens) if t is None]
            literals = [(i, t) for i, t in literals if not t.endswith("*")]
        head = len(tokens)
        exact = None if tail != _NO_TAIL or len(literals) != head else pattern
        getter: Callable[[list[str]], object] | None = None
        values: object = None
        if literals:
            # itemgetter compares all literal levels in one C-level call.
            indexes = [i for i, _ in literals]
            getter = itemgetter(*indexes)
            texts = tuple(text for _, text in literals)
            values = texts if len(texts) > 1 else texts[0]
        first = pattern.split(_SEP, 1)[0]
        setattr_ = object.__setattr__
        setattr_(self, "_exact", exact)
        setattr_(self, "_literal_getter", getter)
        setattr_(self, "_literal_values", values)
        setattr_(self, "_prefixes", tuple(prefixes))
        setattr_(self, "_tokens", tuple(tokens))
        setattr_(self, "_tail", tail)
        setattr_(self, "_min_levels", head + (1 if tail == _GT_TAIL else 0))
        setattr_(self, "_max_levels", head if tail == _NO_TAIL else -1)
        wildcards = ("+", "#") if self.syntax == "mqtt" else ("*", ">")
        setattr_(self, "_dollar_guard", first in wildcards)

    @property
    def is_exact(self) -> bool:
        """True if the filter has no wildcards and matches a single topic."""
        return self._exact is not None

    def matches(self, topic: str) -> bool:
        """Return True if ``topic`` (a topic name) matches this filter.

        The topic is not validated (this is the per-message hot path); run
        :func:`validate_topic` on untrusted input first.
        """
        exact = self._exact
        if exact is not None:
            return topic == exact
        if self._dollar_guard and topic[:1] == "$":
            return False
        levels = topic.split(_SEP)
        n = len(levels)
        maximum = self._max_levels
        if n < self._min_levels or (maximum >= 0 and n != maximum):
            return False
        getter = self._literal_getter
        if getter is not None and getter(levels) != self._literal_values:
            return False
        for i, prefix in self._prefixes:
            level = levels[i]
            if not level or not level.startswith(prefix):
                return False
        return True

    def covers(self, other: TopicFilter) -> bool:
        """Return True if this filter matches every topic ``other`` matches.

        For an ACL rule and a requested subscription: the rule decides the subscription only when
        it covers all of it. Filters of either syntax compare with each other.
        """
        if self._dollar_guard and other._tokens[:1] and _may_start_with_dollar(other._level(0)):
            return False
        mine, theirs = len(self._tokens), len(other._tokens)
        for i in range(theirs):
            if i == mine:  # the rest of other's topics (one level or more) falls to my tail
                return self._tail != _NO_TAIL
            if not _level_covers(self._level(i), other._level(i)):
                return False
        rest = [self._level(i) for i in range(theirs, mine)]  # my levels past other's fixed ones
        if other._tail == _NO_TAIL:
            return not rest and self._tail != _GT_TAIL
        # other's tail takes any number of levels of any content, from ``fewest`` up
        fewest = max(1 if other._tail == _GT_TAIL else 0, 1 - theirs)  # a topic has one level at least
        needed = len(rest) + (1 if self._tail == _GT_TAIL else 0)
        return self._tail != _NO_TAIL and all(level == _ANY_LEVEL for level in rest) and needed <= fewest

    def _level(self, i: int) -> _Level:
        """Level ``i`` of the filter's fixed part: a literal, or (prefix, must be non-empty)."""
        token = self._tokens[i]
        if token is None:
            return ("", self.syntax == "smf")
        if self.syntax == "smf" and token.endswith("*"):
            return (token[:-1], True)
        return token


class SeenTopics:
    """A filter's answers for the topics it was asked about, kept: for per-message paths, where the same
    topics come again and again. Bounded (forgotten all at once at ``limit``, then learnt again)."""

    __slots__ = ("_answers", "_filter", "_limit")

    def __init__(self, topic_filter: TopicFilter, limit: int = _MQTT_CACHE_SIZE) -> None:
        self._filter = topic_filter
        self._limit = limit
        self._answers: dict[str, bool] = {}

    def matches(self, topic: str) -> bool:
        answer = self._answers.get(topic)
        if answer is None:
            answer = self._filter.matches(topic)
            if len(self._answers) >= self._limit:
                self._answers.clear()
            self._answers[topic] = answer
        return answer

    def __len__(self) -> int:
        return len(self._answers)


# A filter level: literal text, or a single-level wildcard as (prefix, whether the level must be non-empty).
_Level: TypeAlias = str | tuple[str, bool]
_ANY_LEVEL: Final[_Level] = ("", False)  # MQTT ``+``: any level, even an empty one


def _level_covers(mine: _Level, theirs: _Level) -> bool:
    """Every level ``theirs`` accepts, ``mine`` accepts too."""
    if isinstance(mine, str):
        return mine == theirs
    prefix, non_empty = mine
    if isinstance(theirs, str):
        return theirs.startswith(prefix) and (bool(theirs) or not non_empty)
    their_prefix, their_non_empty = theirs
    return their_prefix.startswith(prefix) and (their_non_empty or bool(their_prefix) or not non_empty)


def _may_start_with_dollar(level: _Level) -> bool:
    """Whether a filter whose first level is ``level`` can match a ``$`` topic (a whole-level
    wildcard there cannot: MQTT-4.7.2-1)."""
    return (level if isinstance(level, str) else level[0]).startswith("$")


@functools.lru_cache(maxsize=_MQTT_CACHE_SIZE)
def mqtt_filter(pattern: str) -> TopicFilter:
    """``TopicFilter(pattern, "mqtt")``, compiled once for filters met again and again (the
    broker's subscriptions, ACL rules).

    Raises:
        TopicError: if the pattern is not a valid MQTT filter.
    """
    return TopicFilter(pattern, "mqtt")


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT matching of a topic name against an MQTT filter; an invalid filter matches nothing."""
    try:
        return mqtt_filter(topic_filter).matches(topic)
    except TopicError:
        return False


def filter_covers(rule: str, requested: str) -> bool:
    """True when every topic the MQTT filter ``requested`` can match is matched by ``rule`` too
    (see :meth:`TopicFilter.covers`); False when either is not a valid MQTT filter."""
    try:
        return mqtt_filter(rule).covers(mqtt_filter(requested))
    except TopicError:
        return False


K = TypeVar("K")
V = TypeVar("V")


class _Node(Generic[K, V]):
    __slots__ = ("children", "entries")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}  # a level's text, or "+" and "#" for the wildcards
        self.entries: dict[K, V] = {}  # who subscribed with a filter that ends here


class TopicIndex(Generic[K, V]):
    """MQTT filters (each with a key, say a client id, and a value, say a granted QoS), looked up by
    topic: a tree of filter levels, so a lookup costs the topic's levels and the matches, whatever the
    number of filters that cannot match.

    Matching is :meth:`TopicFilter.matches`' for ``syntax="mqtt"`` (a test holds the two to the same
    answers): ``+`` is one level, ``#`` the rest (the parent level included), and a wildcard in the
    first level does not match a topic that starts with ``$``.
    """

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[K, V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        """The (filter, key) pairs held."""
        return self._size

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Hold ``value`` for ``key`` under ``topic_filter`` (replacing what ``key`` had there); True
        when the pair is new.

        Raises:
            TopicError: if ``topic_filter`` is not an MQTT filter.
        """
        mqtt_filter(topic_filter)
        node = self._root
        for level in topic_filter.split(_SEP):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        new = key not in node.entries
        node.entries[key] = value
        self._size += new
        return new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Forget ``key`` under ``topic_filter``; True when it was there. Emptied branches go."""
        path = [self._root]
        for level in topic_filter.split(_SEP):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        if path[-1].entries.pop(key, _MISSING) is _MISSING:
            return False
        self._size -= 1
        levels = topic_filter.split(_SEP)
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.entries or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]
        return True

    def get(self, topic_filter: str, key: K) -> V | None:
        """What ``key`` holds under exactly ``topic_filter`` (no matching), or None."""
        node: _Node[K, V] | None = self._root
        for level in topic_filter.split(_SEP):
            node = node.children.get(level) if node is not None else None
        return node.entries.get(key) if node is not None else None

    def match(self, topic: str) -> Iterator[tuple[K, V]]:
        """Every (key, value) whose filter matches ``topic``; a key comes once per matching filter."""
        levels = topic.split(_SEP)
        last = len(levels)
        dollar = topic[:1] == "$"
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            children = node.children
            wild = i > 0 or not dollar
            if wild and (rest := children.get("#")) is not None:
                yield from rest.entries.items()
            if i == last:
                yield from node.entries.items()
                continue
            if (exact := children.get(levels[i])) is not None:
                stack.append((exact, i + 1))
            if wild and (one := children.get("+")) is not None:
                stack.append((one, i + 1))

    def matched(self, topic: str) -> bool:
        """Whether any filter matches ``topic``."""
        return next(self.match(topic), None) is not None


_MISSING: Final = object()


def compile_filter(pattern: str, syntax: Literal["auto", "mqtt", "smf"] = "auto") -> TopicFilter:
    """Validate and compile a topic filter.

    With ``syntax="auto"`` a level that is exactly ``+`` or ``#`` selects MQTT
    syntax and a level that is exactly ``*`` or ``>`` selects smf syntax;
    having both kinds is an error.  A pattern with neither is an exact filter
    (reported as ``syntax="mqtt"``; it matches literally in both syntaxes).
    Because an exact filter must mean the same in both syntaxes, in auto mode
    it may not contain ``+``, ``#``, ``*`` or ``>`` characters inside a level
    (``a+`` is invalid MQTT, ``a>`` is invalid smf and ``ab*`` is a prefix
    wildcard in smf but a literal in MQTT): pass an explicit syntax for those.

    Raises:
        TopicError: if the pattern is not a valid filter.
    """
    if syntax == "auto":
        _check_string("topic filter", pattern)
        levels = pattern.split(_SEP)
        mqtt = any(level in ("+", "#") for level in levels)
        smf = any(level in ("*", ">") for level in levels)
        if mqtt and smf:
            _fail(f"topic filter {pattern!r} mixes MQTT ('+', '#') and smf ('*', '>') wildcards")
        if smf:
            return TopicFilter(pattern, "smf")
        if not mqtt:
            for level in levels:
                for ch in "+#*>":
                    if ch in level:
                        _fail(
                            f"topic filter {pattern!r} has no wildcard level to "
                            f"tell MQTT from smf syntax, and its level {level!r} "
                            f"contains {ch!r}, which the two syntaxes treat "
                            f"differently; pass syntax='mqtt' or syntax='smf'"
                        )
        return TopicFilter(pattern, "mqtt")
    if syntax not in ("mqtt", "smf"):
        _fail(f"unknown filter syntax {syntax!r}; use 'auto', 'mqtt' or 'smf'")
    return TopicFilter(pattern, syntax)


# --------------------------------------------------------------------------
# NATS subjects
# --------------------------------------------------------------------------

# Characters escaped in a NATS token: the token separator, the wildcards, the
# escape character itself, whitespace and control characters.
_ESCAPE_RE: Final = re.compile(r"[%.*>\s\x00-\x1f\x7f-\x9f]")
_HEX_DIGITS: Final = frozenset("0123456789ABCDEF")


def _escape_char(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def _escape_level(level: str) -> str:
    return _ESCAPE_RE.sub(_escape_char, level)


def _unescape_token(token: str, subject: str) -> str:
    if "%" not in token:
        return token
    first, *rest = token.split("%")
    data = bytearray(first.encode("utf-8"))
    for part in rest:
        digits = part[:2]
        if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
            _fail(
                f"subject {subject!r}: token {token!r} has a malformed escape; "
                f"'%' must be followed by two upper-case hex digits"
            )
        data.append(int(digits, 16))
        data += part[2:].encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _fail(f"subject {subject!r}: token {token!r} does not decode as UTF-8")


def topic_to_subject(topic: str) -> str:
    """Map a topic onto a NATS subject.

    Levels are joined with ``.``; in each level the characters ``.``, ``*``,
    ``>``, ``%``, whitespace and control characters are replaced by ``%XX``
    for each of their UTF-8 bytes (``.`` -> ``%2E``, ``%`` -> ``%25``,
    ``*`` -> ``%2A``, ``>`` -> ``%3E``, space -> ``%20``).  For example
    ``telemetry/raw/1.0/s/pm/pm-1/pm2_5`` -> ``telemetry.raw.1%2E0.s.pm.pm-1.pm2_5``.

    Raises:
        TopicError: if the topic is invalid (see :func:`validate_topic`) or
            has an empty level, which a NATS subject cannot represent.
    """
    validate_topic(topic)
    levels = topic.split(_SEP)
    if "" in levels:
        _fail(f"topic {topic!r} has an empty level, which NATS cannot represent")
    return ".".join([_escape_level(level) for level in levels])


def subject_to_topic(subject: str) -> str:
    """Map a NATS subject produced by :func:`topic_to_subject` back to its topic.

    This is the exact inverse: only canonical escaping is accepted (upper-case
    hex digits, and exactly the characters that :func:`topic_to_subject`
    escapes), so ``topic_to_subject(subject_to_topic(s)) == s`` for every
    accepted ``s``.

    Raises:
        TopicError: if the subject is empty, has an empty token, is a
            wildcard subject, is not canonically escaped or decodes to an
            invalid topic.
    """
    if not isinstance(subject, str):
        _fail(f"subject must be a str, not {type(subject).__name__}")
    if not subject:
        _fail("subject must not be empty")
    levels: list[str] = []
    for token in subject.split("."):
        if not token:
            _fail(f"subject {subject!r} has an empty token")
        if token in ("*", ">"):
            _fail(f"subject {subject!r} contains the wildcard token {token!r}")
        level = _unescape_token(token, subject)
        if _SEP in level:
            _fail(f"subject {subject!r}: token {token!r} contains '/', which cannot occur in a topic level")
        if _escape_level(level) != token:
            _fail(
                f"subject {subject!r}: token {token!r} is not canonically escaped (expected {_escape_level(level)!r})"
            )
        levels.append(level)
    return validate_topic(_SEP.join(levels))


def filter_to_subjects(f: TopicFilter) -> tuple[str, ...]:
    """NATS subject filters that together match what ``f`` matches.

    ``+`` and ``*`` become ``*``, ``>`` stays ``>``, literal levels are
    escaped as in :func:`topic_to_subject`.  Because MQTT ``#`` also matches
    the parent level, ``a/#`` becomes ``("a", "a.>")``; ``#`` alone becomes
    ``(">",)``.

    Over topics that can be mapped to subjects the correspondence is exact,
    with two caveats:

    * Empty levels cannot be represented in NATS at all, so the MQTT ``+``
      and ``#`` matches of empty levels (``a/+`` matching ``a/``) have no
      counterpart; such topics never reach NATS.
    * NATS has no ``$`` rule: ``*`` and ``>`` in the first token also match
      subjects starting with ``$``, while the topic filter does not match
      ``$`` topics there.  Do not bridge ``$`` topics to NATS.

    Raises:
        TopicError: for a Solace prefix wildcard (``ab*``), which NATS cannot
            express, or for a literal empty level.
    """
    parts: list[str] = []
    for i, token in enumerate(f._tokens):
        if token is None:
            parts.append("*")
            continue
        if f.syntax == "smf" and token.endswith("*"):
            _fail(
                f"topic filter {f.pattern!r}: the prefix wildcard {token!r} "
                f"cannot be expressed as a NATS subject filter"
            )
        if not token:
            _fail(f"topic filter {f.pattern!r}: level {i} is empty, which NATS cannot represent")
        parts.append(_escape_level(token))
    head = ".".join(parts)
    if f._tail == _HASH_TAIL:
        return (head, head + ".>") if head else (">",)
    if f._tail == _GT_TAIL:
        return (head + ".>",) if head else (">",)
    return (head,)


# --------------------------------------------------------------------------
# Taxonomy
# --------------------------------------------------------------------------

_FIELD_NAMES: Final = (
    "stage",
    "version",
    "site",
    "device_class",
    "device_id",
    "metric",
)
_REQUIRED_FIELDS: Final = ("stage", "device_id", "metric")
_PARSE_CACHE_SIZE: Final = 4096


@dataclass(frozen=True, slots=True)
class TopicFields:
    """The named parts of a telemetry topic."""

    stage: str
    version: str
    site: str
    device_class: str
    device_id: str
    metric: str


# Slot setters for the fast construction of TopicFields in TopicTemplate.parse.
_new_fields: Final = object.__new__
_set_stage, _set_version, _set_site, _set_device_class, _set_device_id, _set_metric = (
    getattr(TopicFields, name).__set__ for name in _FIELD_NAMES
)


def _level_problem(value: str) -> str | None:
    """Why ``value`` cannot be a topic level, or None if it can."""
    problem: str | None = None
    if not isinstance(value, str):
        problem = f"must be a str, not {type(value).__name__}"
    elif not value:
        problem = "must not be empty"
    elif _SEP in value:
        problem = "must not contain '/'"
    elif "\0" in value:
        problem = "must not contain a NUL character"
    elif "+" in value or "#" in value:
        problem = "must not contain '+' or '#'"
    elif value in ("*", ">"):
        problem = "must not be a wildcard level"
    return problem


class TopicTemplate:
    """An immutable topic layout such as :data:`DEFAULT_TEMPLATE`.

    Levels are either literals or one of the placeholders ``{stage}``,
    ``{version}``, ``{site}``, ``{device_class}``, ``{device_id}`` and
    ``{metric}``, each filling a whole level and used at most once;
    ``{stage}``, ``{device_id}`` and ``{metric}`` are required.  Literal
    levels must be non-empty and free of wildcards.

    Field values must be valid, non-wildcard topic levels.  A field placed in
    the first level must also not start with ``$`` (such topics are reserved
    for brokers and first-level wildcards skip them), so that
    :meth:`stage_filter` matches every topic that :meth:`parse` accepts.

    Raises:
        TopicError: from the constructor if the template is invalid.
    """

    __slots__ = (
        "_cache",
        "_dollar_field",
        "_field_index",
        "_literals",
        "_nlevels",
        "_stage_filters",
        "_stage_index",
        "_template",
    )

    _template: str
    _nlevels: int
    _literals: tuple[tuple[int, str], ...]
    _field_index: tuple[int, ...]
    _stage_index: int
    _stage_filters: dict[str, TopicFilter]
    _cache: dict[str, TopicFields | None]
    _dollar_field: str | None

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        if not isinstance(template, str) or not template:
            _fail("topic template must be a non-empty str")
        levels = template.split(_SEP)
        positions: dict[str, int] = {}
        literals: list[tuple[int, str]] = []
        for i, level in enumerate(levels):
            if "{" in level or "}" in level:
                name = level[1:-1]
                if not (level.startswith("{") and level.endswith("}")) or ("{" in name or "}" in name):
                    _fail(f"topic template {template!r}: a placeholder must fill a whole level, found level {level!r}")
                if name not in _FIELD_NAMES:
                    _fail(
                        f"topic template {template!r}: unknown placeholder "
                        f"{level!r}; allowed: " + ", ".join("{" + n + "}" for n in _FIELD_NAMES)
                    )
                if name in positions:
                    _fail(f"topic template {template!r}: placeholder {level!r} is used more than once")
                positions[name] = i
                continue
            problem = _level_problem(level)
            if problem is not None:
                _fail(f"topic template {template!r}: literal level {i} ({level!r}) {problem}")
            literals.append((i, level))
        missing = [name for name in _REQUIRED_FIELDS if name not in positions]
        if missing:
            _fail(
                f"topic template {template!r} lacks required placeholder(s) "
                + ", ".join("{" + n + "}" for n in missing)
            )
        nlevels = len(levels)
        setattr_ = object.__setattr__
        setattr_(self, "_template", template)
        setattr_(self, "_nlevels", nlevels)
        setattr_(self, "_literals", tuple(literals))
        # Missing placeholders point one past the end, where parse() puts "".
        setattr_(
            self,
            "_field_index",
            tuple(positions.get(name, nlevels) for name in _FIELD_NAMES),
        )
        setattr_(self, "_stage_index", positions["stage"])
        # A placeholder in the first level must not start with '$': that would
        # make a reserved broker topic, which '+' in stage_filter skips.
        first_field = [name for name, i in positions.items() if i == 0]
        setattr_(self, "_dollar_field", first_field[0] if first_field else None)
        stage_filters: dict[str, TopicFilter] = {}
        for stage in STAGES:
            parts = ["+"] * nlevels
            for i, literal in literals:
                parts[i] = literal
            parts[positions["stage"]] = stage
            stage_filters[stage] = TopicFilter(_SEP.join(parts), "mqtt")
        setattr_(self, "_stage_filters", stage_filters)
        setattr_(self, "_cache", {})

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._template!r})"

    def __reduce__(self) -> tuple[type[TopicTemplate], tuple[str]]:
        return (TopicTemplate, (self._template,))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TopicTemplate):
            return NotImplemented
        return self._template == other._template

    def __hash__(self) -> int:
        return hash((TopicTemplate, self._template))

    @property
    def template(self) -> str:
        """The template string."""
        return self._template

    def format(self, fields: TopicFields) -> str:
        """Build the topic for ``fields``.

        Only the fields that the template uses are checked and written.

        Raises:
            TopicError: naming the field, if a used field is not a valid
                topic level or the stage is not one of :data:`STAGES`.
        """
        levels = [""] * self._nlevels
        for i, literal in self._literals:
            levels[i] = literal
        for name, i in zip(_FIELD_NAMES, self._field_index, strict=True):
            if i == self._nlevels:
                continue
            value: str = getattr(fields, name)
            problem = _level_problem(value)
            if problem is not None:
                _fail(f"topic field {name}={value!r} {problem}")
            levels[i] = value
        if fields.stage not in _STAGE_SET:
            _fail(f"topic field stage={fields.stage!r} must be one of {STAGES}")
        dollar_field = self._dollar_field
        if dollar_field is not None and levels[0].startswith("$"):
            _fail(
                f"topic field {dollar_field}={levels[0]!r} must not start with '$' in the first level (reserved topics)"
            )
        return _check_string("topic", _SEP.join(levels))

    def parse(self, topic: str) -> TopicFields | None:
        """Split ``topic`` into fields, or return None if it does not fit.

        A topic fits when it has the template's level count, every literal
        level matches, the stage is one of :data:`STAGES`, and every level
        would be accepted by :meth:`format` (so ``format(parse(t)) == t``).
        Placeholders absent from the template parse as ``""``.

        Results are memoised per template in a bounded cache (a gateway sees
        the same topics over and over); the returned objects are immutable.
        """
        cache = self._cache
        if topic in cache:
            return cache[topic]
        result = self._parse(topic)
        if len(cache) >= _PARSE_CACHE_SIZE:
            cache.clear()
        cache[topic] = result
        return result

    def _parse(self, topic: str) -> TopicFields | None:
        levels = topic.split(_SEP)
        if len(levels) != self._nlevels:
            return None
        for i, literal in self._literals:
            if levels[i] != literal:
                return None
        if levels[self._stage_index] not in _STAGE_SET:
            return None
        # Reject what format() would refuse: empty levels, '+', '#', NUL,
        # whole-level '*' / '>', a '$' placeholder in the first level and
        # oversized topics (cheapest tests first).
        if (
            (topic[0] == "$" and self._dollar_field is not None)
            or "//" in topic
            or topic[0] == _SEP
            or topic[-1] == _SEP
            or "+" in topic
            or "#" in topic
            or "\0" in topic
            or (("*" in topic or ">" in topic) and ("*" in levels or ">" in levels))
            or (len(topic) * 4 > MAX_TOPIC_BYTES and len(topic.encode("utf-8", "replace")) > MAX_TOPIC_BYTES)
        ):
            return None
        levels.append("")  # where absent placeholders point
        stage, version, site, device_class, device_id, metric = self._field_index
        # Same result as TopicFields(...), about twice as fast: the generated
        # __init__ of a frozen dataclass goes through object.__setattr__.
        fields = _new_fields(TopicFields)
        _set_stage(fields, levels[stage])
        _set_version(fields, levels[version])
        _set_site(fields, levels[site])
        _set_device_class(fields, levels[device_class])
        _set_device_id(fields, levels[device_id])
        _set_metric(fields, levels[metric])
        return fields

    def stage_filter(self, stage: str) -> TopicFilter:
        """The MQTT filter matching every topic of ``stage``.

        Placeholders become ``+`` and the stage level is fixed.  Being an MQTT
        filter, it also matches topics with empty placeholder levels, which
        :meth:`parse` rejects.

        Raises:
            TopicError: if ``stage`` is not one of :data:`STAGES`.
        """
        try:
            return self._stage_filters[stage]
        except (KeyError, TypeError):
            _fail(f"stage {stage!r} must be one of {STAGES}")

    def with_stage(self, topic: str, stage: str) -> str | None:
        """``topic`` moved to ``stage``, or None if it does not parse.

        Raises:
            TopicError: if ``stage`` is not one of :data:`STAGES`.
        """
        if stage not in _STAGE_SET:
            _fail(f"stage {stage!r} must be one of {STAGES}")
        if self.parse(topic) is None:
            return None
        levels = topic.split(_SEP)
        levels[self._stage_index] = stage
        return _SEP.join(levels)
