"""The link to Redis as one node sees it: the status /health shows, and its log lines.

This module holds the outage rule of redis.py's docstring (the contract): a
lost Redis is logged once ("Redis connection lost", then debug lines while it
stays away) and once when it is back ("Redis connection restored"); meanwhile
the node keeps serving and its publishes fail fast. The reader reports what it
sees; the backplane reads the status.
"""

from __future__ import annotations

import time

from tether.logs import get_logger

log = get_logger("backplane")


class Link:
    """stopped → connecting → up, then down and up again while Redis comes and goes."""

    def __init__(self, shown_url: str) -> None:
        self.shown_url = shown_url  # the URL as logs may show it
        self.status = "stopped"
        self.error: str | None = None  # why it is down, redacted
        self.down_since: float | None = None  # time.monotonic() when it went down
        self.outages = 0

    def connecting(self) -> None:
        """Start-up began: connections made, Redis not reached yet."""
        self.status = "connecting"

    def stopped(self) -> None:
        """The connections are closed."""
        self.status = "stopped"

    def lost(self, error: str, delay: float) -> None:
        """A command failed with `error`; the reader retries after `delay` seconds."""
        self.error = error
        if self.status != "down":
            self.status = "down"
            self.outages += 1
            self.down_since = time.monotonic()
            # The node keeps serving its connections and heartbeats; publishes get 503.
            log.error("Redis connection lost", url=self.shown_url, error=self.error,
                      retryInMs=round(delay * 1000))
        else:
            log.debug("Redis still unreachable", error=self.error,
                      retryInMs=round(delay * 1000))

    def up(self) -> None:
        """Redis answered the reader's (re)connection."""
        if self.status != "up":
            if self.status == "down" and self.down_since is not None:
                log.info("Redis connection restored", url=self.shown_url,
                         downMs=round((time.monotonic() - self.down_since) * 1000))
            self.status = "up"
            self.error = None
            self.down_since = None
