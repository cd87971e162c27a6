"""The heartbeat's driver and the event-loop lag monitor, on the clock (SPEC §4).

`heartbeat.py` decides whom to ping and who is stale; `HeartbeatDriver` asks it
when the next decision is due, has the clock call back then, writes the pings
and reaps the stale. `LagMonitor` measures how late the clock's callbacks run,
so a stalled server ("Event loop stalled") is told apart from a silent peer.
Both schedule only through the injected clock, so a test jumps time instead of
sleeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether import codes, frames
from tether.clock import mono_to_iso
from tether.heartbeat import Beat, encode_ping_id
from tether.logs import get_logger

if TYPE_CHECKING:
    from tether.clock import Clock, Timer
    from tether.hub import Hub
    from tether.registry import Connection
    from tether.views import Stats

hb_log = get_logger("heartbeat")
ws_log = get_logger("websocket")
log = get_logger("hub")


class HeartbeatDriver:
    """One timer for the whole heartbeat: ticks when the wheel or a closing check is due."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.clock = hub.clock
        self.heartbeat = hub.heartbeat
        self.running = False
        self._timer: Timer | None = None
        self._timer_when = 0.0
        self._tick_pending = False
        self._ticked_at = float("-inf")
        self._min_gap = 0.0
        if self.heartbeat is not None:
            # Ticks at most every 0.5 ms, so a closing check is never later than a
            # fraction of its slack (w on each side). Pings go out a slot at a time
            # (10 ms to 100 ms apart: I/300), so they, and the pongs that answer
            # them, come in groups that one loop pass handles (fewer wake-ups).
            self._min_gap = min(0.0005, self.heartbeat.slack / 4)

    def start(self) -> None:
        """Start pinging; logs the start or that it is disabled."""
        heartbeat = self.heartbeat
        if heartbeat is None:
            hb_log.info("Heartbeat disabled (interval <= 0)")
            return
        settings = self.hub.settings
        hb_log.info(
            "Starting heartbeat",
            intervalMs=settings.heartbeat_interval_ms,
            missed=settings.heartbeat_missed,
        )
        self.running = True
        self.wake()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.running:
            self.running = False
            hb_log.info("Heartbeat stopped")

    def wake(self) -> None:
        """The schedule may have moved sooner (a connection joined): check the timer."""
        if self.running and self.heartbeat is not None:
            due = self.heartbeat.next_due()
            if due is not None:
                self._schedule(due)

    def _schedule(self, due: float) -> None:
        """Have a tick run at `due` (or a little later, to coalesce), unless one is sooner."""
        if self._tick_pending:
            return  # the pending tick reschedules after it runs
        now = self.clock.now()
        when = max(due, now, self._ticked_at + self._min_gap)
        if self._timer is not None:
            if self._timer_when <= when:
                return
            self._timer.cancel()
        self._timer_when = when
        self._timer = self.clock.call_later(max(0.0, when - now), self._on_timer)

    def _on_timer(self) -> None:
        # Run the tick one loop pass later: frames read from sockets in this pass
        # (a pong that arrived while the loop was blocked) reach their handlers
        # first, so a late tick never reaps a client whose answer is unread.
        self._timer = None
        self._tick_pending = True
        self.clock.call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_pending = False
        now = self.clock.now()
        self._ticked_at = now
        heartbeat = self.heartbeat
        if heartbeat is None or not self.running:
            return
        self.hub.inbound.debug_pongs = ws_log.debug_enabled
        result = heartbeat.tick(now)
        pinged = 0
        head = frames.PING8_HEAD
        for beat in result.ping:
            conn = beat.owner
            if conn.outbox.closed:
                continue
            peer = conn.peer
            if peer.is_closing():
                continue
            # A ping frame (opcode 0x9, RFC 6455 §5.5.2) carrying the 8-byte ping id.
            peer.write(head + encode_ping_id(beat.ping_id))
            pinged += 1
        for beat in result.stale:
            self._reap(beat, now)
        if hb_log.debug_enabled and (pinged or result.stale):
            hb_log.debug(
                "Heartbeat tick",
                pinged=pinged,
                closed=len(result.stale),
                total=len(self.hub.registry),
            )
        due = heartbeat.next_due()
        if due is not None:
            self._schedule(due)

    def _reap(self, beat: Beat[Connection], now: float) -> None:
        conn = beat.owner
        hb_log.warn(
            "Closing stale connection",
            sessionId=conn.session_id,
            lastPong=mono_to_iso(self.clock, beat.last_seen),
            missedMs=round((now - beat.last_seen) * 1000),
        )
        self.hub.kill(conn, *codes.HEARTBEAT_TIMEOUT)


class LagMonitor:
    """Measures how late the clock runs callbacks: a stall longer than `threshold` is logged."""

    def __init__(self, clock: Clock, stats: Stats, period: float, threshold: float) -> None:
        self.clock = clock
        self.stats = stats
        self.period = period
        self.threshold = threshold
        self._expected = 0.0
        self._handle: Timer | None = None

    def start(self) -> None:
        self._expected = self.clock.now() + self.period
        self._handle = self.clock.call_later(self.period, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self.clock.now()
        lag = max(0.0, now - self._expected)
        stats = self.stats
        stats.loop_lag = lag
        stats.loop_lag_max = max(stats.loop_lag_max, lag)
        if lag > self.threshold:
            stats.loop_stalls += 1
            log.warn(
                "Event loop stalled",
                lagMs=round(lag * 1000),
                thresholdMs=round(self.threshold * 1000),
            )
        self._expected = now + self.period
        self._handle = self.clock.call_later(self.period, self._check)
