"""Clocks: the pure core takes `now` from one of these, never from the OS itself.

`now()` is monotonic seconds (for intervals and deadlines); `wall()` is Unix time
in seconds (only for what people read: ISO timestamps in logs and the API).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol


class Timer(Protocol):
    """A scheduled callback (asyncio's `Handle` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time for tether: what time it is, and when to do things (trio's idea: the clock drives)."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Unix time in seconds."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` after `delay` seconds of this clock."""
        ...

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        """Run `callback` as soon as possible, after what is already due (the next loop pass)."""
        ...


class SystemClock:
    """The real clocks of the OS, and the running event loop's timers.

    `now` and `wall` are the C functions themselves: no Python frame per call.
    """

    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    @staticmethod
    def call_later(delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)

    @staticmethod
    def call_soon(callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_soon(callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when a test says so, and fires what falls due as it moves.

    `advance(dt)` moves time forward and runs each timer at its due time, in order
    (a callback may schedule more). `stall(dt)` moves time without running
    anything, as a blocked or suspended event loop would: the next `advance`
    (even `advance(0)`) runs the overdue timers late, at the current time.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        return self.call_later(0.0, callback)

    def pending(self) -> int:
        """Timers not yet run or cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move forward by `seconds`, running every timer that falls due on the way."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        target = self._now + seconds
        timers = self._timers
        while timers and timers[0][0] <= target:
            when, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)  # late timers (after a stall) run now
            timer.callback()
        self._now = target

    def stall(self, seconds: float) -> None:
        """Move forward by `seconds` running nothing: the loop was blocked or suspended."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds


def iso(wall_seconds: float) -> str:
    """ISO-8601 UTC with milliseconds and a `Z`, as in every log line."""
    text = datetime.fromtimestamp(wall_seconds, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def mono_to_iso(clock: Clock, mono: float) -> str:
    """The wall-clock ISO time of a monotonic instant of `clock`."""
    return iso(clock.wall() - (clock.now() - mono))
