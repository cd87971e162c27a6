"""Clocks: the pure core takes `now` from one of these, never from the OS itself.

`now()` is monotonic seconds (for intervals and deadlines); `wall()` is Unix time
in seconds (only for what people read: ISO timestamps in logs and the API).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Unix time in seconds."""
        ...


class SystemClock:
    """The real clocks of the OS (the C functions themselves: no Python frame per call)."""

    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


class ManualClock:
    """A clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
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
