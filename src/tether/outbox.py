"""Each client's outgoing frames, bounded in bytes, and the writer that flushes them (SPEC §6).

No I/O of its own: an `Outbox` holds the frames accepted for one client until the
`Writer` hands them to the client's `Peer` in one write, and the `Writer` asks
the injected clock when to flush. Nothing here imports asyncio.

The rule (`Backpressure`): a client's `buffered` bytes, written for it and not
yet taken, are what its transport holds (`in_transport`) plus what waits in its
outbox (`queued`). A client whose transport holds more than `high` is paused: it
still gets `high`-priority messages but skips `normal` and `low` until that falls
below `low` (hysteresis, so that it does not flap). A client whose buffered bytes
would pass `max_buffer` is too slow to keep: the caller closes it with 1013 and
the client recovers the gap through resume.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from tether.message import Priority

if TYPE_CHECKING:
    from tether.clock import Clock, Timer
    from tether.registry import Peer

# Longest a written frame waits so that several go out in one write (see Writer).
MAX_WRITE_DELAY = 0.005


class Decision(Enum):
    SEND = "send"  # queued for the next flush
    SKIP = "skip"  # paused: not for this client now
    CLOSE = "close"  # too slow: close it (1013)
    GONE = "gone"  # the client is closing: nothing more is written to it


# The decisions as module constants: read on every offer (a global load, not an
# attribute lookup on the enum class).
SEND, SKIP, CLOSE, GONE = Decision.SEND, Decision.SKIP, Decision.CLOSE, Decision.GONE


class Backpressure:
    """The thresholds and the one rule that applies them."""

    __slots__ = ("high", "low", "max_buffer")

    def __init__(self, high: int, low: int, max_buffer: int) -> None:
        if not 0 <= low <= high <= max_buffer:
            raise ValueError("need 0 <= low <= high <= max_buffer")
        self.high = high
        self.low = low
        self.max_buffer = max_buffer

    def paused(self, was_paused: bool, in_transport: int) -> bool:
        """The paused state of a client whose transport holds `in_transport` bytes."""
        if was_paused:
            return in_transport >= self.low
        return in_transport > self.high

    def decide(self, paused: bool, buffered: int, size: int, priority: Priority) -> Decision:
        """What to do with a message of `size` bytes for a client in this state."""
        if buffered + size > self.max_buffer:
            return Decision.CLOSE
        if paused and priority is not Priority.HIGH:
            return Decision.SKIP
        return Decision.SEND


class Outbox:
    """One client's frames waiting for the next flush; `offer` is the only way in."""

    __slots__ = ("closed", "high", "max_buffer", "owner", "paused", "peer", "queue", "queued",
                 "rule", "writer")

    def __init__(
        self, peer: Peer, rule: Backpressure, writer: Writer, owner: object = None
    ) -> None:
        self.peer = peer
        self.rule = rule
        self.high, self.max_buffer = rule.high, rule.max_buffer  # read on every offer
        self.writer = writer
        self.owner = owner  # whatever the caller tracks (the Connection), for error reports
        self.queue: list[bytes] | None = None  # frames for the next flush
        self.queued = 0  # their bytes
        self.paused = False
        self.closed = False  # a close is under way: write nothing more

    def buffered(self) -> int:
        """Bytes written for this client and not yet taken: its transport's, and queued."""
        return self.peer.in_transport() + self.queued

    def offer(self, frame: bytes, priority: Priority) -> Decision:
        """Apply the rule to one frame; SEND means it is queued for the next flush.

        The common case first (one call per delivery of every broadcast, so it
        reads as few attributes as it can): a client that is not paused and
        whose transport holds no more than `high` stays unpaused, and gets the
        frame unless that passes `max_buffer` (Backpressure.paused and .decide
        say the same; a test holds the two equal for every state). Everything
        else takes the rule as written.
        """
        peer = self.peer
        if self.closed or peer.is_closing():
            self.closed = True
            return GONE
        in_transport = peer.in_transport()
        queued = self.queued + len(frame)
        if self.paused or in_transport > self.high or in_transport + queued > self.max_buffer:
            rule = self.rule
            self.paused = paused = rule.paused(self.paused, in_transport)
            decision = rule.decide(paused, in_transport + self.queued, len(frame), priority)
            if decision is not SEND:
                return decision
        queue = self.queue
        if queue is None:
            self.queue = [frame]
            self.writer.add(self)
        else:
            queue.append(frame)
        self.queued = queued
        if queued > self.rule.high:
            # More than the transport may hold is waiting for the writer's next pass
            # (a burst, a loaded machine): written now, so that what counts against
            # max_buffer is what the client has not taken, not the writer's delay.
            self.writer.flush_one(self)
        return SEND

    def paused_now(self) -> bool:
        """Whether the rule would pause it for what its transport holds now (a view)."""
        return self.rule.paused(self.paused, self.peer.in_transport())

    def flush(self) -> None:
        """Write what is queued, in one write (may raise what the peer's write raises)."""
        queue = self.queue
        if queue is None:
            return
        self.queue = None
        self.queued = 0
        if self.closed:
            return
        peer = self.peer
        if peer.is_closing():
            self.closed = True
            return
        peer.write(queue[0] if len(queue) == 1 else b"".join(queue))


class Writer:
    """Flushes every outbox with frames: on the next loop pass, or a little later when busy.

    The delay follows the cost of the last flush (capped at MAX_WRITE_DELAY): an
    idle hub writes at once; a hub busy fanning out lets frames gather so that
    each client gets several in one write (one system call), like Nagle's
    algorithm but bounded in time. The clock schedules it, so a test jumps time.
    """

    def __init__(self, clock: Clock, failed: Callable[[Outbox, Exception], None]) -> None:
        self.clock = clock
        self.failed = failed  # a write raised: the caller drops that client
        self.dirty: list[Outbox] = []
        self._handle: Timer | None = None
        self.cost = 0.0  # seconds the last flush took

    def add(self, outbox: Outbox) -> None:
        """`outbox` has frames now: flush it with the others."""
        self.dirty.append(outbox)
        if self._handle is None:
            delay = min(MAX_WRITE_DELAY, self.cost)
            if delay < 0.0005:
                self._handle = self.clock.call_soon(self.flush)
            else:
                self._handle = self.clock.call_later(delay, self.flush)

    def flush(self) -> None:
        """Write every queued frame: one write per client."""
        started = self.clock.now()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        dirty, self.dirty = self.dirty, []
        for outbox in dirty:
            try:
                outbox.flush()
            except Exception as exc:  # a failed send drops this client, never the others
                self.failed(outbox, exc)
        self.cost = self.clock.now() - started

    def flush_one(self, outbox: Outbox) -> None:
        """Write one client's frames now (before its close frame, or a reply before a read)."""
        try:
            outbox.flush()
        except Exception as exc:  # a failed send drops this client, never the others
            self.failed(outbox, exc)
