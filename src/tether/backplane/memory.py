"""The in-memory backplane: one process, no setup (the default)."""

from __future__ import annotations

from typing import Any

from tether.backplane.base import Backplane, Deliver
from tether.history import History, Replay
from tether.message import Message, Prepared, stamp


class MemoryBackplane(Backplane):
    """History and sequence numbers in this process; delivery is a direct call."""

    name = "memory"

    def __init__(self, history_size: int) -> None:
        self.history: History[Message] = History(history_size)
        self._deliver: Deliver | None = None
        self.published = 0

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def stop(self) -> None:
        self._deliver = None

    async def publish(self, prepared: Prepared) -> Message:
        message = stamp(prepared, self.history.next_seq(prepared.topic))
        self.history.append(prepared.topic, message.seq, message)
        self.published += 1
        if self._deliver is not None:
            self._deliver(message)
        return message

    async def since(self, topic: str, seq: int) -> Replay[Message]:
        return self.history.since(topic, seq)

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": "up" if self._deliver is not None else "stopped",
            "topics": len(self.history.topics()),
            "published": self.published,
        }
