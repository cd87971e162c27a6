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
from enum import IntEnum
from typing import Generic, TypeVar

T = TypeVar("T")

_PHI_FRACTION = (math.sqrt(5) - 1) / 2  # 0.618...: the most evenly spreading step
_EPS = 1e-9  # float noise when comparing a slot's time with `now`


class State(IntEnum):
    """Where one connection's heartbeat stands (the table below says how it moves)."""

    QUIET = 0  # nothing outstanding: the next visit of its slot pings
    WAITING = 1  # a ping is outstanding; if it goes unanswered it is not yet the K-th
    CLOSING = 2  # the outstanding ping is the K-th unanswered one: a closing check is queued
    CLOSING_PASSED = 3  # as CLOSING, and its slot came round meanwhile
    REVIVED = 4  # answered while a closing check was queued: that check is void
    REVIVED_PASSED = 5  # as REVIVED, and its slot came round while it was CLOSING


# The transitions, event by event (h11's way: the machine as data).
#
#   answer (any frame from the peer; misses reset to 0)
#     QUIET, WAITING → QUIET; CLOSING → REVIVED; CLOSING_PASSED → REVIVED_PASSED;
#     REVIVED, REVIVED_PASSED → unchanged.
#   visit (its slot comes round)
#     QUIET → ping.
#     WAITING → late visit: count nothing, ping; ping at least I old: a miss, ping;
#               ping younger than I (it went out late): unchanged, wait for it.
#     CLOSING, CLOSING_PASSED → CLOSING_PASSED (the queued check decides).
#     REVIVED, REVIVED_PASSED → the queued check is cancelled; ping.
#   check (the queued closing check comes due)
#     CLOSING, CLOSING_PASSED → on time: stale (the K-th miss); late: count nothing, ping.
#     REVIVED → QUIET (its slot has not come round: it pings then).
#     REVIVED_PASSED → ping (its slot went by while the check was queued).
#   ping → CLOSING when it is the K-th unanswered one (a check is queued), else WAITING.
ANSWER = {
    State.QUIET: State.QUIET,
    State.WAITING: State.QUIET,
    State.CLOSING: State.REVIVED,
    State.CLOSING_PASSED: State.REVIVED_PASSED,
    State.REVIVED: State.REVIVED,
    State.REVIVED_PASSED: State.REVIVED_PASSED,
}
_OUTSTANDING = frozenset({State.WAITING, State.CLOSING, State.CLOSING_PASSED})
_QUEUED = frozenset({State.CLOSING, State.CLOSING_PASSED, State.REVIVED, State.REVIVED_PASSED})


class Beat(Generic[T]):
    """Heartbeat state of one connection; `owner` is whatever the caller tracks."""

    __slots__ = (
        "alive",
        "check_at",
        "first_at",
        "key",
        "last_pong",
        "last_seen",
        "misses",
        "owner",
        "ping_at",
        "ping_id",
        "rtt",
        "slot",
        "state",
    )

    def __init__(self, owner: T, key: int, now: float, slot: int) -> None:
        self.owner = owner
        self.key = key
        self.slot = slot
        self.alive = True
        self.state = State.QUIET
        self.last_seen = now  # last proof of life (any inbound frame); starts at connect
        self.last_pong: float | None = None
        self.ping_id = 0  # id of the last ping sent, echoed back in its pong
        self.ping_at = 0.0  # when the last ping was sent
        self.first_at = 0.0  # when the first ping since the last sign of life was sent
        self.misses = 0  # unanswered pings in a row, counted
        self.rtt: float | None = None
        self.check_at = 0.0  # when the queued closing check runs (CLOSING, REVIVED states)

    @property
    def outstanding(self) -> bool:
        """A ping was sent and nothing came back since."""
        return self.state in _OUTSTANDING

    @property
    def final_at(self) -> float | None:
        """When the closing check queued for it runs, if one is (and not cancelled)."""
        return self.check_at if self.state in _QUEUED else None


@dataclass(slots=True)
class Tick(Generic[T]):
    """What one tick decided: ping these (each `beat.ping_id` is set), close those."""

    ping: list[Beat[T]] = field(default_factory=list)
    stale: list[Beat[T]] = field(default_factory=list)
    late: int = 0  # visits and checks that ran late and so counted no miss


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
        self._checks: list[tuple[float, int, Beat[T]]] = []  # closing checks, by time
        self._added = 0
        self._next_ping_id = 0
        self.count = 0
        self.pings_sent = 0
        self.pongs = 0
        self.stale_closed = 0
        self.late_checks = 0

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
        """Any frame from the peer: proof of life (the `answer` transition)."""
        beat.last_seen = now
        beat.state = ANSWER[beat.state]
        beat.misses = 0

    def pong(self, beat: Beat[T], ping_id: int | None, now: float) -> float | None:
        """A pong arrived; returns the round-trip time when it answers our last ping."""
        # `seen`, inlined: one call less on every pong.
        beat.last_seen = now
        beat.state = ANSWER[beat.state]
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
        visits, checks = self._visits, self._checks
        while visits and not self._wheel[visits[0][1]]:
            self._queued[heapq.heappop(visits)[1]] = False  # emptied since it was queued
        while checks and not self._current(checks[0]):
            heapq.heappop(checks)
        if visits and checks:
            return min(visits[0][0], checks[0][0])
        if visits:
            return visits[0][0]
        return checks[0][0] if checks else None

    @staticmethod
    def _current(entry: tuple[float, int, Beat[T]]) -> bool:
        """Whether a queued check still stands (else it was cancelled or its beat removed)."""
        at, _, beat = entry
        return beat.alive and beat.state in _QUEUED and beat.check_at == at

    def tick(self, now: float) -> Tick[T]:
        """Run the closing checks due by `now`, then visit the slots whose time has come."""
        result: Tick[T] = Tick()
        ping = result.ping
        # With K = 1 every ping queues a closing check, so none takes the inline path.
        every_ping_queues = self.missed == 1
        checks, visits = self._checks, self._visits
        quiet = State.QUIET
        while checks and checks[0][0] <= now + _EPS:
            entry = heapq.heappop(checks)
            if self._current(entry):
                self._check(entry[2], entry[0], now, result)
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
                if beat.state is not quiet or every_ping_queues:
                    self._visit(beat, at, now, result)
                else:  # QUIET → WAITING, and no check to queue: `_ping`, inlined
                    self._next_ping_id += 1
                    beat.ping_id = self._next_ping_id
                    beat.ping_at = beat.first_at = now
                    beat.state = State.WAITING
                    ping.append(beat)
            heapq.heappush(visits, (nxt, slot))
        self.pings_sent += len(result.ping)
        self.late_checks += result.late
        return result

    def _visit(self, beat: Beat[T], at: float, now: float, result: Tick[T]) -> None:
        """The `visit` transitions: the beat's slot came round (due at `at`)."""
        state = beat.state
        if state is State.CLOSING or state is State.CLOSING_PASSED:
            beat.state = State.CLOSING_PASSED  # the queued check decides, and pings if alive
            return
        if state is State.WAITING:
            if now - at > self.tolerance:
                result.late += 1  # late: the answer may be unread; count nothing
            elif now - beat.ping_at >= self.interval - self.tolerance:
                beat.misses += 1  # < K: the K-th would have queued a check instead
            else:
                return  # the last ping went out late and is younger than I: wait for it
        # QUIET, WAITING, and REVIVED states (whose queued check is cancelled).
        self._ping(beat, now, result)

    def _check(self, beat: Beat[T], at: float, now: float, result: Tick[T]) -> None:
        """The `check` transitions: the closing check queued for `at` came due."""
        state = beat.state
        if state is State.CLOSING or state is State.CLOSING_PASSED:
            if now - at <= self.tolerance:
                beat.misses += 1  # the K-th
                self.remove(beat)
                self.stale_closed += 1
                result.stale.append(beat)
                return
            result.late += 1  # late: the answer may be unread; count nothing
            self._ping(beat, now, result)
        elif state is State.REVIVED_PASSED:
            self._ping(beat, now, result)  # alive, and its slot went by meanwhile
        else:  # REVIVED: its slot has not come round yet and pings then
            beat.state = State.QUIET

    def _ping(self, beat: Beat[T], now: float, result: Tick[T]) -> None:
        """Send a ping: → CLOSING when it is the K-th unanswered one, else → WAITING."""
        self._next_ping_id += 1
        beat.ping_id = self._next_ping_id
        beat.ping_at = now
        result.ping.append(beat)
        if beat.state not in _OUTSTANDING:
            beat.first_at = now  # the first ping since the last sign of life
        if beat.misses == self.missed - 1:
            # Unanswered, this ping makes the connection stale: that check is
            # timed on its own, not left to the slot's next turn.
            beat.state = State.CLOSING
            at = beat.check_at = self._closing_time(beat, now)
            heapq.heappush(self._checks, (at, beat.key, beat))
        else:
            beat.state = State.WAITING

    def _closing_time(self, beat: Beat[T], now: float) -> float:
        """When to close if the ping sent `now` stays unanswered (see the module's rules).

        The midpoint of [first unanswered ping + K·I, last sign of life + (K+1)·I],
        and never before the ping sent now is I old.
        """
        interval, k = self.interval, self.missed
        lo = beat.first_at + k * interval
        hi = beat.last_seen + (k + 1) * interval
        at = (lo + hi) / 2 if lo <= hi else lo  # after a stall, never sooner than K·I
        return max(at, now + interval)


def encode_ping_id(ping_id: int) -> bytes:
    """The 8-byte ping payload (RFC 6455 §5.5.2 allows up to 125)."""
    return ping_id.to_bytes(8, "big")


def decode_ping_id(payload: bytes | bytearray) -> int | None:
    """The ping id echoed in a pong (§5.5.3), or None when it is not one of ours."""
    if len(payload) != 8:
        return None
    return int.from_bytes(payload, "big")
