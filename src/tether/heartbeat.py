"""The heartbeat's decisions, with no I/O: whom to ping now, who is stale, each RTT (SPEC §4).

The caller passes `now` (monotonic seconds) to every method; nothing here reads a
clock, sleeps or touches a socket. One `Heartbeat` schedules every connection on a
heap keyed by its next due time, so a tick costs O(due · log n), never O(n).

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
  within (K+1)·I of its last answer.
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
        self._heap: list[tuple[float, int, Beat[T]]] = []
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
        heap = self._heap
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def tick(self, now: float, lead: float = 0.0) -> Tick[T]:
        """Process every connection due at or before `now + lead`.

        A caller that batches nearby due times into one tick passes that batching
        window as `lead` (at most `margin / 2`): batching makes work a little
        early, never late.
        """
        result: Tick[T] = Tick()
        heap = self._heap
        interval = self.interval
        tolerance = self.tolerance
        horizon = now + min(lead, self.margin / 2)
        while heap and heap[0][0] <= horizon:
            at, _, beat = heapq.heappop(heap)
            if not beat.alive:
                continue
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
                        continue
                else:
                    # The last ping went out late and is younger than I: wait for it.
                    self._next_on_grid(beat, now)
                    continue
            elif at < beat.due - self.margin / 2:
                # An early final check found the client alive: ping on its grid.
                heapq.heappush(heap, (beat.due, beat.key, beat))
                continue
            self._next_ping_id += 1
            beat.ping_id = self._next_ping_id
            beat.ping_at = now
            beat.outstanding = True
            result.ping.append(beat)
            self._next_on_grid(beat, now)
        self.pings_sent += len(result.ping)
        self.voided += result.voided
        return result

    def _next_on_grid(self, beat: Beat[T], now: float) -> None:
        """Queue the beat's next due time after `now`, keeping its phase.

        When the next miss would make it stale, its final check is queued
        `margin` ahead of the grid: batching and ordinary loop latency then never
        carry detection past (K+1)·I.
        """
        interval = self.interval
        nxt = beat.due + interval
        if nxt <= now:
            nxt = beat.due + interval * (math.floor((now - beat.due) / interval) + 1)
        beat.due = nxt
        at = nxt
        if beat.outstanding and beat.misses == self.missed - 1:
            at = max(now, min(nxt, beat.ping_at + interval) - self.margin)
        heapq.heappush(self._heap, (at, beat.key, beat))


def encode_ping_id(ping_id: int) -> bytes:
    """The 8-byte ping payload (RFC 6455 §5.5.2 allows up to 125)."""
    return ping_id.to_bytes(8, "big")


def decode_ping_id(payload: bytes | bytearray) -> int | None:
    """The ping id echoed in a pong (§5.5.3), or None when it is not one of ours."""
    if len(payload) != 8:
        return None
    return int.from_bytes(payload, "big")
