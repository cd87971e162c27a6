"""Abuse limits as pure decisions: a token bucket per connection (SPEC §10).

A client may send `rate` messages a second with bursts up to `burst`. Past that,
messages are refused (the caller answers `{"type":"error"}`, or drops a ping or
a pong); a client that keeps pushing past the limit for `burst` more messages is
closed with 1008, so a flood costs the server little and never starves others.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; `now` comes from the caller."""

    __slots__ = ("burst", "last", "rate", "strikes", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now
        self.strikes = 0  # refusals since the bucket last had room

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend `n` tokens; False when the client is over its rate."""
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens >= n:
            self.tokens = tokens - n
            self.strikes = 0
            return True
        self.tokens = tokens
        self.strikes += 1
        return False

    @property
    def abusive(self) -> bool:
        """Refused `burst` times in a row: time to close the connection."""
        return self.strikes >= self.burst
