"""The backplane contract, shared by the in-memory and the Redis implementations (SPEC §6–8).

A backplane assigns each published message its topic's next sequence number
(once, so every node numbers it the same), keeps the last HISTORY_SIZE messages
of each topic, and hands every message to `deliver` on every node that watches
its topic, in seq order per topic. `since` answers a resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from tether.history import Replay
from tether.message import Message, Prepared

Deliver = Callable[[Message], None]


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
    async def publish(self, prepared: Prepared) -> Message:
        """Assign the seq, store for resume and fan out to every node. Returns the message."""

    @abstractmethod
    async def since(self, topic: str, seq: int) -> Replay[Message]:
        """Messages of `topic` after `seq`, in order, or a resync when some are gone."""

    def watch(self, topics: set[str]) -> None:  # noqa: B027 - optional hook
        """The topics this node has subscribers for (a hint; memory ignores it)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """For /health: at least {"name", "status"}."""
