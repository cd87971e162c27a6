"""The heartbeat's decisions, with no I/O: whom to ping now, who is stale, each RTT (SPEC §4).

The caller passes `now` (monotonic seconds) to every method; nothing here reads a
clock, sleeps or touches a socket. One `Heartbeat` schedules every connection on
heaps keyed by the next due time (pings and ordinary checks on one, checks that
would close a connection on another), so a tick costs O(due · log n), never O(n).

The rules, for interval I and threshold K:

* Phases. The first ping of the n-th connection is due at connect + frac(n·φ)·I
  (φ the golden ratio): whatever the arrival pattern, even 10,000 connections in
  one instant, due times are spread evenly over the interval. Later pings keep
  that phase: due, due + I, due + 2I, ...
* Proof of life. Any inbound frame (`seen`) or pong clears the outstanding ping
  and the miss count. Outbound traffic is never passed in, so it never counts.
* Misses. At a due time, an outstanding ping counts as missed only when it has
  been unanswered for at least I. K misses in a row make the connection stale.
* Stalls never count. If the tick runs late (the event loop was blocked or the
  process suspended), the answer may be sitting unread in a socket buffer, so a
  late check counts no miss; it only pings again. Pings that were never sent
  (their due times fell inside the stall) are simply skipped, keeping the phase.
* Detection bound. A peer that dies just after answering is pinged at most I
  later, that ping and the next K-1 each go unanswered for I, so it is stale
  within (K+1)·I of its last answer. The closing check runs `margin` (5 ms)
  ahead, so ordinary loop latency never carries it past that bound.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_PHI_FRACTION = (math.sqrt(5) - 1) / 2  # 0.618...: the most evenly spreading step


class Beat(Generic[T]):
    """Heartbeat state of one connection; `owner` is whatever the caller tracks."""

    __slots__ = (
        "alive",
        "due",
        "key",
        "last_pong",
        "last_seen",
        "misses",
        "outstanding",
        "owner",
        "ping_at",
        "ping_id",
        "rtt",
    )

    def __init__(self, owner: T, key: int, now: float, due: float) -> None:
        self.owner = owner
        self.key = key
        self.alive = True
        self.due = due
        self.last_seen = now  # last proof of life (any inbound frame); starts at connect
        self.last_pong: float | None = None
        self.ping_id = 0  # id of the last ping sent, echoed back in its pong
        self.ping_at = 0.0  # when the last ping was sent
        self.outstanding = False  # a ping was sent and nothing came back since
        self.misses = 0
        self.rtt: float | None = None


@dataclass(slots=True)
class Tick(Generic[T]):
    """What one tick decided: ping these (each `beat.ping_id` is set), close those."""

    ping: list[Beat[T]] = field(default_factory=list)
    stale: list[Beat[T]] = field(default_factory=list)
    voided: int = 0  # checks that ran late and so counted no miss


class Heartbeat(Generic[T]):
    """Ping scheduling and stale detection for many connections."""

    def __init__(self, interval: float, missed: int) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0 (a disabled heartbeat has no Heartbeat)")
        if missed < 1:
            raise ValueError("missed must be >= 1")
        self.interval = interval
        self.missed = missed
        # How late a check may run and still count a miss, and how much timer
        # jitter a ping's age may show and still be "at least I".
        self.tolerance = min(0.25 * interval, max(0.05, 0.1 * interval))
        # How far ahead of its grid time a final (stale-making) check runs.
        self.margin = min(0.005, self.tolerance / 4)
        self._heap: list[tuple[float, int, Beat[T]]] = []  # pings and ordinary checks
        self._finals: list[tuple[float, int, Beat[T]]] = []  # checks that would close
        self._added = 0
        self._next_ping_id = 0
        self.count = 0
        self.pings_sent = 0
        self.pongs = 0
        self.stale_closed = 0
        self.voided = 0

    # ---- membership

    def add(self, owner: T, now: float) -> Beat[T]:
        """Start tracking a connection that opened at `now`."""
        self._added += 1
        offset = ((self._added * _PHI_FRACTION) % 1.0) * self.interval
        beat = Beat(owner, self._added, now, now + offset)
        heapq.heappush(self._heap, (beat.due, beat.key, beat))
        self.count += 1
        return beat

    def remove(self, beat: Beat[T]) -> None:
        """Stop tracking; its heap entry is dropped lazily when it comes due."""
        if beat.alive:
            beat.alive = False
            self.count -= 1

    # ---- inbound

    def seen(self, beat: Beat[T], now: float) -> None:
        """Any frame from the peer: proof of life."""
        beat.last_seen = now
        beat.outstanding = False
        beat.misses = 0

    def pong(self, beat: Beat[T], ping_id: int | None, now: float) -> float | None:
        """A pong arrived; returns the round-trip time when it answers our last ping."""
        self.seen(beat, now)
        self.pongs += 1
        beat.last_pong = now
        if ping_id is not None and ping_id == beat.ping_id and beat.ping_id:
            beat.rtt = now - beat.ping_at
            return beat.rtt
        return None

    # ---- time

    def next_due(self) -> float | None:
        """When the next tick has work, or None when nothing is tracked."""
        times = [h[0][0] for h in (self._heap, self._finals) if self._top(h) is not None]
        return min(times) if times else None

    @staticmethod
    def _top(heap: list[tuple[float, int, Beat[T]]]) -> Beat[T] | None:
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def tick(self, now: float, lead: float = 0.0) -> Tick[T]:
        """Process final checks due by `now`, and pings and other checks due by `now + lead`.

        A caller that batches ticks passes the batching window as `lead`: pings
        and ordinary checks then run up to `lead` early (never late), in groups.
        Final (stale-making) checks are kept apart and run at their own time, so
        batching never moves a close earlier or later.
        """
        result: Tick[T] = Tick()
        horizon = now + min(lead, self.tolerance / 4)
        finals, heap = self._finals, self._heap
        due: list[tuple[float, int, Beat[T]]] = []
        while finals and finals[0][0] <= now:
            due.append(heapq.heappop(finals))
        while heap and heap[0][0] <= horizon:
            due.append(heapq.heappop(heap))
        for entry in due:  # what they queue again waits for a later tick
            self._process(entry, now, result)
        self.pings_sent += len(result.ping)
        self.voided += result.voided
        return result

    def _process(self, entry: tuple[float, int, Beat[T]], now: float, result: Tick[T]) -> None:
        at, _, beat = entry
        if not beat.alive:
            return
        interval = self.interval
        tolerance = self.tolerance
        if beat.outstanding:
            if now - at > tolerance:
                result.voided += 1  # late: the answer may be unread; count nothing
            elif now - beat.ping_at >= interval - tolerance:
                beat.misses += 1
                if beat.misses >= self.missed:
                    beat.alive = False
                    self.count -= 1
                    self.stale_closed += 1
                    result.stale.append(beat)
                    return
            else:
                # The last ping went out late and is younger than I: wait for it.
                self._next_on_grid(beat, now)
                return
        elif at < beat.due - self.margin / 2:
            # An early final check found the client alive: ping on its grid.
            heapq.heappush(self._heap, (beat.due, beat.key, beat))
            return
        self._next_ping_id += 1
        beat.ping_id = self._next_ping_id
        beat.ping_at = now
        beat.outstanding = True
        result.ping.append(beat)
        self._next_on_grid(beat, now)

    def _next_on_grid(self, beat: Beat[T], now: float) -> None:
        """Queue the beat's next due time after `now`, keeping its phase.

        When the next miss would make it stale, its final check goes to the
        finals heap, `margin` ahead of its grid time (or of the ping's age
        reaching I, if that ping went out late, but never past (K+1)·I after the
        last sign of life): ordinary loop latency then never carries detection
        past (K+1)·I.
        """
        interval = self.interval
        nxt = beat.due + interval
        if nxt <= now:
            nxt = beat.due + interval * (math.floor((now - beat.due) / interval) + 1)
        beat.due = nxt
        if beat.outstanding and beat.misses == self.missed - 1:
            at = max(nxt, beat.ping_at + interval)
            # Never past (K+1)·I of the last sign of life, even when the ping that
            # it answered had gone out early in a batch.
            at = min(at, beat.last_seen + (self.missed + 1) * interval) - self.margin
            # ...and never before the ping has had (all but `tolerance` of) I to answer.
            at = max(now, at, beat.ping_at + interval - self.tolerance)
            heapq.heappush(self._finals, (at, beat.key, beat))
        else:
            heapq.heappush(self._heap, (nxt, beat.key, beat))


def encode_ping_id(ping_id: int) -> bytes:
    """The 8-byte ping payload (RFC 6455 §5.5.2 allows up to 125)."""
    return ping_id.to_bytes(8, "big")


def decode_ping_id(payload: bytes | bytearray) -> int | None:
    """The ping id echoed in a pong (§5.5.3), or None when it is not one of ours."""
    if len(payload) != 8:
        return None
    return int.from_bytes(payload, "big")
