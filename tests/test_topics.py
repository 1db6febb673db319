"""Tests for pipeline.topics: filters, NATS subject mapping and the taxonomy."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import TopicError
from pipeline.topics import (
    DEFAULT_TEMPLATE,
    DEFAULT_VERSION,
    STAGES,
    SeenTopics,
    TopicFields,
    TopicFilter,
    TopicIndex,
    TopicTemplate,
    compile_filter,
    filter_covers,
    filter_to_subjects,
    mqtt_filter,
    subject_to_topic,
    topic_matches,
    topic_to_subject,
    validate_topic,
)

Syntax = Literal["mqtt", "smf"]

EXAMPLE = "telemetry/raw/1.0/site1/pm/pm-1/pm2_5"
PROPERTY = settings(max_examples=100, deadline=None)


# ---------------------------------------------------------------------------
# Independent reference implementations (deliberately naive)
# ---------------------------------------------------------------------------


def ref_matches(pattern: str, syntax: Syntax, topic: str) -> bool:
    """Recursive, level-by-level reading of the MQTT / Solace rules."""
    flevels = pattern.split("/")
    first_wildcards = ("+", "#") if syntax == "mqtt" else ("*", ">")
    if flevels[0] in first_wildcards and topic.startswith("$"):
        return False
    return _ref(flevels, topic.split("/"), syntax)


def _ref(flevels: list[str], tlevels: list[str], syntax: Syntax) -> bool:
    if not flevels:
        return not tlevels
    head, rest = flevels[0], flevels[1:]
    if syntax == "mqtt":
        if head == "#":  # zero or more levels
            return True
        if not tlevels:
            return False
        ok = head in ("+", tlevels[0])
    else:
        if head == ">":  # one or more levels
            return len(tlevels) >= 1
        if not tlevels:
            return False
        if head == "*":
            ok = tlevels[0] != ""
        elif head.endswith("*"):
            ok = tlevels[0].startswith(head[:-1])
        else:
            ok = head == tlevels[0]
    return ok and _ref(rest, tlevels[1:], syntax)


def nats_matches(subject_filter: str, subject: str) -> bool:
    """NATS rules: '*' is one token, '>' one or more trailing tokens."""
    ftokens = subject_filter.split(".")
    stokens = subject.split(".")
    for i, ftoken in enumerate(ftokens):
        if ftoken == ">":
            return len(stokens) > i
        if i >= len(stokens):
            return False
        if ftoken not in ("*", stokens[i]):
            return False
    return len(ftokens) == len(stokens)


# ---------------------------------------------------------------------------
# Matching: spec table
# ---------------------------------------------------------------------------

MATCH_CASES = [
    # MQTT '#'
    ("a/#", "mqtt", "a", True, "mqtt a/# matches parent a"),
    ("a/#", "mqtt", "a/", True, "mqtt a/# matches a/ (empty level)"),
    ("a/#", "mqtt", "a/b/c", True, "mqtt a/# matches a/b/c"),
    ("a/#", "mqtt", "ab", False, "mqtt a/# not ab"),
    ("a/#", "mqtt", "b/a", False, "mqtt a/# not b/a"),
    ("#", "mqtt", "a/b/c", True, "mqtt # matches everything"),
    ("#", "mqtt", "/", True, "mqtt # matches /"),
    ("+/#", "mqtt", "a", True, "mqtt +/# matches a"),
    ("telemetry/raw/#", "mqtt", EXAMPLE, True, "mqtt telemetry/raw/#"),
    ("telemetry/valid/#", "mqtt", EXAMPLE, False, "mqtt other stage"),
    # MQTT '+'
    ("a/+", "mqtt", "a/b", True, "mqtt a/+ matches a/b"),
    ("a/+", "mqtt", "a/", True, "mqtt + matches an empty level"),
    ("a/+", "mqtt", "a", False, "mqtt a/+ not a"),
    ("a/+", "mqtt", "a/b/c", False, "mqtt a/+ not a/b/c"),
    ("+/x", "mqtt", "/x", True, "mqtt + matches empty first level"),
    ("+/+", "mqtt", "/", True, "mqtt +/+ matches /"),
    ("+", "mqtt", "a/b", False, "mqtt + is one level"),
    ("telemetry/+/1.0/+/pm/+/pm2_5", "mqtt", EXAMPLE, True, "mqtt spec example"),
    # MQTT: smf characters are literal
    ("a/*", "mqtt", "a/*", True, "mqtt * is literal"),
    ("a/*", "mqtt", "a/b", False, "mqtt * is not a wildcard"),
    ("a/>", "mqtt", "a/b", False, "mqtt > is not a wildcard"),
    # MQTT '$' rule
    ("#", "mqtt", "$SYS/x", False, "mqtt # skips $SYS"),
    ("+/x", "mqtt", "$SYS/x", False, "mqtt +/x skips $SYS/x"),
    ("+/#", "mqtt", "$SYS", False, "mqtt +/# skips $SYS"),
    ("$SYS/#", "mqtt", "$SYS/x", True, "mqtt $SYS/# matches $SYS/x"),
    ("$SYS/#", "mqtt", "$SYS", True, "mqtt $SYS/# matches $SYS"),
    ("a/+", "mqtt", "a/$x", True, "mqtt $ rule only for first level"),
    # smf '>'
    ("a/>", "smf", "a", False, "smf a/> not parent a"),
    ("a/>", "smf", "a/b", True, "smf a/> matches a/b"),
    ("a/>", "smf", "a/b/c", True, "smf a/> matches a/b/c"),
    ("a/>", "smf", "a/", True, "smf > matches one (empty) level"),
    (">", "smf", "a/b", True, "smf > matches everything"),
    ("telemetry/*/>", "smf", EXAMPLE, True, "smf telemetry/*/>"),
    # smf '*'
    ("a/*", "smf", "a/b", True, "smf a/* matches a/b"),
    ("a/*", "smf", "a/", False, "smf * needs a non-empty level"),
    ("*/x", "smf", "/x", False, "smf * not empty first level"),
    ("*", "smf", "a/b", False, "smf * is one level"),
    # smf prefix wildcard
    ("ab*", "smf", "ab", True, "smf prefix matches the bare prefix"),
    ("ab*", "smf", "abc", True, "smf prefix matches abc"),
    ("ab*", "smf", "a", False, "smf prefix not shorter level"),
    ("ab*", "smf", "xab", False, "smf prefix anchored at start"),
    ("x/ab*/y", "smf", "x/abz/y", True, "smf prefix in the middle"),
    ("x/ab*/y", "smf", "x/abz/z", False, "smf prefix with later mismatch"),
    ("ab*", "smf", "ab/c", False, "smf prefix is one level"),
    # smf: MQTT characters are literal
    ("a/+", "smf", "a/+", True, "smf + is literal"),
    ("a/+", "smf", "a/b", False, "smf + is not a wildcard"),
    # smf '$' rule
    (">", "smf", "$SYS/x", False, "smf > skips $SYS"),
    ("*/x", "smf", "$SYS/x", False, "smf */x skips $SYS/x"),
    ("$SYS/>", "smf", "$SYS/x", True, "smf $SYS/> matches $SYS/x"),
    ("$S*", "smf", "$SYS", True, "smf $-prefix wildcard matches $SYS"),
    ("S*", "smf", "$SYS", False, "smf prefix does not skip $"),
    # exact filters
    (EXAMPLE, "mqtt", EXAMPLE, True, "exact equal"),
    (EXAMPLE, "mqtt", EXAMPLE + "/x", False, "exact longer"),
    ("a//b", "mqtt", "a//b", True, "exact with empty level"),
    ("$SYS/x", "smf", "$SYS/x", True, "exact $ topic"),
]


@pytest.mark.parametrize(
    ("pattern", "syntax", "topic", "expected"),
    [pytest.param(*case[:4], id=case[4]) for case in MATCH_CASES],
)
def test_matches_table(pattern: str, syntax: Syntax, topic: str, expected: bool) -> None:
    f = compile_filter(pattern, syntax)
    assert f.matches(topic) is expected
    assert ref_matches(pattern, syntax, topic) is expected


@pytest.mark.parametrize(
    ("pattern", "syntax", "topic", "expected"),
    [pytest.param(*case[:4], id=case[4]) for case in MATCH_CASES],
)
def test_seen_topics_answer_as_their_filter_and_stay_bounded(pattern: str, syntax: Syntax, topic: str,
                                                             expected: bool) -> None:
    """Each topic asked again, among others, of a cache smaller than them all: the same answers as the filter's."""
    f = compile_filter(pattern, syntax)
    seen = SeenTopics(f, limit=3)
    for other in (topic, "a/b", "$SYS/x", topic, "x/y/z", "a//b", topic):
        assert seen.matches(other) is f.matches(other)
        assert len(seen) <= 3
    assert seen.matches(topic) is expected


AUTO_CASES = [
    ("a/+", "mqtt", False, "plus means mqtt"),
    ("a/#", "mqtt", False, "hash means mqtt"),
    ("#", "mqtt", False, "hash alone"),
    ("a/*", "smf", False, "star means smf"),
    ("a/>", "smf", False, "gt means smf"),
    (">", "smf", False, "gt alone"),
    ("a/b", "mqtt", True, "no wildcard is exact"),
    ("$SYS/x", "mqtt", True, "dollar topic is exact"),
    ("+/ab*", "mqtt", False, "star in level is literal in mqtt"),
    ("*/a+", "smf", False, "plus in level is literal in smf"),
]


@pytest.mark.parametrize(
    ("pattern", "syntax", "exact"),
    [pytest.param(*case[:3], id=case[3]) for case in AUTO_CASES],
)
def test_auto_syntax_detection(pattern: str, syntax: Syntax, exact: bool) -> None:
    f = compile_filter(pattern)
    assert f.syntax == syntax
    assert f.is_exact is exact
    assert f.pattern == pattern
    assert f == TopicFilter(pattern, syntax)


INVALID_FILTERS = [
    ("", "auto", "empty"),
    ("", "mqtt", "empty mqtt"),
    ("", "smf", "empty smf"),
    ("a/\0b", "auto", "NUL"),
    ("a\0", "smf", "NUL smf"),
    ("a" * 65536, "auto", "too long"),
    ("é" * 32768, "mqtt", "too long in UTF-8 bytes"),
    ("+/>", "auto", "mixed syntaxes"),
    ("*/#", "auto", "mixed syntaxes 2"),
    ("a/#/b", "mqtt", "mqtt # not last"),
    ("#/#", "mqtt", "mqtt two #"),
    ("a#", "mqtt", "mqtt # inside level"),
    ("a/b#", "mqtt", "mqtt b#"),
    ("#a", "mqtt", "mqtt #a"),
    ("a+", "mqtt", "mqtt a+"),
    ("a/+b", "mqtt", "mqtt +b"),
    ("a/+/b#", "auto", "auto mqtt with b#"),
    ("a/>/b", "smf", "smf > not last"),
    ("a>", "smf", "smf > inside level"),
    (">a", "smf", "smf >a"),
    ("a*b", "smf", "smf * in the middle"),
    ("*a", "smf", "smf * at level start"),
    ("a**", "smf", "smf double star"),
    ("*/a*b", "auto", "auto smf with a*b"),
    ("a+", "auto", "auto ambiguous a+"),
    ("a#", "auto", "auto ambiguous a#"),
    ("ab*", "auto", "auto ambiguous prefix"),
    ("a>", "auto", "auto ambiguous a>"),
    ("a", "nats", "unknown syntax"),
]


@pytest.mark.parametrize(
    ("pattern", "syntax"),
    [pytest.param(*case[:2], id=case[2]) for case in INVALID_FILTERS],
)
def test_invalid_filters(pattern: str, syntax: str) -> None:
    with pytest.raises(TopicError):
        compile_filter(pattern, syntax)  # type: ignore[arg-type]


def test_invalid_filter_messages_are_specific() -> None:
    with pytest.raises(TopicError, match="must be the last level"):
        compile_filter("a/#/b")
    with pytest.raises(TopicError, match="whole level"):
        compile_filter("a/b#", "mqtt")
    with pytest.raises(TopicError, match="mixes MQTT"):
        compile_filter("+/>")
    with pytest.raises(TopicError, match="prefix wildcard"):
        compile_filter("a*b", "smf")
    with pytest.raises(TopicError, match="pass syntax="):
        compile_filter("ab*")
    with pytest.raises(TopicError, match="empty"):
        compile_filter("")
    with pytest.raises(TopicError, match="65535"):
        compile_filter("a" * 65536)


def test_explicit_syntax_for_ambiguous_levels() -> None:
    assert compile_filter("ab*", "mqtt").matches("ab*")
    assert not compile_filter("ab*", "mqtt").matches("abc")
    assert compile_filter("ab*", "smf").matches("abc")
    assert compile_filter("a>", "mqtt").matches("a>")


def test_filter_is_frozen_hashable_and_validates_on_construction() -> None:
    f = TopicFilter("a/+", "mqtt")
    assert f == compile_filter("a/+")
    assert hash(f) == hash(compile_filter("a/+"))
    assert f != TopicFilter("a/+", "smf")
    assert repr(f) == "TopicFilter(pattern='a/+', syntax='mqtt')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.pattern = "b"  # type: ignore[misc]
    with pytest.raises(TopicError):
        TopicFilter("a/#/b", "mqtt")
    with pytest.raises(TopicError):
        TopicFilter("a", "auto")  # type: ignore[arg-type]


def test_filter_max_length_is_inclusive() -> None:
    assert compile_filter("a" * 65535).matches("a" * 65535)
    validate_topic("a" * 65535)


# ---------------------------------------------------------------------------
# validate_topic
# ---------------------------------------------------------------------------

VALID_TOPICS = [
    ("a", "single level"),
    (EXAMPLE, "taxonomy example"),
    ("/a", "leading empty level"),
    ("a/", "trailing empty level"),
    ("a//b", "inner empty level"),
    ("$SYS/broker", "dollar topic"),
    ("a*/b>", "star and gt inside levels"),
    ("é/€/日本", "unicode"),
]


@pytest.mark.parametrize("topic", [pytest.param(t, id=i) for t, i in VALID_TOPICS])
def test_validate_topic_accepts(topic: str) -> None:
    assert validate_topic(topic) is topic


INVALID_TOPICS = [
    ("", "empty"),
    ("a/+", "plus level"),
    ("a+b", "plus inside level"),
    ("a/#", "hash level"),
    ("a#b", "hash inside level"),
    ("a/*", "star level"),
    (">", "gt level"),
    ("*/a", "star first level"),
    ("a\0b", "NUL"),
    ("a" * 65536, "65536 bytes"),
    ("€" * 21846, "65538 UTF-8 bytes"),
    ("a\ud800", "lone surrogate"),
]


@pytest.mark.parametrize("topic", [pytest.param(t, id=i) for t, i in INVALID_TOPICS])
def test_validate_topic_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(topic)


def test_validate_topic_rejects_non_str() -> None:
    with pytest.raises(TopicError, match="str"):
        validate_topic(b"a/b")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Matching: properties
# ---------------------------------------------------------------------------

# A tiny alphabet so that generated filters and topics collide often; '$'
# exercises the first-level rule, "" exercises empty levels.
small_level = st.text(alphabet="ab$", max_size=2)
small_topic = st.lists(small_level, min_size=1, max_size=4).map("/".join)

mqtt_level = st.one_of(small_level, st.just("+"))
smf_level = st.one_of(
    small_level,
    st.just("*"),
    st.text(alphabet="ab$", min_size=1, max_size=2).map(lambda s: s + "*"),
)


@st.composite
def filter_levels(draw: st.DrawFn, syntax: Syntax) -> list[str]:
    levels = draw(st.lists(mqtt_level if syntax == "mqtt" else smf_level, max_size=4))
    if draw(st.booleans()) or levels in ([], [""]):  # "" is no filter
        levels.append("#" if syntax == "mqtt" else ">")
    return levels


@st.composite
def filter_and_topic(draw: st.DrawFn) -> tuple[str, Syntax, str]:
    """A filter, and a topic that is either random or built to fit it."""
    syntax: Syntax = draw(st.sampled_from(["mqtt", "smf"]))
    levels = draw(filter_levels(syntax))
    if draw(st.booleans()):
        return "/".join(levels), syntax, draw(small_topic)
    topic: list[str] = []
    for level in levels:
        if level in ("#", ">"):
            topic += draw(st.lists(small_level, max_size=2))
        elif level in ("+", "*"):
            topic.append(draw(small_level))
        elif level.endswith("*"):
            topic.append(level[:-1] + draw(small_level))
        else:
            topic.append(level)
    if not topic:
        topic.append(draw(small_level))
    return "/".join(levels), syntax, "/".join(topic)


@PROPERTY
@given(filter_and_topic())
def test_matches_agrees_with_reference(case: tuple[str, Syntax, str]) -> None:
    pattern, syntax, topic = case
    f = compile_filter(pattern, syntax)
    assert f.matches(topic) == ref_matches(pattern, syntax, topic)


@PROPERTY
@given(st.lists(filter_levels("mqtt").map("/".join), max_size=12), st.lists(small_topic, min_size=1, max_size=8),
       st.data())
def test_topic_index_agrees_with_matches(filters: list[str], topics: list[str], data: st.DataObject) -> None:
    """The index answers what TopicFilter.matches answers, filter by filter, also after removals."""
    index: TopicIndex[int, str] = TopicIndex()
    held: dict[int, str] = {}
    for key, pattern in enumerate(filters):
        assert index.add(pattern, key, pattern)
        held[key] = pattern
    for key in data.draw(st.lists(st.sampled_from(sorted(held)), unique=True)) if held else []:
        assert index.remove(held.pop(key), key)
    assert len(index) == len(held)
    for topic in topics:
        expected = sorted(key for key, pattern in held.items() if mqtt_filter(pattern).matches(topic))
        assert sorted(key for key, _ in index.match(topic)) == expected
        assert index.matched(topic) == bool(expected)


def test_topic_index_keys_values_and_pruning() -> None:
    index: TopicIndex[str, int] = TopicIndex()
    assert index.add("a/+/c", "x", 1)
    assert not index.add("a/+/c", "x", 2)  # the same key again: its value is replaced
    assert index.add("a/#", "y", 0)
    assert index.add("#", "z", 1)
    assert sorted(index.match("a/b/c")) == [("x", 2), ("y", 0), ("z", 1)]
    assert sorted(index.match("a")) == [("y", 0), ("z", 1)]  # '#' also matches the parent level
    assert list(index.match("$SYS/a")) == []
    assert index.get("a/+/c", "x") == 2
    assert index.get("a/+", "x") is None
    assert not index.remove("a/+/c", "y")
    assert not index.remove("a/+/d", "x")
    assert index.remove("a/+/c", "x")
    assert index.remove("a/#", "y")
    assert index.remove("#", "z")
    assert (len(index), index._root.children) == (0, {})  # nothing left behind
    with pytest.raises(TopicError):
        index.add("a/#/b", "x", 1)


# Levels of realistic topics (no '/', '+', '#', NUL; not a wildcard level).
plain_level = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/+#*>\0"),
    min_size=1,
    max_size=6,
)
plain_levels = st.lists(plain_level, min_size=1, max_size=5)


@PROPERTY
@given(plain_levels, st.data())
def test_wildcarded_topic_matches_its_topic(levels: list[str], data: st.DataObject) -> None:
    topic = "/".join(levels)
    mask = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    if levels[0].startswith("$"):
        mask[0] = False  # the '$' rule: a first-level wildcard would not match
    mqtt = "/".join("+" if m else lv for m, lv in zip(mask, levels, strict=True))
    smf = "/".join("*" if m else lv for m, lv in zip(mask, levels, strict=True))
    assert compile_filter(mqtt, "mqtt").matches(topic)
    assert compile_filter(smf, "smf").matches(topic)

    # '#' appended: matches the topic itself (zero levels) and its children.
    hash_filter = compile_filter(mqtt + "/#", "mqtt")
    assert hash_filter.matches(topic)
    assert hash_filter.matches(topic + "/child")
    assert hash_filter.matches(topic + "/c/d")
    # ... and a '#' filter built from the parent matches the parent and topic.
    parent = levels[:-1]
    parent_filter = compile_filter("/".join([*parent, "#"]), "mqtt")
    if parent:
        assert parent_filter.matches("/".join(parent))
    if parent or not topic.startswith("$"):  # '#' alone skips '$' topics
        assert parent_filter.matches(topic)

    # '>' appended: children only, never the topic itself.
    gt_filter = compile_filter(smf + "/>", "smf")
    assert not gt_filter.matches(topic)
    assert gt_filter.matches(topic + "/child")
    assert gt_filter.matches(topic + "/c/d")


# ---------------------------------------------------------------------------
# Covering (ACL rules over subscriptions) and the cached MQTT helpers
# ---------------------------------------------------------------------------

# Every topic of one to four levels over these values: enough to tell apart the filters below
# (a level no literal or prefix starts, "c"; an empty one; "$" ones for the first-level rule).
COVER_LEVELS = ("", "a", "ab", "b", "$", "$c", "c")
COVER_TOPICS = ["/".join(levels) for n in range(1, 5) for levels in itertools.product(COVER_LEVELS, repeat=n)]


def _cover_filters() -> list[tuple[str, Syntax]]:
    fixed: dict[Syntax, tuple[str, ...]] = {"mqtt": ("", "a", "ab", "$", "+"), "smf": ("a", "ab", "$", "*", "a*", "$*")}
    out: list[tuple[str, Syntax]] = []
    for syntax, levels in fixed.items():
        for n in range(3):
            for head in itertools.product(levels, repeat=n):
                for tail in ((), ("#",) if syntax == "mqtt" else (">",)):
                    pattern = "/".join((*head, *tail))
                    if pattern:
                        out.append((pattern, syntax))
    return out


def test_covers_is_exactly_every_topic_of_one_matched_by_the_other() -> None:
    filters = [TopicFilter(pattern, syntax) for pattern, syntax in _cover_filters()]
    matched = {f: {t for t in COVER_TOPICS if f.matches(t)} for f in filters}
    wrong = [
        (rule.pattern, rule.syntax, requested.pattern, requested.syntax)
        for rule in filters for requested in filters
        if rule.covers(requested) != (matched[requested] <= matched[rule])
    ]
    assert not wrong, wrong[:10]
    assert len(filters) > 100


@pytest.mark.parametrize(("rule", "requested", "covered"), [
    ("+/#", "#", True),  # both match every topic that does not start with '$'
    ("+/+/#", "#", False),  # not a one-level topic
    ("#", "$SYS/#", False),
    ("$SYS/#", "$SYS/+", True),
    ("a/+/#", "a/#", False),  # not "a" itself
    ("a/#", "a", True),
])
def test_mqtt_filter_covers(rule: str, requested: str, covered: bool) -> None:
    assert filter_covers(rule, requested) is covered


def test_smf_and_mqtt_filters_cover_each_other() -> None:
    plus, star = compile_filter("a/+"), compile_filter("a/*")
    assert plus.covers(star)  # '*' takes non-empty levels only
    assert not star.covers(plus)  # '+' also takes "a/"
    assert compile_filter("a/>").covers(compile_filter("a/+/#"))
    assert not compile_filter("a/>").covers(compile_filter("a/#"))  # "a" itself
    assert compile_filter("ab*", "smf").covers(compile_filter("abc*", "smf"))
    assert not compile_filter("abc*", "smf").covers(compile_filter("ab*", "smf"))


def test_the_string_helpers_compile_once_and_refuse_what_is_no_filter() -> None:
    assert mqtt_filter("a/+") is mqtt_filter("a/+")
    assert topic_matches("a/b", "a/+")
    assert not topic_matches("$SYS/x", "#")
    assert not topic_matches("a+", "a+")  # not a filter: matches nothing, not even itself
    assert not filter_covers("#", "a/#/b")
    assert not filter_covers("", "a")


# ---------------------------------------------------------------------------
# NATS subjects
# ---------------------------------------------------------------------------

SUBJECT_CASES = [
    (
        "telemetry/raw/1.0/s/pm/pm-1/pm2_5",
        "telemetry.raw.1%2E0.s.pm.pm-1.pm2_5",
        "spec example",
    ),
    ("a", "a", "single level"),
    ("a%b", "a%25b", "percent"),
    ("a b", "a%20b", "space"),
    ("a\tb", "a%09b", "tab"),
    ("a\nb", "a%0Ab", "newline"),
    ("a*", "a%2A", "star"),
    ("a>b", "a%3Eb", "gt"),
    ("a.b/c", "a%2Eb.c", "dot"),
    ("é/日本", "é.日本", "unicode kept"),
    ("a\u3000b", "a%E3%80%80b", "ideographic space as UTF-8 bytes"),
    ("a\u0085b", "a%C2%85b", "NEL"),
    ("$SYS/x", "$SYS.x", "dollar"),
]


@pytest.mark.parametrize(
    ("topic", "subject"),
    [pytest.param(*case[:2], id=case[2]) for case in SUBJECT_CASES],
)
def test_topic_subject_table(topic: str, subject: str) -> None:
    assert topic_to_subject(topic) == subject
    assert subject_to_topic(subject) == topic


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("a//b", id="inner empty level"),
        pytest.param("/a", id="leading empty level"),
        pytest.param("a/", id="trailing empty level"),
        pytest.param("a/+", id="invalid topic"),
        pytest.param("", id="empty"),
    ],
)
def test_topic_to_subject_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        topic_to_subject(topic)


BAD_SUBJECTS = [
    ("", "empty"),
    ("a..b", "empty token"),
    (".a", "leading dot"),
    ("a.", "trailing dot"),
    ("a.*", "star wildcard"),
    ("a.>", "gt wildcard"),
    ("a%2e", "lower-case hex"),
    ("a%2", "truncated escape"),
    ("a%", "bare percent"),
    ("a%ZZ", "non-hex escape"),
    ("a%+1", "sign is not a hex digit"),
    ("a%41", "needless escape"),
    ("a b", "raw space"),
    ("a/b", "raw slash"),
    ("a%2F", "escaped slash"),
    ("a%FF", "invalid UTF-8"),
    ("a+b", "plus in topic"),
    ("a%00", "NUL"),
]


@pytest.mark.parametrize("subject", [pytest.param(s, id=i) for s, i in BAD_SUBJECTS])
def test_subject_to_topic_rejects(subject: str) -> None:
    with pytest.raises(TopicError):
        subject_to_topic(subject)


# Levels rich in characters that need escaping.
escapey_char = st.one_of(
    st.sampled_from(list(".% \t\n\r*>$é€\u3000\u0085\u00a0\x7f\x01")),
    st.characters(codec="utf-8", exclude_characters="/+#\0"),
)
escapey_level = st.text(alphabet=escapey_char, min_size=1, max_size=6).filter(lambda s: s not in ("*", ">"))
escapey_topic = st.lists(escapey_level, min_size=1, max_size=5).map("/".join)


@PROPERTY
@given(escapey_topic)
def test_subject_round_trip(topic: str) -> None:
    subject = topic_to_subject(topic)
    assert subject_to_topic(subject) == topic
    tokens = subject.split(".")
    assert len(tokens) == topic.count("/") + 1
    for token in tokens:
        assert token
        assert token not in ("*", ">")
        assert not any(ch.isspace() or ch in "*>" for ch in token)


@PROPERTY
@given(st.text(alphabet=st.sampled_from(list("a.%2E5F/ *>+é")), max_size=12))
def test_subject_to_topic_is_exact_inverse(subject: str) -> None:
    try:
        topic = subject_to_topic(subject)
    except TopicError:
        return
    assert topic_to_subject(topic) == subject


FILTER_SUBJECT_CASES = [
    ("a/#", "mqtt", ("a", "a.>"), "mqtt # includes the parent"),
    ("#", "mqtt", (">",), "mqtt # alone"),
    ("+/#", "mqtt", ("*", "*.>"), "mqtt +/#"),
    ("a/+/c", "mqtt", ("a.*.c",), "mqtt +"),
    ("a/*/c", "smf", ("a.*.c",), "smf *"),
    ("a/>", "smf", ("a.>",), "smf >"),
    (">", "smf", (">",), "smf > alone"),
    ("a/b", "mqtt", ("a.b",), "exact"),
    ("1.0/#", "mqtt", ("1%2E0", "1%2E0.>"), "literal escaped"),
    ("a*/b", "mqtt", ("a%2A.b",), "mqtt star literal escaped"),
    ("telemetry/raw/#", "mqtt", ("telemetry.raw", "telemetry.raw.>"), "stage"),
]


@pytest.mark.parametrize(
    ("pattern", "syntax", "subjects"),
    [pytest.param(*case[:3], id=case[3]) for case in FILTER_SUBJECT_CASES],
)
def test_filter_to_subjects_table(pattern: str, syntax: Syntax, subjects: tuple[str, ...]) -> None:
    assert filter_to_subjects(compile_filter(pattern, syntax)) == subjects


@pytest.mark.parametrize(
    ("pattern", "syntax"),
    [
        pytest.param("ab*/x", "smf", id="prefix wildcard"),
        pytest.param("x/*/ab*", "smf", id="prefix wildcard last"),
        pytest.param("a//b", "mqtt", id="empty literal level"),
        pytest.param("/#", "mqtt", id="empty first level"),
    ],
)
def test_filter_to_subjects_rejects(pattern: str, syntax: Syntax) -> None:
    with pytest.raises(TopicError):
        filter_to_subjects(compile_filter(pattern, syntax))


def test_dollar_rule_has_no_nats_counterpart() -> None:
    # Documented limitation: NATS wildcards also match '$' subjects.
    f = compile_filter("#")
    assert not f.matches("$SYS/x")
    assert nats_matches(filter_to_subjects(f)[0], topic_to_subject("$SYS/x"))


nats_level = st.text(alphabet="ab.% ", min_size=1, max_size=2)
nats_topic = st.lists(nats_level, min_size=1, max_size=4).map("/".join)


@st.composite
def nats_filter(draw: st.DrawFn) -> TopicFilter:
    syntax: Syntax = draw(st.sampled_from(["mqtt", "smf"]))
    single, multi = ("+", "#") if syntax == "mqtt" else ("*", ">")
    levels = draw(st.lists(st.one_of(nats_level, st.just(single)), max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append(multi)
    return compile_filter("/".join(levels), syntax)


@PROPERTY
@given(nats_filter(), st.data())
def test_filter_subjects_agree_with_matches(f: TopicFilter, data: st.DataObject) -> None:
    # Topics never start with '$' here: see test_dollar_rule_has_no_nats_...
    if data.draw(st.booleans()):
        topic = data.draw(nats_topic)
    else:  # a topic shaped like the filter, so that matches are common
        parts = [data.draw(nats_level) if lv in ("+", "*", "#", ">") else lv for lv in f.pattern.split("/")]
        topic = "/".join(parts)
    subjects = filter_to_subjects(f)
    subject = topic_to_subject(topic)
    assert f.matches(topic) == any(nats_matches(s, subject) for s in subjects)


# ---------------------------------------------------------------------------
# Taxonomy
# ---------------------------------------------------------------------------

FIELDS = TopicFields(
    stage="raw",
    version=DEFAULT_VERSION,
    site="site1",
    device_class="pm",
    device_id="pm-1",
    metric="pm2_5",
)


def test_constants() -> None:
    assert STAGES == ("raw", "valid", "rejected", "agg")
    assert DEFAULT_VERSION == "1.0"
    assert DEFAULT_TEMPLATE == ("telemetry/{stage}/{version}/{site}/{device_class}/{device_id}/{metric}")


def test_default_template_format_and_parse() -> None:
    tpl = TopicTemplate(DEFAULT_TEMPLATE)
    assert tpl.template == DEFAULT_TEMPLATE
    assert tpl.format(FIELDS) == EXAMPLE
    assert tpl.parse(EXAMPLE) == FIELDS
    assert tpl.parse(EXAMPLE) == FIELDS  # cached path


BAD_TEMPLATES = [
    ("", "empty"),
    ("telemetry/{stage}/{device_id}", "missing metric"),
    ("{site}/{device_id}/{metric}", "missing stage"),
    ("{stage}/{metric}", "missing device_id"),
    ("{stage}/{device_id}/{metric}/{stage}", "duplicate placeholder"),
    ("{stage}/{device_id}/{metric}/{foo}", "unknown placeholder"),
    ("x{stage}/{device_id}/{metric}", "placeholder with prefix"),
    ("{stage}x/{device_id}/{metric}", "placeholder with suffix"),
    ("{stage}{site}/{device_id}/{metric}", "two placeholders in a level"),
    ("{{stage}}/{device_id}/{metric}", "double braces"),
    ("{stage/{device_id}/{metric}", "unbalanced brace"),
    ("a//{stage}/{device_id}/{metric}", "empty literal level"),
    ("/{stage}/{device_id}/{metric}", "leading empty level"),
    ("+/{stage}/{device_id}/{metric}", "plus literal"),
    ("a#/{stage}/{device_id}/{metric}", "hash in literal"),
    ("*/{stage}/{device_id}/{metric}", "star literal level"),
    (">/{stage}/{device_id}/{metric}", "gt literal level"),
    ("a\0/{stage}/{device_id}/{metric}", "NUL literal"),
]


@pytest.mark.parametrize("template", [pytest.param(t, id=i) for t, i in BAD_TEMPLATES])
def test_bad_templates(template: str) -> None:
    with pytest.raises(TopicError):
        TopicTemplate(template)


def test_bad_template_messages() -> None:
    with pytest.raises(TopicError, match=r"\{metric\}"):
        TopicTemplate("t/{stage}/{device_id}")
    with pytest.raises(TopicError, match="more than once"):
        TopicTemplate("{stage}/{device_id}/{metric}/{stage}")
    with pytest.raises(TopicError, match="whole level"):
        TopicTemplate("x{stage}/{device_id}/{metric}")
    with pytest.raises(TopicError, match="unknown placeholder"):
        TopicTemplate("{stage}/{device_id}/{metric}/{foo}")


BAD_FIELD_VALUES = [
    ("", "empty"),
    ("a/b", "slash"),
    ("a\0", "NUL"),
    ("+", "plus level"),
    ("a+", "plus char"),
    ("#", "hash level"),
    ("a#", "hash char"),
    ("*", "star level"),
    (">", "gt level"),
]


@pytest.mark.parametrize("name", ["stage", "version", "site", "device_class", "device_id", "metric"])
@pytest.mark.parametrize("value", [pytest.param(v, id=i) for v, i in BAD_FIELD_VALUES])
def test_format_rejects_bad_field(name: str, value: str) -> None:
    fields = dataclasses.replace(FIELDS, **{name: value})
    with pytest.raises(TopicError, match=rf"\b{name}="):
        TopicTemplate().format(fields)


def test_format_rejects_unknown_stage() -> None:
    with pytest.raises(TopicError, match="stage="):
        TopicTemplate().format(dataclasses.replace(FIELDS, stage="cooked"))


def test_format_allows_star_inside_level() -> None:
    fields = dataclasses.replace(FIELDS, metric="pm*", site="a>b")
    topic = TopicTemplate().format(fields)
    assert topic == "telemetry/raw/1.0/a>b/pm/pm-1/pm*"
    assert TopicTemplate().parse(topic) == fields


def test_first_level_field_must_not_start_with_dollar() -> None:
    tpl = TopicTemplate("{site}/{stage}/{device_id}/{metric}")
    with pytest.raises(TopicError, match=r"site='\$x'"):
        tpl.format(dataclasses.replace(FIELDS, site="$x"))
    assert tpl.parse("$x/raw/d/m") is None
    assert tpl.parse("x$/raw/d/m") is not None
    assert tpl.format(dataclasses.replace(FIELDS, site="x$")) == "x$/raw/pm-1/pm2_5"
    # '$' is fine in deeper levels, and behind a literal first level.
    assert TopicTemplate().parse("telemetry/raw/1.0/$s/pm/pm-1/pm2_5") is not None
    dollar = TopicTemplate("$iot/{stage}/{device_id}/{metric}")
    assert dollar.parse("$iot/raw/d/m") is not None
    assert dollar.stage_filter("raw").matches("$iot/raw/d/m")


def test_format_ignores_fields_absent_from_template() -> None:
    tpl = TopicTemplate("{stage}/{device_id}/{metric}")
    fields = dataclasses.replace(FIELDS, version="", site="bad/site")
    assert tpl.format(fields) == "raw/pm-1/pm2_5"


PARSE_CASES = [
    (EXAMPLE, True, "fits"),
    ("telemetry/raw/1.0/site1/pm/pm-1", False, "too few levels"),
    (EXAMPLE + "/x", False, "too many levels"),
    ("telemetrx/raw/1.0/site1/pm/pm-1/pm2_5", False, "literal mismatch"),
    ("telemetry/cooked/1.0/site1/pm/pm-1/pm2_5", False, "unknown stage"),
    ("telemetry/raw/1.0//pm/pm-1/pm2_5", False, "empty field"),
    ("telemetry/raw/1.0/site1/pm/pm-1/", False, "empty last field"),
    ("telemetry/raw/1.0/site1/pm/+/pm2_5", False, "plus field"),
    ("telemetry/raw/1.0/site1/pm/#/pm2_5", False, "hash field"),
    ("telemetry/raw/1.0/site1/pm/*/pm2_5", False, "star field"),
    ("telemetry/raw/1.0/site1/pm/>/pm2_5", False, "gt field"),
    ("telemetry/raw/1.0/site1/pm/a\0/pm2_5", False, "NUL field"),
    ("telemetry/agg/2.0/s/t/d/m", True, "other stage and version"),
]


@pytest.mark.parametrize(("topic", "fits"), [pytest.param(*c[:2], id=c[2]) for c in PARSE_CASES])
def test_parse_table(topic: str, fits: bool) -> None:
    parsed = TopicTemplate().parse(topic)
    assert (parsed is not None) is fits
    if parsed is not None:
        assert TopicTemplate().format(parsed) == topic


def test_parse_missing_placeholders_are_empty() -> None:
    tpl = TopicTemplate("site/{site}/{stage}/{device_id}/{metric}")
    assert tpl.parse("site/s1/valid/d1/temp") == TopicFields(
        stage="valid",
        version="",
        site="s1",
        device_class="",
        device_id="d1",
        metric="temp",
    )
    assert tpl.parse("x/s1/valid/d1/temp") is None


def test_parse_cache_is_bounded_and_consistent() -> None:
    tpl = TopicTemplate()
    topics = [f"telemetry/raw/1.0/s/pm/d{i}/m" for i in range(5000)]
    for topic in topics:
        assert tpl.parse(topic) == tpl._parse(topic)
    assert len(tpl._cache) <= 4096
    assert tpl.parse("bogus") is None
    assert tpl.parse("bogus") is None


def test_stage_filter() -> None:
    tpl = TopicTemplate()
    f = tpl.stage_filter("valid")
    assert f == TopicFilter("telemetry/valid/+/+/+/+/+", "mqtt")
    assert f.matches(tpl.format(dataclasses.replace(FIELDS, stage="valid")))
    assert not f.matches(EXAMPLE)
    custom = TopicTemplate("x/{site}/{stage}/{device_id}/{metric}")
    assert custom.stage_filter("agg").pattern == "x/+/agg/+/+"
    with pytest.raises(TopicError, match="stage"):
        tpl.stage_filter("cooked")


def test_with_stage() -> None:
    tpl = TopicTemplate()
    moved = tpl.with_stage(EXAMPLE, "valid")
    assert moved == "telemetry/valid/1.0/site1/pm/pm-1/pm2_5"
    assert tpl.with_stage(EXAMPLE, "raw") == EXAMPLE
    assert tpl.with_stage("not/a/telemetry/topic", "valid") is None
    with pytest.raises(TopicError, match="stage"):
        tpl.with_stage(EXAMPLE, "cooked")


def test_filter_and_template_survive_copy() -> None:
    f = compile_filter("a/*/ab*", "smf")
    assert copy.deepcopy(f) == f
    assert copy.deepcopy(f).matches("a/x/abc")
    assert copy.copy(f).matches("a/x/ab")
    tpl = TopicTemplate("{stage}/{device_id}/{metric}")
    assert copy.deepcopy(tpl) == tpl
    assert copy.deepcopy(tpl).parse("raw/d/m") == TopicFields("raw", "", "", "", "d", "m")


def test_template_is_immutable_value() -> None:
    tpl = TopicTemplate()
    assert tpl == TopicTemplate(DEFAULT_TEMPLATE)
    assert hash(tpl) == hash(TopicTemplate(DEFAULT_TEMPLATE))
    assert tpl != TopicTemplate("{stage}/{device_id}/{metric}")
    assert repr(tpl) == f"TopicTemplate({DEFAULT_TEMPLATE!r})"
    with pytest.raises(AttributeError):
        tpl._template = "x"
    with pytest.raises(AttributeError):
        tpl.template = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FIELDS.stage = "valid"  # type: ignore[misc]


TEMPLATES = [
    DEFAULT_TEMPLATE,
    "{stage}/{device_id}/{metric}",
    "{site}/{stage}/{device_class}/{device_id}/{metric}",
    "x/{metric}/y/{device_id}/{version}/{stage}",
]

field_value = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("$*>.% ")),
        st.characters(codec="utf-8", exclude_characters="/+#\0"),
    ),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in ("*", ">"))


@PROPERTY
@given(
    st.sampled_from(TEMPLATES),
    st.builds(
        TopicFields,
        stage=st.sampled_from(STAGES),
        version=field_value,
        site=field_value,
        device_class=field_value,
        device_id=field_value,
        metric=field_value,
    ),
    st.sampled_from(STAGES),
)
def test_template_round_trip(template: str, fields: TopicFields, other_stage: str) -> None:
    tpl = TopicTemplate(template)
    first = template.split("/", maxsplit=1)[0]
    if first.startswith("{") and getattr(fields, first[1:-1]).startswith("$"):
        with pytest.raises(TopicError, match="must not start with"):
            tpl.format(fields)
        return
    topic = tpl.format(fields)
    validate_topic(topic)
    absent = {name: "" for name in ("version", "site", "device_class") if "{" + name + "}" not in template}
    expected = dataclasses.replace(fields, **absent)
    assert tpl.parse(topic) == expected
    assert tpl.format(expected) == topic

    moved = tpl.with_stage(topic, other_stage)
    assert moved is not None
    assert tpl.parse(moved) == dataclasses.replace(expected, stage=other_stage)
    for stage in STAGES:
        assert tpl.stage_filter(stage).matches(topic) is (stage == fields.stage)


def test_parse_rejects_oversized_topic() -> None:
    tpl = TopicTemplate("{stage}/{device_id}/{metric}")
    assert tpl.parse("raw/d/" + "m" * 65529) is not None  # exactly 65535 bytes
    assert tpl.parse("raw/d/" + "m" * 65530) is None
    with pytest.raises(TopicError, match="65535"):
        tpl.format(TopicFields("raw", "", "", "", "d", "m" * 65530))
