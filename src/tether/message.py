"""Published messages: validated and serialized once, then stamped with topic and seq (SPEC §6).

A publish serializes the posted object exactly once (`prepare`). The backplane
assigns the topic's next sequence number and `stamp` appends `"topic"` and
`"seq"` to those bytes, so every node and every client gets identical bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

from tether.errors import PublishError, Refusal

BROADCAST_TOPIC = "*"
# Types the server itself sends: a published event may not impersonate them,
# in any letter case (compared case-folded).
RESERVED_TYPES = frozenset({"connected", "pong", "subscribed", "unsubscribed", "resync", "error",
                            "authenticated"})
MAX_TOPIC_LENGTH = 200
# The integers a JSON body can carry through tether exactly: orjson reads a
# literal outside them as a float (silently rounded) and cannot write it back.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
# JSON has no leading zeros, so a literal outside the range has at least 19 digits.
_LONG_DIGITS = re.compile(rb"\d{19,}")
# One JSON token that may hold digits: a whole string (escapes included) or a number.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?', re.DOTALL)


class Priority(IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: object) -> Priority:
        if value is None:
            return cls.NORMAL
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        raise PublishError(Refusal.INVALID, "priority must be one of high, normal, low")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A publish that passed validation: its topic, priority and JSON without topic/seq."""

    topic: str
    priority: Priority
    body: bytes  # a JSON object, without "topic" and "seq"


@dataclass(frozen=True, slots=True)
class Message:
    """A message as delivered: `data` is the JSON text every subscriber receives.

    A message with no data is a resync notice from the backplane (see
    `resync_notice`): it travels the same path as messages, so it keeps its
    place among them.
    """

    topic: str
    seq: int
    priority: Priority
    data: bytes

    @property
    def is_resync(self) -> bool:
        return not self.data


def resync_notice(topic: str, seq: int) -> Message:
    """Messages of `topic` up to `seq` were lost by the backplane; seq 0: it renumbered."""
    return Message(topic, seq, Priority.HIGH, b"")


def check_topic(topic: object) -> str:
    """A topic name, or PublishError: a non-empty string of printable characters.

    Blank names and names with leading or trailing whitespace are refused too:
    `?topics=` strips its items, so such a topic could never be subscribed to.
    So is a `*` in any name but the broadcast topic `*` itself: in a token,
    `a.*` means every topic starting with `a.` (see `auth.py`), so no topic may
    be named that way.
    """
    if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_LENGTH:
        raise PublishError(
            Refusal.INVALID, f"topic must be a string of 1 to {MAX_TOPIC_LENGTH} characters")
    if not topic.isprintable() or "," in topic:
        raise PublishError(Refusal.INVALID, "topic must be printable and contain no comma")
    if topic.strip() != topic:
        raise PublishError(
            Refusal.INVALID, "topic must not be blank or start or end with whitespace")
    if "*" in topic and topic != BROADCAST_TOPIC:
        raise PublishError(Refusal.INVALID, "topic must not contain '*' (it is for patterns), "
                                            "except the broadcast topic '*' itself")
    return topic


def check_integers(body: bytes) -> None:
    """Refuse (PublishError 400) a JSON body holding an integer tether cannot carry exactly.

    `body` must be valid JSON (it parsed). A body without a run of 19 digits,
    which is nearly every body, costs one regex search; otherwise its tokens
    are read, so digits inside strings never count, and a number written
    without '.', 'e' or 'E' must lie in [-2^63, 2^64-1].
    """
    if _LONG_DIGITS.search(body) is None:
        return
    for match in _TOKENS.finditer(body):
        token = match.group()
        if len(token) < 19 or token[0] == 0x22 or any(c in token for c in b".eE"):
            continue  # a string, a short integer or a float literal
        if not INT_MIN <= int(token) <= INT_MAX:
            raise PublishError(
                Refusal.INVALID, "integer out of range: tether carries integers between -2^63 and "
                "2^64-1 exactly (send larger ones as strings)")


def prepare(event: Any) -> Prepared:
    """Validate a posted event and serialize it once; raises PublishError (400)."""
    if not isinstance(event, dict):
        raise PublishError(Refusal.INVALID, "event must be a JSON object")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise PublishError(Refusal.INVALID, "event needs a non-empty string 'type'")
    if kind.casefold() in RESERVED_TYPES:
        raise PublishError(
            Refusal.INVALID, f"type {kind!r} is reserved for the server's own messages")
    topic = check_topic(event.get("topic", BROADCAST_TOPIC))
    priority = Priority.parse(event.get("priority"))
    rest = {k: v for k, v in event.items() if k not in ("topic", "seq")}
    try:
        body = orjson.dumps(rest)
    except TypeError as exc:
        raise PublishError(Refusal.INVALID, f"event cannot be serialized as JSON: {exc}") from None
    return Prepared(topic, priority, body)


def stamp(prepared: Prepared, seq: int) -> Message:
    """Append topic and seq to the serialized body: no second serialization."""
    tail = b'"topic":' + orjson.dumps(prepared.topic) + b',"seq":' + str(seq).encode() + b"}"
    body = prepared.body
    data = body[:-1] + (b"," if len(body) > 2 else b"") + tail
    return Message(prepared.topic, seq, prepared.priority, data)
