"""The hub: one process's clients, and the rooms that act on them.

It composes the rooms and owns a connection's life (open, close, kill, forget):

    registry.py  who is connected and who reads which topic (pure)
    access.py    who is let in and for how long: tokens, the auth deadline, expiry
    outbox.py    each client's frames on their way out, bounded in bytes; the writer
    inbound.py   what each frame a client sends does; rates, abuse, the JSON protocol
    fanout.py    each published message to every subscriber once, in order; resume
    pulse.py     the heartbeat driver and the event-loop lag monitor, on the clock
    views.py     counters, /health and /api/connections

A connection ends in one of four ways, each named once: the server `close`s it
(a close handshake, WS_CLOSE_TIMEOUT at most), `fail`s it (it broke the
protocol: the close frame, then a short grace), or `kill`s it (presumed dead:
aborted at once); or the socket closes by itself and the server `detach`es it.
Whichever comes first unregisters it (`_unregister`); `detach` always comes
last and logs `WebSocket client disconnected` once, with the code.

It imports no web framework: `stream.py` feeds it frames and gives it a `Peer`
per WebSocket. Writes never await: a broadcast encodes its frame once and offers
it to each client's outbox; a client that cannot keep up is paused, then closed
as too slow (SPEC §6), so one dead client never stalls the others. Every timer
runs on the injected clock (`clock.py`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from functools import partial
from typing import Any

import orjson

from tether import codes, frames, views
from tether.access import Access
from tether.auth import Grant
from tether.backplane.base import Backplane
from tether.clock import Clock, SystemClock
from tether.config import Settings
from tether.fanout import Fanout
from tether.heartbeat import Heartbeat
from tether.inbound import Inbound, MessageHandler, parse_since, parse_topics
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, Priority
from tether.outbox import Backpressure, Decision, Outbox, Writer
from tether.pulse import HeartbeatDriver, LagMonitor
from tether.registry import Connection, Peer, Registry
from tether.views import RTT_BUCKETS, Stats

__all__ = ["RTT_BUCKETS", "Hub", "MessageHandler", "Stats", "parse_since", "parse_topics"]

log = get_logger("hub")
ws_log = get_logger("websocket")

# Longest the socket of a client that broke the protocol or flooded stays open
# once its close frame is written: long enough for the frame to reach it, so it
# learns why (RFC 6455 §7.1.7), not long enough to cost anything.
SHED_GRACE = 1.0


class Hub:
    """All the connections of this process, and what happens to them."""

    def __init__(
        self,
        settings: Settings,
        backplane: Backplane,
        clock: Clock | None = None,
        greet: bool = True,
    ) -> None:
        self.settings = settings
        self.greet = greet  # send `connected` on open (SPEC §9)
        self.backplane = backplane
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        self.stats = Stats()
        self.started_at = self.clock.now()
        self.shutting_down = False
        self.backpressure = Backpressure(
            settings.backpressure_high, settings.backpressure_low, settings.max_buffer
        )
        self.writer = Writer(self.clock, self._write_failed)
        self.heartbeat: Heartbeat[Connection] | None = (
            Heartbeat(settings.heartbeat_interval_ms / 1000, settings.heartbeat_missed)
            if settings.heartbeat_enabled
            else None
        )
        self.access = Access(self)
        self.inbound = Inbound(self)
        self.fanout = Fanout(self)
        self.pulse = HeartbeatDriver(self)
        interval = self.heartbeat.interval if self.heartbeat is not None else None
        self.lag = LagMonitor(
            self.clock,
            self.stats,
            period=min(0.25, max(0.02, interval / 4)) if interval else 0.25,
            threshold=interval or 1.0,
        )
        self._closers: set[asyncio.Future[None]] = set()
        # The rooms' entry points, bound once: the hot paths call them directly.
        self.publish = self.fanout.publish
        self.deliver = self.fanout.deliver
        self.resume = self.fanout.resume
        self.seen = self.inbound.seen
        self.pong_id = self.inbound.pong_id
        self.client_ping = self.inbound.client_ping
        self.count_frames = self.inbound.count_frames
        self.text = self.inbound.text
        self.binary = self.inbound.binary
        self.resume_query = self.inbound.resume_query
        self.on_message = self.inbound.on_message
        self.stop_heartbeat = self.pulse.stop
        self.flush = self.writer.flush  # every queued frame now (else on the next loop pass)
        # The operator views (views.py), read when asked.
        self.health = partial(views.health, self)
        self.minimal_health = partial(views.minimal_health, self)
        self.connections = partial(views.connections, self)

    @property
    def message_handlers(self) -> list[MessageHandler]:
        return self.inbound.handlers

    # ------------------------------------------------------------------ a connection's life

    def open(
        self,
        peer: Peer,
        remote: str,
        topics: Iterable[str] = (),
        session_id: str | None = None,
        token: str | None = None,
    ) -> Connection:
        """Register a new connection; admit it and greet it with `connected` (SPEC §9).

        With auth on, it is admitted by `token` (the upgrade's `?token=`), as an
        anonymous reader of PUBLIC_TOPICS, or once its `auth` message comes
        (`access.py`); until then it is registered, pinged, and gets nothing.
        """
        outbox = Outbox(peer, self.backpressure, self.writer)
        conn = Connection(session_id or str(uuid.uuid4()), self.clock.wall(), remote, outbox)
        if self.access.enabled:
            conn.grant = None  # nothing, not even `*`, until it is admitted
        self.registry.add(conn)
        self.stats.connections_total += 1
        if self.heartbeat is not None:
            conn.beat = self.heartbeat.add(conn, self.clock.now())
            self.pulse.wake()
        self.access.open(conn, [t for t in topics if t != BROADCAST_TOPIC], token)
        self.watch_topics()
        return conn

    def detach(self, conn: Connection, code: int | None, reason: str) -> None:
        """The connection's socket is closed: forget it (idempotent) and log once."""
        if conn.closing and conn.close_code is not None:
            code, reason = conn.close_code, conn.close_reason
        conn.closing = True
        self._unregister(conn)
        counted = int(code if code is not None else codes.Close.ABNORMAL)
        self.stats.disconnects[counted] = self.stats.disconnects.get(counted, 0) + 1
        data: dict[str, Any] = {}
        if conn.grant is not None and conn.grant.sub is not None:
            data["sub"] = conn.grant.sub
        ws_log.info(
            "WebSocket client disconnected",
            sessionId=conn.session_id,
            code=code,
            reason=reason,
            **data,
        )

    def _unregister(self, conn: Connection) -> None:
        if self.registry.remove(conn):
            self.watch_topics()
        if conn.beat is not None and self.heartbeat is not None:
            self.heartbeat.remove(conn.beat)
        self.access.forget(conn)

    def close(
        self, conn: Connection, code: int, reason: str, *, read: bool = True,
        timeout: float | None = None,
    ) -> asyncio.Future[None] | None:
        """Close with a handshake, waiting up to WS_CLOSE_TIMEOUT (or `timeout`), then abort.

        `read=False` (a client closed for abuse): its bytes are no longer read at
        all, so a flood costs nothing while the close frame goes out; the socket
        is aborted after a short grace. Returns the close under way (None when
        one already was).
        """
        if conn.closing:
            return None
        self.writer.flush_one(conn.outbox)  # what was accepted goes out before the close
        conn.closing = True
        conn.close_code, conn.close_reason = code, reason
        self._unregister(conn)
        limit = self.settings.close_timeout_ms / 1000
        timeout = min(limit, SHED_GRACE if not read else timeout if timeout is not None else limit)
        fut = asyncio.ensure_future(conn.peer.close(code, reason, timeout, read=read))
        self._closers.add(fut)
        fut.add_done_callback(self._closers.discard)
        return fut

    def fail(self, conn: Connection, code: int, reason: str) -> asyncio.Future[None] | None:
        """The client broke the protocol (wire.py chose the code): fail the connection.

        RFC 6455 §7.1.7: the close frame with the code goes out, the client is
        no longer read, and the socket is aborted once the frame is delivered.
        """
        conn.reading = False
        return self.close(conn, code, reason, timeout=SHED_GRACE)

    def close_slow(self, conn: Connection) -> None:
        """Close a client whose buffered bytes would pass WS_MAX_BUFFER (1013, SPEC §6)."""
        self.stats.slow_closed += 1
        log.warn(
            "Closing slow client",
            sessionId=conn.session_id,
            bufferedBytes=conn.outbox.buffered(),
            maxBuffer=self.backpressure.max_buffer,
        )
        self.close(conn, *codes.SLOW_CONSUMER)

    def kill(self, conn: Connection, code: int, reason: str) -> None:
        """Presumed dead: unregister at once, close frame best-effort, abort the transport."""
        conn.closing = True
        conn.close_code, conn.close_reason = code, reason
        self._unregister(conn)
        peer = conn.peer
        try:
            if not peer.is_closing():
                peer.write(frames.close(code, reason))
        except Exception:  # best effort: the peer is presumed gone
            pass
        peer.abort()

    def _write_failed(self, outbox: Outbox, exc: Exception) -> None:
        conn = outbox.owner
        assert isinstance(conn, Connection)
        log.warn("Send failed, dropping client", sessionId=conn.session_id, error=repr(exc))
        self.kill(conn, codes.Close.INTERNAL_ERROR, "Send failed")

    async def close_all(self, code: int, reason: str, window: float = 0.5) -> None:
        """Close every client in batches spread over `window` seconds (no reconnect storm)."""
        conns = list(self.registry)
        if conns:
            batches = max(1, min(10, len(conns) // 50))
            size = -(-len(conns) // batches)
            for i in range(batches):
                for conn in conns[i * size : (i + 1) * size]:
                    self.close(conn, code, reason)
                if i < batches - 1:
                    await asyncio.sleep(window / batches)
        if self._closers:
            limit = self.settings.close_timeout_ms / 1000 + 1
            await asyncio.wait(set(self._closers), timeout=limit)

    # ------------------------------------------------------------------ topics

    def subscribe(self, conn: Connection, topics: list[str]) -> None:
        """Add topics already admitted (Registry.admit) and tell the backplane."""
        self.registry.subscribe(conn, topics)
        self.watch_topics()

    def unsubscribe(self, conn: Connection, topics: list[str]) -> None:
        self.registry.unsubscribe(conn, topics)
        self.watch_topics()

    def regrant(self, conn: Connection, grant: Grant) -> list[str]:
        """Give `conn` a new grant (Registry.regrant); the topics it lost."""
        lost = self.registry.regrant(conn, grant)
        if lost:
            self.watch_topics()
        return lost

    def watch_topics(self) -> None:
        """Tell the backplane which topics this process reads now (after a change of them)."""
        self.backplane.watch(set(self.registry.topics()))

    # ------------------------------------------------------------------ writing

    def send(self, conn: Connection, data: str | bytes, priority: Priority = Priority.HIGH) -> bool:
        """Send one message to one client (text for str, binary for bytes)."""
        frame = frames.text(data.encode()) if isinstance(data, str) else frames.binary(data)
        return self._offer(conn, frame, priority)

    def send_control(self, conn: Connection, obj: dict[str, Any]) -> None:
        """One of tether's own messages (`connected`, `pong`, `error`, ...): never skipped."""
        self._offer(conn, frames.text(orjson.dumps(obj)), Priority.HIGH)

    def _offer(self, conn: Connection, frame: bytes, priority: Priority) -> bool:
        decision = conn.outbox.offer(frame, priority)
        if decision is Decision.CLOSE:
            self.close_slow(conn)
        return decision is Decision.SEND

    def flush_one(self, conn: Connection) -> None:
        """Write one client's queued frames now."""
        self.writer.flush_one(conn.outbox)

    # ------------------------------------------------------------------ timers and views

    def start_heartbeat(self) -> None:
        """Start pinging (SPEC §4) and measuring the event loop's lag."""
        self.lag.start()
        self.pulse.start()

    def stop(self) -> None:
        """Stop timers (heartbeat and lag monitor)."""
        self.pulse.stop()
        self.lag.stop()
