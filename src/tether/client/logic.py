"""The Python client's decisions, with no I/O (SPEC §4, §7, §9).

Each takes `now` and randomness as arguments, so it is tested without sleeping:
`Backoff` (reconnect delays), `overslept` (was the process asleep?),
`SeqTracker` (last seq per topic, duplicates, the `since` to resume from),
`Liveness` (when to send an app-level ping, when a silent connection is dead),
`classify` (what a server message is) and `refresh_delay` (when to fetch a fresh
token). (The URLs it connects to: urls.py.)
"""

from __future__ import annotations

import enum
import random as _random
from collections.abc import Callable, Mapping
from typing import Any

JSON = dict[str, Any]



class Backoff:
    """Reconnect delays: exponential from `base` to `cap`, with full jitter.

    Attempt n waits a uniform random time in [0, min(cap, base·factor^n)).
    Even the first retry is random, so clients dropped together by a server
    restart do not all come back in the same instant (SPEC §9).
    """

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 30.0,
        factor: float = 2.0,
        rand: Callable[[], float] = _random.random,
    ) -> None:
        if base <= 0 or cap < base or factor < 1:
            raise ValueError("need 0 < base <= cap and factor >= 1")
        self.base = base
        self.cap = cap
        self.factor = factor
        self.rand = rand
        self.attempt = 0  # retries since the last reset

    def ceiling(self, attempt: int) -> float:
        """The largest delay of retry number `attempt` (0 = the first)."""
        return min(self.cap, self.base * self.factor ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next retry; counts the retry."""
        r = min(max(self.rand(), 0.0), 1.0)
        delay = r * self.ceiling(self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def overslept(scheduled: float, elapsed: float, slack: float) -> bool:
    """True when a wait of `scheduled` seconds took over `slack` longer (the machine slept).

    `elapsed` must be measured on the wall clock: Linux's monotonic clock stops
    while the machine is suspended.
    """
    return elapsed - scheduled > slack


class SeqTracker:
    """The last seq seen per topic: drops duplicates, gives `since` for a resume (SPEC §7)."""

    def __init__(self, since: Mapping[str, int] | None = None,
                 epoch: str | None = None) -> None:
        self._last: dict[str, int] = dict(since or {})
        self.epoch = epoch  # the server epoch these positions belong to (sent with them)
        self.duplicates = 0  # messages dropped as already seen
        self.gaps = 0  # holes seen in a topic's numbering (each asked for again)
        self._healing: set[str] = set()  # topics asked for again until the hole is filled
        self._asks: dict[str, int] = {}

    def accept(self, topic: str, seq: int) -> bool:
        """True for the next message of its topic (and remember it).

        False for a duplicate, and for a message after a hole: the server
        promised none, so the topic is asked for again from the last seq held
        (`take_asks`), once, and this message comes back with that replay.
        """
        last = self._last.get(topic)
        if last is not None and seq <= last:
            self.duplicates += 1
            return False
        if last is not None and seq > last + 1:
            if topic not in self._healing:
                self._healing.add(topic)
                self.gaps += 1
                self._asks[topic] = last
            return False
        self._healing.discard(topic)
        self._last[topic] = seq
        return True

    def take_asks(self) -> dict[str, int]:
        """Topics to resume again from the seq given, after a hole (each once)."""
        asks, self._asks = self._asks, {}
        return asks

    def position(self, topic: str, seq: int) -> None:
        """Where a topic stands (`subscribed`'s seqs), unless a position is held already."""
        self._last.setdefault(topic, seq)

    def resync(self, topic: str, seq: int | None) -> None:
        """The server lost part of `topic`'s history: continue from its current `seq`."""
        if seq is None:
            self._last.pop(topic, None)
        else:
            self._last[topic] = seq

    def forget(self, topic: str) -> None:
        self._last.pop(topic, None)

    def last(self, topic: str) -> int | None:
        return self._last.get(topic)

    def since(self) -> dict[str, int]:
        """What to resume from: every topic with a known seq."""
        return dict(self._last)


def since_param(since: Mapping[str, int]) -> str:
    """{"a": 12, "b": 3} → "a:12,b:3" (the `?since=` of SPEC §7)."""
    return ",".join(f"{topic}:{seq}" for topic, seq in sorted(since.items()))


class Verdict(enum.Enum):
    WAIT = "wait"  # nothing to do yet
    PING = "ping"  # send an app-level ping now
    DEAD = "dead"  # a ping went unanswered and nothing arrived: close and reconnect


class Liveness:
    """The client's own view of a connection's health (SPEC §4), on wall-clock seconds.

    A ping is due when nothing arrived for `interval` (or, when `periodic`,
    every `interval` whatever arrives, to keep measuring the RTT). The
    connection is dead when a ping stayed unanswered for `timeout` and nothing
    else arrived in that time. A check that runs far later than scheduled
    (the process was suspended) never declares death: it sends a fresh ping,
    because answers that came in meanwhile may not have been read yet.
    """

    def __init__(
        self, interval: float, timeout: float, now: float, periodic: bool = False
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        self.interval = interval
        self.timeout = timeout
        self.periodic = periodic
        self.last_received = now
        self.last_ping = now
        self.outstanding: tuple[int, float] | None = None  # (id, sent at)
        self.rtt: float | None = None
        self._next_id = 0

    def received(self, now: float) -> None:
        """Anything arrived: proof of life."""
        self.last_received = now

    def ping_sent(self, now: float) -> int:
        """Record a ping sent now; its id."""
        self._next_id += 1
        self.outstanding = (self._next_id, now)
        self.last_ping = now
        return self._next_id

    def pong(self, ping_id: object, now: float) -> float | None:
        """A pong arrived; the RTT when it answers the outstanding ping."""
        self.received(now)
        if self.outstanding is None or ping_id != self.outstanding[0]:
            return None
        rtt = max(0.0, now - self.outstanding[1])
        self.outstanding = None
        self.rtt = rtt
        return rtt

    def check(self, now: float, late: bool = False) -> Verdict:
        """What to do at `now`; `late` when this check ran far later than scheduled."""
        if self.outstanding is not None:
            sent = self.outstanding[1]
            if now - sent < self.timeout:
                return Verdict.WAIT
            if now - self.last_received < self.timeout:
                # Traffic flows but this answer never came (dropped by a rate
                # limit?): forget it and judge the next ping.
                self.outstanding = None
            elif late:
                self.outstanding = None
                return Verdict.PING
            else:
                return Verdict.DEAD
        since = self.last_ping if self.periodic else max(self.last_ping, self.last_received)
        return Verdict.PING if now - since >= self.interval or late else Verdict.WAIT

    def next_check(self, now: float) -> float:
        """Seconds from `now` until `check` may give another verdict."""
        if self.outstanding is not None:
            due = max(self.outstanding[1], self.last_received) + self.timeout
        elif self.periodic:
            due = self.last_ping + self.interval
        else:
            due = max(self.last_ping, self.last_received) + self.interval
        return max(0.0, due - now)


class Kind(enum.Enum):
    DATA = "data"  # a published message: has "topic" and "seq"
    RESYNC = "resync"  # part of a topic's history is gone
    CONNECTED = "connected"
    PONG = "pong"
    CONTROL = "control"  # subscribed, unsubscribed, error, ...


_RESYNC_KEYS = frozenset(("type", "topic", "seq"))


def classify(msg: Mapping[str, Any]) -> Kind:
    """What a JSON object from the server is."""
    kind = msg.get("type")
    topic = msg.get("topic")
    seq = msg.get("seq")
    has_seq = isinstance(seq, int) and not isinstance(seq, bool)
    if kind == "resync" and isinstance(topic, str) and msg.keys() <= _RESYNC_KEYS:
        return Kind.RESYNC
    if has_seq and isinstance(topic, str):
        return Kind.DATA
    if kind == "connected":
        return Kind.CONNECTED
    if kind == "pong":
        return Kind.PONG
    return Kind.CONTROL




def refresh_delay(expires_in: float, margin: float = 30.0) -> float:
    """Seconds from now to fetch a fresh token for one that expires in `expires_in` seconds.

    Ahead of expiry by `margin`, or by a fifth of what is left when that is
    less (a 2 s token is refreshed at 1.6 s), so the new one arrives in time.
    """
    left = max(0.0, expires_in)
    return max(0.0, left - min(margin, left / 5))
