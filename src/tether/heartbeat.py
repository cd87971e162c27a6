"""The heartbeat's decisions, with no I/O: whom to ping now, who is stale, each RTT (SPEC §4).

The caller passes `now` (monotonic seconds) to every method; nothing here reads a
clock, sleeps or touches a socket.

The schedule is a wheel of S slots of width w (I/300, clamped to 10–100 ms)
that turns once every P = I − 2w; every connection lives in one slot for its
whole life, so it is pinged every P, a little more often than every I (why:
the detection bound, below). A tick visits the slots whose time has come and
handles their connections in a group: a ping costs O(1), with no per-connection
heap or timer, and pings to one connection are exactly P apart. Only checks that
would close a connection are timed one by one, on a small heap of their own.

The rules, for interval I and threshold K:

* Phases. The n-th connection goes to slot frac(n·φ)·S (φ the golden ratio):
  whatever the arrival pattern, even 10,000 connections in one instant, they
  are spread evenly over the turn. Its first ping comes when its slot next
  comes round, within P of connecting.
* Proof of life. Any inbound frame (`seen`) or pong clears the outstanding ping
  and the miss count. Outbound traffic is never passed in, so it never counts.
* Misses. At a visit, an outstanding ping counts as missed when it has been
  unanswered for a whole turn (at least I less the tolerance). K misses in a
  row make the connection stale, and it is closed by the timed check below,
  when each of the K pings has been unanswered for at least I.
* Stalls never count. If a visit runs late (the event loop was blocked or the
  process suspended), the answer may be sitting unread in a socket buffer, so a
  late check counts no miss; it only pings again. Visits that fell inside the
  stall are skipped, keeping the phase: pings never sent never count.
* Detection bound. A peer is closed no later than (K+1)·I after its last sign
  of life, and no sooner than K·I after the first ping it left unanswered, so
  never sooner than K·I after it died (it was alive to answer the ping before).
  With pings I apart those two instants coincide; with pings P = I − 2w apart
  they are 2w apart, and the closing check runs at the midpoint: w (10 ms at
  I = 1 s) of room on each side for timer latency. It also waits until the K-th
  unanswered ping is I old, so "K pings unanswered for at least I each" holds.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_PHI_FRACTION = (math.sqrt(5) - 1) / 2  # 0.618...: the most evenly spreading step
_EPS = 1e-9  # float noise when comparing a slot's time with `now`


class Beat(Generic[T]):
    """Heartbeat state of one connection; `owner` is whatever the caller tracks."""

    __slots__ = (
        "alive",
        "final_at",
        "first_at",
        "key",
        "last_pong",
        "last_seen",
        "misses",
        "outstanding",
        "owner",
        "ping_at",
        "ping_id",
        "rtt",
        "skipped",
        "slot",
    )

    def __init__(self, owner: T, key: int, now: float, slot: int) -> None:
        self.owner = owner
        self.key = key
        self.slot = slot
        self.alive = True
        self.last_seen = now  # last proof of life (any inbound frame); starts at connect
        self.last_pong: float | None = None
        self.ping_id = 0  # id of the last ping sent, echoed back in its pong
        self.ping_at = 0.0  # when the last ping was sent
        self.first_at = 0.0  # when the first ping since the last sign of life was sent
        self.outstanding = False  # a ping was sent and nothing came back since
        self.misses = 0
        self.rtt: float | None = None
        self.final_at: float | None = None  # when its queued closing check runs, if any
        self.skipped = False  # its slot came round while that check was queued


@dataclass(slots=True)
class Tick(Generic[T]):
    """What one tick decided: ping these (each `beat.ping_id` is set), close those."""

    ping: list[Beat[T]] = field(default_factory=list)
    stale: list[Beat[T]] = field(default_factory=list)
    voided: int = 0  # checks that ran late and so counted no miss


class Heartbeat(Generic[T]):
    """Ping scheduling and stale detection for many connections."""

    def __init__(self, interval: float, missed: int, resolution: float | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0 (a disabled heartbeat has no Heartbeat)")
        if missed < 1:
            raise ValueError("missed must be >= 1")
        self.interval = interval
        self.missed = missed
        # How late a check may run and still count a miss, and how much timer
        # jitter a ping's age may show and still be "at least I".
        self.tolerance = min(0.25 * interval, max(0.05, 0.1 * interval))
        # Slot width: how far apart groups of pings go out (a ping goes out up to
        # this much before the phase its connection was given).
        if resolution is None:
            resolution = max(0.01, min(0.1, interval / 300))
        resolution = min(resolution, self.tolerance / 4)
        self.slots = max(1, round(interval / resolution))
        self.resolution = interval / self.slots
        # The wheel turns every P = I − 2w: each side of the closing window gets w.
        self.period = interval - 2 * self.resolution
        self.slack = self.resolution  # room on each side of a closing check
        self._wheel: list[dict[int, Beat[T]]] = [{} for _ in range(self.slots)]
        self._visits: list[tuple[float, int]] = []  # (time, slot) of slots with members
        self._queued = [False] * self.slots  # slot has an entry in _visits
        self._origin: float | None = None  # slot j comes round at origin + j·w + n·I
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
        if self._origin is None:
            self._origin = now
        self._added += 1
        slot = int(((self._added * _PHI_FRACTION) % 1.0) * self.slots)
        beat = Beat(owner, self._added, now, slot)
        self._wheel[slot][beat.key] = beat
        if not self._queued[slot]:
            self._queued[slot] = True
            heapq.heappush(self._visits, (self._next_visit(slot, now), slot))
        self.count += 1
        return beat

    def _next_visit(self, slot: int, after: float) -> float:
        """The first time strictly after `after` that `slot` comes round."""
        assert self._origin is not None
        base = self._origin + slot * (self.period / self.slots)
        turns = math.floor((after - base) / self.period + _EPS) + 1
        return base + turns * self.period

    def remove(self, beat: Beat[T]) -> None:
        """Stop tracking; a queued closing check is dropped lazily when it comes due."""
        if beat.alive:
            beat.alive = False
            self.count -= 1
            self._wheel[beat.slot].pop(beat.key, None)

    # ---- inbound

    def seen(self, beat: Beat[T], now: float) -> None:
        """Any frame from the peer: proof of life."""
        beat.last_seen = now
        beat.outstanding = False
        beat.misses = 0

    def pong(self, beat: Beat[T], ping_id: int | None, now: float) -> float | None:
        """A pong arrived; returns the round-trip time when it answers our last ping."""
        # `seen`, inlined: one call less on every pong.
        beat.last_seen = now
        beat.outstanding = False
        beat.misses = 0
        self.pongs += 1
        beat.last_pong = now
        if ping_id is not None and ping_id == beat.ping_id and ping_id:
            rtt = now - beat.ping_at
            beat.rtt = rtt
            return rtt
        return None

    # ---- time

    def next_due(self) -> float | None:
        """When the next tick has work, or None when nothing is tracked."""
        visits, finals = self._visits, self._finals
        while visits and not self._wheel[visits[0][1]]:
            self._queued[heapq.heappop(visits)[1]] = False  # emptied since it was queued
        while finals and not finals[0][2].alive:
            heapq.heappop(finals)
        if visits and finals:
            return min(visits[0][0], finals[0][0])
        if visits:
            return visits[0][0]
        return finals[0][0] if finals else None

    def tick(self, now: float) -> Tick[T]:
        """Run the closing checks due by `now`, then visit the slots whose time has come."""
        result: Tick[T] = Tick()
        ping = result.ping
        # With K = 1 every ping's closing check is timed, so none takes the inline path.
        every_ping_timed = self.missed == 1
        finals, visits = self._finals, self._visits
        while finals and finals[0][0] <= now + _EPS:
            at, _, beat = heapq.heappop(finals)
            if beat.alive and beat.final_at == at:  # else voided since it was queued
                self._final(beat, at, now, result)
        while visits and visits[0][0] <= now + _EPS:
            at, slot = heapq.heappop(visits)
            members = self._wheel[slot]
            if not members:
                self._queued[slot] = False
                continue
            nxt = at + self.period
            if nxt <= now + _EPS:  # a stall: skip the turns that fell inside it
                nxt = self._next_visit(slot, now)
            for beat in list(members.values()):
                if beat.outstanding or beat.final_at is not None or every_ping_timed:
                    self._visit(beat, at, now, result)
                else:  # answered, nothing queued, no check to time: ping (inline `_ping`)
                    self._next_ping_id += 1
                    beat.ping_id = self._next_ping_id
                    beat.ping_at = beat.first_at = now
                    beat.outstanding = True
                    ping.append(beat)
            heapq.heappush(visits, (nxt, slot))
        self.pings_sent += len(result.ping)
        self.voided += result.voided
        return result

    def _visit(self, beat: Beat[T], at: float, now: float, result: Tick[T]) -> None:
        """The beat's slot came round (due at `at`): count a miss, close, or ping."""
        if beat.final_at is not None:
            if beat.outstanding:
                beat.skipped = True  # the queued closing check decides, and pings if alive
                return
            beat.final_at = None  # answered since the check was queued: it is void
        if beat.outstanding:
            if now - at > self.tolerance:
                result.voided += 1  # late: the answer may be unread; count nothing
            elif now - beat.ping_at >= self.interval - self.tolerance:
                beat.misses += 1
                if beat.misses >= self.missed:
                    self._stale(beat, result)
                    return
            else:
                return  # the last ping went out late and is younger than I: wait for it
        self._ping(beat, now, result)

    def _final(self, beat: Beat[T], at: float, now: float, result: Tick[T]) -> None:
        """A closing check: stale if the ping is still unanswered, else ping if its slot passed."""
        beat.final_at = None
        skipped, beat.skipped = beat.skipped, False
        if beat.outstanding:
            if now - at <= self.tolerance:
                beat.misses += 1
                if beat.misses >= self.missed:
                    self._stale(beat, result)
                    return
            else:
                result.voided += 1  # late: the answer may be unread; count nothing
            self._ping(beat, now, result)
        elif skipped:
            self._ping(beat, now, result)  # alive, and its slot went by meanwhile

    def _stale(self, beat: Beat[T], result: Tick[T]) -> None:
        self.remove(beat)
        self.stale_closed += 1
        result.stale.append(beat)

    def _ping(self, beat: Beat[T], now: float, result: Tick[T]) -> None:
        self._next_ping_id += 1
        beat.ping_id = self._next_ping_id
        beat.ping_at = now
        result.ping.append(beat)
        if not beat.outstanding:
            beat.first_at = now  # the first ping since the last sign of life
        beat.outstanding = True
        if beat.misses == self.missed - 1:
            # Unanswered, this ping makes the connection stale: that check is
            # timed on its own, not left to the slot's next turn.
            at = beat.final_at = self._closing_time(beat, now)
            heapq.heappush(self._finals, (at, beat.key, beat))

    def _closing_time(self, beat: Beat[T], now: float) -> float:
        """When to close if the ping sent `now` stays unanswered (see the module's rules).

        The midpoint of [first unanswered ping + K·I, last sign of life + (K+1)·I],
        and never before the ping sent now is I old.
        """
        interval, k = self.interval, self.missed
        lo = beat.first_at + k * interval
        hi = beat.last_seen + (k + 1) * interval
        at = (lo + hi) / 2 if lo <= hi else lo
        return max(at, now + interval)


def encode_ping_id(ping_id: int) -> bytes:
    """The 8-byte ping payload (RFC 6455 §5.5.2 allows up to 125)."""
    return ping_id.to_bytes(8, "big")


def decode_ping_id(payload: bytes | bytearray) -> int | None:
    """The ping id echoed in a pong (§5.5.3), or None when it is not one of ours."""
    if len(payload) != 8:
        return None
    return int.from_bytes(payload, "big")
