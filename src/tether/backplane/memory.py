"""The in-memory backplane: one process, no setup (the default).

Idempotency keys live in a `KeyMemory` of this process: a repeat within the
window (and among the last MAX_KEYS keys) is answered as a duplicate. They are
lost with the process, as the history and the numbering are.
"""

from __future__ import annotations

import uuid
from typing import Any

from tether.backplane.base import Backplane, Deliver, Published
from tether.clock import Clock, SystemClock
from tether.history import History, Replay
from tether.idempotency import (
    DEFAULT_WINDOW_MS,
    MAX_KEYS,
    KeyMemory,
    Seen,
    check_repeat,
    fingerprint,
)
from tether.message import Message, Prepared, stamp


class MemoryBackplane(Backplane):
    """History and sequence numbers in this process; delivery is a direct call."""

    name = "memory"

    def __init__(
        self,
        history_size: int,
        *,
        idempotency_window_ms: int = DEFAULT_WINDOW_MS,
        max_keys: int = MAX_KEYS,
        clock: Clock | None = None,
    ) -> None:
        self._epoch = uuid.uuid4().hex[:12]  # a new numbering every time the process starts
        self.history: History[Message] = History(history_size)
        self.keys = KeyMemory(idempotency_window_ms / 1000, max_keys)
        self.clock: Clock = clock or SystemClock()
        self._deliver: Deliver | None = None
        self.published = 0
        self.duplicates = 0

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def stop(self) -> None:
        self._deliver = None

    @property
    def epoch(self) -> str:
        return self._epoch

    def position(self, topic: str) -> int | None:
        return self.history.last_seq(topic)  # delivery is in the publish call itself

    async def publish(self, prepared: Prepared, key: str | None = None) -> Published:
        # No await from the check to the put: a concurrent repeat cannot slip between.
        if key is not None:
            now = self.clock.now()
            mark = fingerprint(prepared)
            seen = self.keys.get(key, now)
            if seen is not None:
                check_repeat(seen, mark)
                self.duplicates += 1
                return Published.of(stamp(prepared, seen.seq), duplicate=True)
        message = stamp(prepared, self.history.next_seq(prepared.topic))
        self.history.append(prepared.topic, message.seq, message)
        self.published += 1
        if key is not None:
            self.keys.put(key, Seen(message.topic, message.seq, mark), now)
        if self._deliver is not None:
            self._deliver(message)
        return Published.of(message)

    async def since(self, topic: str, seq: int) -> Replay[Message]:
        return self.history.since(topic, seq)

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": "up" if self._deliver is not None else "stopped",
            "topics": len(self.history.topics()),
            "published": self.published,
            "duplicates": self.duplicates,
            "keys": len(self.keys),
        }
