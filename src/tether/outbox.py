"""Per-client backpressure decisions, with no I/O (SPEC §6).

The caller reports how many bytes a client has buffered (written by the server,
not yet taken by the peer). A client above `high` is paused: it still gets
`high`-priority messages but skips `normal` and `low` until its buffer falls
below `low` (hysteresis, so that it does not flap). A client whose buffer would
pass `max_buffer` is too slow to keep: the caller closes it with 1013 and the
client recovers the gap through resume.
"""

from __future__ import annotations

from enum import Enum

from tether.message import Priority


class Decision(Enum):
    SEND = "send"
    SKIP = "skip"
    CLOSE = "close"


class Backpressure:
    """The thresholds and the one rule that applies them."""

    __slots__ = ("high", "low", "max_buffer")

    def __init__(self, high: int, low: int, max_buffer: int) -> None:
        if not 0 <= low <= high <= max_buffer:
            raise ValueError("need 0 <= low <= high <= max_buffer")
        self.high = high
        self.low = low
        self.max_buffer = max_buffer

    def paused(self, was_paused: bool, buffered: int) -> bool:
        """The paused state for a client now holding `buffered` bytes."""
        if was_paused:
            return buffered >= self.low
        return buffered > self.high

    def decide(self, paused: bool, buffered: int, size: int, priority: Priority) -> Decision:
        """What to do with a message of `size` bytes for a client in this state."""
        if buffered + size > self.max_buffer:
            return Decision.CLOSE
        if paused and priority is not Priority.HIGH:
            return Decision.SKIP
        return Decision.SEND
