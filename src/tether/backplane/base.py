"""The backplane contract, shared by the in-memory and the Redis implementations (SPEC §6–8).

A backplane assigns each published message its topic's next sequence number
(once, so every node numbers it the same), keeps the last HISTORY_SIZE messages
of each topic, and hands every message to `deliver` on every node that watches
its topic, in seq order per topic. `since` answers a resume.

Idempotent publishing: `publish(prepared, key)` with a key publishes once per
key within the idempotency window. A repeat of the key returns the original
topic and seq with `duplicate` set, delivers nothing and stores nothing; a repeat
with a different event raises PublishError (422). The memory backplane keeps
the keys in a dict bounded in count (oldest forgotten first); the Redis
backplane keeps them in Redis, checked and set by the same atomic script that
numbers the message, and each node also remembers, bounded the same way, the
keys it published or delivered, for when Redis loses its data (see redis.py for
the exact guarantee).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.history import Replay
from tether.message import Message, Prepared

Deliver = Callable[[Message], None]


@dataclass(frozen=True, slots=True)
class Published(Message):
    """What a publish returns: the message as numbered, and whether it was a repeat.

    For a duplicate (a repeated idempotency key) topic and seq are the original
    ones and nothing was delivered this time.
    """

    duplicate: bool = False

    @classmethod
    def of(cls, message: Message, duplicate: bool = False) -> Published:
        return cls(message.topic, message.seq, message.priority, message.data, duplicate)


class Backplane(ABC):
    """One implementation per engine; one contract test suite for all of them."""

    name: str = "backplane"

    @abstractmethod
    async def start(self, deliver: Deliver) -> None:
        """Connect, and from now on call `deliver` with every message of watched topics."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop delivering and release connections."""

    @abstractmethod
    async def publish(self, prepared: Prepared, key: str | None = None) -> Published:
        """Assign the seq, store for resume and fan out to every node; the message.

        With `key`, a repeat within the window is answered with the original
        topic and seq (`duplicate=True`) and delivers nothing; a repeat with a
        different event raises PublishError (422). Raises BackplaneError when
        the backplane cannot be reached (`outcome_unknown` when the publish may
        have happened: retry with the same key).
        """

    @abstractmethod
    async def since(self, topic: str, seq: int) -> Replay[Message]:
        """Messages of `topic` after `seq`, in order, or a resync when some are gone."""

    @property
    def epoch(self) -> str:
        """The life of this backplane's numbering: it changes whenever its history is lost.

        A memory backplane's history dies with its process; a Redis dataset's
        with its data. Positions (topic, seq) are only comparable within one
        epoch: a `since` from another epoch gets `resync`, never a replay.
        """
        return ""

    def position(self, topic: str) -> int | None:
        """The seq after which every message of `topic` is still to be delivered here, if known.

        Known at once when delivery follows publishing in order on this node (the
        memory backplane: the topic's last seq; Redis: where the reader stands on a
        topic it already reads); None otherwise. A client told this position
        misses nothing after it (`connected`'s `seqs`).
        """
        return None

    def watch(self, topics: set[str]) -> None:  # noqa: B027 - optional hook
        """The topics this node has subscribers for (a hint; memory ignores it)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """For /health: at least {"name", "status"}."""
