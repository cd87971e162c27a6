"""Per-topic sequence numbers and bounded history for resume, with no I/O (SPEC §7)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Replay(Generic[T]):
    """What a client that has seen up to `since` must get on one topic.

    `items` are the missed entries in order. `resync` is True when some of them
    are no longer kept (or the numbering restarted): the client must refetch
    state and continue from `last`.
    """

    items: list[T] = field(default_factory=list)
    resync: bool = False
    last: int = 0


class TopicLog(Generic[T]):
    """The last `size` entries of one topic, keyed by consecutive sequence numbers."""

    __slots__ = ("entries", "last_seq")

    def __init__(self, size: int) -> None:
        self.entries: deque[tuple[int, T]] = deque(maxlen=size)
        self.last_seq = 0


class History(Generic[T]):
    """Assigns each topic's sequence numbers (1, 2, 3, ...) and keeps its last `size` entries."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self._topics: dict[str, TopicLog[T]] = {}

    def _log(self, topic: str) -> TopicLog[T]:
        log = self._topics.get(topic)
        if log is None:
            log = self._topics[topic] = TopicLog(self.size)
        return log

    def next_seq(self, topic: str) -> int:
        """The number the next entry of `topic` will get."""
        log = self._topics.get(topic)
        return (log.last_seq if log else 0) + 1

    def last_seq(self, topic: str) -> int:
        log = self._topics.get(topic)
        return log.last_seq if log else 0

    def append(self, topic: str, seq: int, item: T) -> None:
        """Record entry `seq` of `topic`; seqs must come in order, without gaps."""
        log = self._log(topic)
        if seq != log.last_seq + 1:
            raise ValueError(f"topic {topic!r}: expected seq {log.last_seq + 1}, got {seq}")
        log.last_seq = seq
        if self.size:
            log.entries.append((seq, item))

    def since(self, topic: str, seq: int) -> Replay[T]:
        """Everything of `topic` after `seq`, or a resync when part of it is gone."""
        log = self._topics.get(topic)
        last = log.last_seq if log else 0
        if seq == last:
            return Replay(last=last)
        if seq > last or seq < 0 or log is None:
            # The client saw numbers this history never assigned: it restarted.
            return Replay(resync=True, last=last)
        entries = log.entries
        oldest = entries[0][0] if entries else last + 1
        if seq + 1 < oldest:
            return Replay(resync=True, last=last)
        # Entries are consecutive: entry seq+1 sits at index seq+1-oldest.
        start = seq + 1 - oldest
        return Replay(items=[item for _, item in islice(entries, start, None)], last=last)

    def topics(self) -> list[str]:
        return list(self._topics)
