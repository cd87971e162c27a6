"""The hub: ties the registry, heartbeat, backpressure and backplane to live connections.

The decisions live in the pure modules (`registry`, `heartbeat`, `outbox`,
`history`); the hub applies them with asyncio timers and the `Peer` each
connection is adapted to. It imports no web framework: `server.py` feeds it
frames and gives it a `Peer` per WebSocket.

Writes never await. A broadcast encodes its frame once and writes it to each
client's transport; a client that cannot keep up is paused, then closed as too
slow (SPEC §6), so one dead client never stalls the others.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tether import codes, frames
from tether.backplane.base import Backplane, Published
from tether.clock import Clock, SystemClock, Timer, iso, mono_to_iso
from tether.config import Settings
from tether.errors import PublishError
from tether.heartbeat import Beat, Heartbeat, decode_ping_id, encode_ping_id
from tether.limits import TokenBucket
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, Message, Priority, check_topic, prepare
from tether.outbox import Backpressure, Decision
from tether.registry import Connection, Peer, Registry

log = get_logger("hub")
ws_log = get_logger("websocket")
hb_log = get_logger("heartbeat")


# Longest an abusive client's socket stays open once its close frame is written:
# long enough for the frame to reach it, so it learns why (RFC 6455 §7.1.7).
SHED_GRACE = 1.0

# Longest a written frame waits so that several go out in one write (see _flush).
MAX_WRITE_DELAY = 0.005

# Upper bounds (seconds) of the RTT histogram buckets in /metrics.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

MessageHandler = Callable[[Connection, str | bytes], Awaitable[None] | None]


def _per_priority() -> list[int]:
    return [0] * len(Priority)


@dataclass(slots=True)
class Stats:
    """Counters shown in /health and /metrics (lists are indexed by Priority)."""

    connections_total: int = 0
    connections_refused: int = 0
    published: list[int] = field(default_factory=_per_priority)
    delivered: list[int] = field(default_factory=_per_priority)
    skipped: list[int] = field(default_factory=_per_priority)
    rtt_counts: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0
    rate_limited: int = 0
    abuse_closed: int = 0
    slow_closed: int = 0
    resumes: int = 0
    resyncs: int = 0
    replayed: int = 0
    client_errors: int = 0
    duplicates: int = 0  # publishes answered as a repeat of their idempotency key
    loop_lag: float = 0.0  # seconds, last measurement
    loop_lag_max: float = 0.0
    loop_stalls: int = 0


# The largest seq a client may name: Redis counts in signed 64-bit integers, and
# no topic gets near it. Bigger numbers are refused, never wrapped or rounded.
MAX_SEQ = 2**63 - 1
_MAX_SEQ_DIGITS = len(str(MAX_SEQ))


def parse_seq(name: str, seq: object) -> int:
    """A seq named by a client: an int, or a string of ASCII digits, in 0..MAX_SEQ."""
    if isinstance(seq, str):
        # int() would also take "1_000", " 12", "+3" and non-ASCII digits.
        if not (seq and len(seq) <= _MAX_SEQ_DIGITS and seq.isascii() and seq.isdigit()):
            raise ValueError(f"seq of {name!r} must be a whole number of 0 to {MAX_SEQ}")
        value = int(seq)
    elif isinstance(seq, int) and not isinstance(seq, bool):
        value = seq
    else:
        raise ValueError(f"seq of {name!r} must be a whole number of 0 to {MAX_SEQ}")
    if not 0 <= value <= MAX_SEQ:
        raise ValueError(f"seq of {name!r} must be a whole number of 0 to {MAX_SEQ}")
    return value


def parse_since(raw: object, limit: int = 100) -> dict[str, int]:
    """`a:12,b:3` or {"a": 12} → {"a": 12, "b": 3}; raises ValueError.

    At most `limit` topics: a resume names topics to read, and topics per client
    are capped (WS_MAX_TOPICS).
    """
    pairs: Iterable[tuple[object, object]]
    if isinstance(raw, str):
        split: list[tuple[object, object]] = []
        for part in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, number = part.rpartition(":")
            if not sep:
                raise ValueError(f"since needs topic:seq, got {part[:40]!r}")
            split.append((name, number))
        pairs = split
    elif isinstance(raw, Mapping):
        pairs = raw.items()
    else:
        raise ValueError("since must be 'topic:seq,...' or an object")
    result: dict[str, int] = {}
    for key, seq in pairs:
        try:
            name = check_topic(key)
        except PublishError as exc:
            raise ValueError(exc.message) from None
        result[name] = parse_seq(name, seq)
        if len(result) > limit:
            raise ValueError(f"since names more than {limit} topics")
    return result


def parse_topics(raw: object, limit: int = 100) -> list[str]:
    """A list of at most `limit` topic names from a list or a comma string; raises ValueError."""
    items: list[object]
    if isinstance(raw, str):
        items = [t.strip() for t in raw.split(",") if t.strip()]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ValueError("topics must be a list of strings")
    if len(items) > limit:
        raise ValueError(f"at most {limit} topics at once")
    try:
        return [check_topic(t) for t in items]
    except PublishError as exc:
        raise ValueError(exc.message) from None


_PROTOCOL_TYPES = frozenset({"ping", "subscribe", "unsubscribe", "resume"})


def _control(obj: dict[str, Any]) -> bytes:
    return frames.text(orjson.dumps(obj))


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
        self.max_topics = settings.max_topics
        self.greet = greet  # send `connected` on open (SPEC §9)
        self.backplane = backplane
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        self.backpressure = Backpressure(
            settings.backpressure_high, settings.backpressure_low, settings.max_buffer
        )
        self.heartbeat: Heartbeat[Connection] | None = (
            Heartbeat(settings.heartbeat_interval_ms / 1000, settings.heartbeat_missed)
            if settings.heartbeat_enabled
            else None
        )
        self.stats = Stats()
        self.started_at = self.clock.now()
        self.shutting_down = False
        self._heartbeat_running = False
        self._timer: Timer | None = None
        self._timer_when = 0.0
        # Whether `Received pong` is logged: read once per tick, not once per pong.
        self._debug_pongs = ws_log.debug_enabled
        self._tick_pending = False
        self._ticked_at = float("-inf")
        self._min_gap = 0.0
        if self.heartbeat is not None:
            # Ticks at most every 0.5 ms, so a closing check is never later than a
            # fraction of its slack (w on each side). Pings go out a slot at a time
            # (10 ms to 100 ms apart: I/300), so they, and the pongs that answer
            # them, come in groups that one loop pass handles (fewer wake-ups).
            self._min_gap = min(0.0005, self.heartbeat.slack / 4)
        self._lag_handle: Timer | None = None
        self._lag_expected = 0.0
        self._lag_period = 0.25
        self._closers: set[asyncio.Future[None]] = set()
        self.message_handlers: list[MessageHandler] = []
        self._dirty: list[Connection] = []  # connections with queued frames
        self._flush_handle: Timer | None = None
        self._flush_cost = 0.0  # seconds the last flush took

    # ------------------------------------------------------------------ connections

    def open(
        self, peer: Peer, remote: str, topics: Iterable[str] = (), session_id: str | None = None
    ) -> Connection:
        """Register a new connection and greet it with `connected` (SPEC §9)."""
        now = self.clock.now()
        conn = Connection(session_id or str(uuid.uuid4()), self.clock.wall(), remote, peer)
        conn.topics.update(t for t in topics if t != BROADCAST_TOPIC)
        self.registry.add(conn)
        self.stats.connections_total += 1
        if self.heartbeat is not None:
            conn.beat = self.heartbeat.add(conn, now)
            if self._heartbeat_running:
                due = self.heartbeat.next_due()
                if due is not None:
                    self._schedule(due)
        if self.greet:
            self._send_control(
                conn,
                {
                    "type": "connected",
                    "sessionId": conn.session_id,
                    "timestamp": iso(conn.connected_at),
                },
            )
        self.backplane.watch(set(self.registry.topics()))
        ws_log.info("WebSocket client connected", sessionId=conn.session_id, remote=remote)
        return conn

    def detach(self, conn: Connection, code: int | None, reason: str) -> None:
        """The connection's socket is closed: forget it (idempotent) and log once."""
        if conn.closing and conn.close_code is not None:
            code, reason = conn.close_code, conn.close_reason
        conn.closing = True
        self._forget(conn)
        ws_log.info(
            "WebSocket client disconnected",
            sessionId=conn.session_id,
            code=code,
            reason=reason,
        )

    def _forget(self, conn: Connection) -> None:
        if self.registry.remove(conn):
            self.backplane.watch(set(self.registry.topics()))
        if conn.beat is not None and self.heartbeat is not None:
            self.heartbeat.remove(conn.beat)

    # ------------------------------------------------------------------ inbound

    def seen(self, conn: Connection) -> None:
        """Any frame from the client is proof of life (SPEC §4)."""
        beat = conn.beat
        if beat is not None and self.heartbeat is not None:
            self.heartbeat.seen(beat, self.clock.now())

    def pong(self, conn: Connection, payload: bytes | bytearray) -> float | None:
        """A pong frame: proof of life, and the RTT when it answers our last ping."""
        return self.pong_id(conn, decode_ping_id(payload))

    def pong_id(self, conn: Connection, ping_id: int | None) -> float | None:
        """A pong whose payload was already read as a ping id (None: not one of ours).

        Pongs count against the control-frame rate with pings (RFC 6455 §5.5.3
        allows unsolicited pongs, not a flood of them): one over the rate is
        ignored, a flood closes the connection.
        """
        now = self.clock.now()
        bucket = conn.control_bucket
        if bucket is None:
            rate = self.settings.ping_rate
            bucket = conn.control_bucket = TokenBucket(rate, rate, now)
        if not bucket.take(now):
            self._refused(conn, bucket, "pong flood")
            return None
        beat = conn.beat
        if beat is None or self.heartbeat is None:
            return None
        rtt = self.heartbeat.pong(beat, ping_id, now)
        if rtt is not None:
            stats = self.stats
            stats.rtt_counts[bisect_left(RTT_BUCKETS, rtt)] += 1
            stats.rtt_sum += rtt
        if self._debug_pongs:
            ws_log.debug(
                "Received pong",
                sessionId=conn.session_id,
                rttMs=None if rtt is None else round(rtt * 1000, 3),
            )
        return rtt

    def client_ping(self, conn: Connection, payload: bytes | bytearray) -> None:
        """A ping frame from the client: answer it (RFC 6455 §5.5.3) within its rate."""
        now = self.clock.now()
        bucket = conn.control_bucket
        if bucket is None:
            rate = self.settings.ping_rate
            bucket = conn.control_bucket = TokenBucket(rate, rate, now)
        if bucket.take(now):
            if not conn.closing and not conn.peer.is_closing():
                conn.peer.write(frames.pong(payload))
            return
        self._refused(conn, bucket, "ping flood")  # a ping flood gets no answers

    def count_frames(self, conn: Connection, count: int) -> bool:
        """`count` more frames of any kind arrived; False when that is a flood (closed 1008).

        Messages and control frames have rates of their own; this one bounds
        what a client can make the server parse at all (tiny continuation
        frames, say). Its burst is a second's worth, so a burst that a client
        really sends fits, and a flood is closed at once.
        """
        now = self.clock.now()
        bucket = conn.frame_bucket
        if bucket is None:
            rate = self.settings.frame_rate
            bucket = conn.frame_bucket = TokenBucket(rate, rate, now)
        if bucket.take(now, count):
            return True
        self.stats.rate_limited += 1
        self._abuse(conn, "frame flood")
        return False

    def _refused(self, conn: Connection, bucket: TokenBucket, what: str) -> None:
        self.stats.rate_limited += 1
        if bucket.abusive:
            self._abuse(conn, what)

    def _within_rate(self, conn: Connection) -> bool:
        bucket = conn.bucket
        if bucket is None:
            rate = self.settings.message_rate
            bucket = conn.bucket = TokenBucket(rate, rate, self.clock.now())
        if bucket.take(self.clock.now()):
            return True
        self.stats.rate_limited += 1
        if bucket.abusive:
            self._abuse(conn, "message flood")
        elif bucket.strikes == 1:
            self._client_error(conn, "rate limited: too many messages")
        return False

    def _abuse(self, conn: Connection, what: str) -> None:
        if not conn.reading:  # the flood's tail, read before reading stopped: once is enough
            return
        conn.reading = False
        if conn.closing:  # already closing for another reason: just stop reading it
            conn.peer.pause_reading()
            return
        self.stats.abuse_closed += 1
        log.warn("Closing abusive client", sessionId=conn.session_id, reason=what)
        self.close(conn, *codes.FLOODING, read=False)

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Register an application handler for client messages that are not tether's own.

        Text that is not a tether protocol message (ping, subscribe, unsubscribe,
        resume) and every binary message go to the handlers, in order.
        """
        self.message_handlers.append(handler)
        return handler

    async def binary(self, conn: Connection, data: bytes) -> None:
        """A binary message: for the application's handlers, else an error reply."""
        if not self._within_rate(conn):
            return
        if self.message_handlers:
            await self._to_handlers(conn, data)
        else:
            self._client_error(conn, "binary messages are not supported")

    async def _to_handlers(self, conn: Connection, data: str | bytes) -> None:
        for handler in self.message_handlers:
            try:
                result = handler(conn, data)
                if result is not None:
                    await result
            except Exception:  # an application bug must not take the connection down
                log.exception("Message handler failed", sessionId=conn.session_id)

    def send(self, conn: Connection, data: str | bytes, priority: Priority = Priority.HIGH) -> bool:
        """Send one message to one client (text for str, binary for bytes)."""
        frame = frames.text(data.encode()) if isinstance(data, str) else frames.binary(data)
        return self._write(conn, frame, priority)

    async def text(self, conn: Connection, data: str) -> None:
        """A text message from the client: the client protocol of SPEC §4, §6, §7."""
        if not self._within_rate(conn):
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            if self.message_handlers:
                await self._to_handlers(conn, data)
            else:
                self._client_error(conn, "invalid JSON")
            return
        if not isinstance(msg, dict) or msg.get("type") not in _PROTOCOL_TYPES:
            if self.message_handlers:
                await self._to_handlers(conn, data)
            elif not isinstance(msg, dict):
                self._client_error(conn, "a message must be a JSON object")
            else:
                self._client_error(conn, f"unknown message type {msg.get('type')!r}")
            return
        kind = msg.get("type")
        try:
            if kind == "ping":
                reply: dict[str, Any] = {"type": "pong", "timestamp": iso(self.clock.wall())}
                if "id" in msg and isinstance(msg["id"], (int, float, str)):
                    reply["id"] = msg["id"]
                self._send_control(conn, reply)
            elif kind == "subscribe":
                topics = self._admit(conn, parse_topics(msg.get("topics"), self.max_topics))
                self.registry.subscribe(conn, topics)
                self.backplane.watch(set(self.registry.topics()))
                self._send_control(conn, {"type": "subscribed", "topics": sorted(conn.topics)})
            elif kind == "unsubscribe":
                topics = parse_topics(msg.get("topics"), self.max_topics)
                self.registry.unsubscribe(conn, topics)
                self.backplane.watch(set(self.registry.topics()))
                self._send_control(conn, {"type": "unsubscribed", "topics": topics})
            else:  # resume
                await self.resume(conn, parse_since(msg.get("since"), self.max_topics))
        except ValueError as exc:
            self._client_error(conn, str(exc))

    def _admit(self, conn: Connection, topics: Iterable[str]) -> list[str]:
        """`topics`, if the client may read them all without passing WS_MAX_TOPICS.

        Every route that adds topics (`?topics=`, `subscribe`, `?since=`,
        `resume`) comes through here, so one client's topics, and what the hub
        and the backplane keep for them, stay bounded. Raises ValueError.
        """
        wanted = list(dict.fromkeys(topics))
        new = sum(1 for t in wanted if t not in conn.topics and t != BROADCAST_TOPIC)
        if new and len(conn.topics) + new > self.max_topics:
            raise ValueError(
                f"topic limit: a client reads at most {self.max_topics} topics "
                f"(it reads {len(conn.topics)}, asked for {new} more)"
            )
        return wanted

    def _client_error(self, conn: Connection, error: str) -> None:
        self.stats.client_errors += 1
        self._send_control(conn, {"type": "error", "error": error})

    # ------------------------------------------------------------------ resume (SPEC §7)

    async def resume_query(self, conn: Connection, raw: str) -> None:
        """The `?since=` of an upgrade: a resume whose error is answered, the connection kept."""
        try:
            await self.resume(conn, parse_since(raw, self.max_topics))
        except ValueError as exc:
            self._client_error(conn, f"since: {exc}")

    async def resume(self, conn: Connection, since: Mapping[str, int]) -> None:
        """Replay what the client missed on each topic, then let live messages through.

        Live messages of this connection wait in `conn.pending` while history is
        read (the Redis backplane reads over the network), then go out with
        duplicates dropped by seq: in order, exactly once.
        """
        if not since:
            return
        self.registry.subscribe(conn, self._admit(conn, since))
        self.backplane.watch(set(self.registry.topics()))
        self.stats.resumes += 1
        outer = conn.pending is not None
        if not outer:
            conn.pending = []
        try:
            for topic, seq in since.items():
                replay = await self.backplane.since(topic, seq)
                if conn.closing:
                    return
                conn.last_seq[topic] = seq  # the client says what it has
                for message in replay.items:
                    self._deliver_to(conn, message, replay=True)
                if replay.resync:
                    self.stats.resyncs += 1
                    conn.last_seq[topic] = replay.last
                    self._send_control(conn, {"type": "resync", "topic": topic, "seq": replay.last})
        finally:
            if not outer:
                pending, conn.pending = conn.pending, None
                for message in pending or ():
                    self._deliver_to(conn, message)

    # ------------------------------------------------------------------ publish / fan-out

    async def publish(self, event: Any, key: str | None = None) -> Published:
        """Validate, serialize once, and publish through the backplane (SPEC §6).

        With an idempotency `key`, a repeat is answered as a duplicate (see
        `Backplane.publish`).
        """
        prepared = prepare(event)
        if len(prepared.body) > self.settings.max_message:
            limit = self.settings.max_message
            raise PublishError(413, f"event is larger than WS_MAX_MESSAGE ({limit} bytes)")
        message = await self.backplane.publish(prepared, key)
        if message.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.published[message.priority] += 1
        return message

    def deliver(self, message: Message) -> None:
        """Fan one message out to this process's subscribers (the backplane calls this).

        The common case is inlined: a client that is live, not paused, not
        resuming and below the high-water mark gets the frame queued at once.
        Everyone else takes `_deliver_to`, which applies every rule.
        """
        frame = frames.text(message.data)  # encoded once for every client
        topic, seq, size = message.topic, message.seq, len(frame)
        high, room = self.backpressure.high, self.backpressure.max_buffer - size
        inline = not message.is_resync  # a resync notice takes the full rules for everyone
        dirty = self._dirty
        delivered = 0
        for conn in self.registry.subscribers(topic):
            if conn.pending is not None:
                conn.pending.append(message)
                continue
            if not inline or conn.closing or conn.paused:
                self._deliver_to(conn, message, frame)
                continue
            last_seq = conn.last_seq
            if seq <= last_seq.get(topic, 0):
                continue  # already delivered (resume overlap)
            peer = conn.peer
            taken = peer.buffered()
            if taken > high or taken + conn.outq_bytes > room or peer.is_closing():
                self._deliver_to(conn, message, frame)
                continue
            # `_write`'s enqueue, inlined: one call less per delivery.
            queue = conn.outq
            if queue is None:
                queue = conn.outq = []
                dirty.append(conn)
            queue.append(frame)
            conn.outq_bytes += size
            last_seq[topic] = seq
            delivered += 1
        if delivered:
            self.stats.delivered[message.priority] += delivered
            if self._flush_handle is None and dirty:
                self._schedule_flush()

    def _deliver_to(
        self, conn: Connection, message: Message, frame: bytes | None = None, replay: bool = False
    ) -> None:
        topic = message.topic
        if message.is_resync:  # the backplane lost messages (SPEC §8)
            self._resync(conn, topic, message.seq)
            return
        if message.seq <= conn.last_seq.get(topic, 0):
            return  # already delivered (resume overlap)
        if frame is None:
            frame = frames.text(message.data)
        # A replay is what the client asked for to close a gap: never skipped.
        priority = Priority.HIGH if replay else message.priority
        if self._write(conn, frame, priority):
            conn.last_seq[topic] = message.seq
            self.stats.delivered[message.priority] += 1
            if replay:
                self.stats.replayed += 1
        elif not conn.closing:
            self.stats.skipped[message.priority] += 1
            conn.skipped += 1
            # A skipped message is gone for this client: resume will not resend it.
            conn.last_seq[topic] = message.seq

    def _resync(self, conn: Connection, topic: str, seq: int) -> None:
        """The backplane lost messages of `topic` up to `seq` (0: it renumbered from 1).

        A subscriber that may lack some of them gets `resync` and continues after `seq`.
        """
        last = conn.last_seq.get(topic, 0)
        if last < seq or (seq == 0 and last > 0):
            conn.last_seq[topic] = seq
            self.stats.resyncs += 1
            self._send_control(conn, {"type": "resync", "topic": topic, "seq": seq})

    def _send_control(self, conn: Connection, obj: dict[str, Any]) -> None:
        self._write(conn, _control(obj), Priority.HIGH)

    def _write(self, conn: Connection, frame: bytes, priority: Priority) -> bool:
        """Apply backpressure and write; False when skipped or the client is gone."""
        if conn.closing:
            return False
        peer = conn.peer
        if peer.is_closing():
            conn.closing = True
            return False
        # Paused: judged by what the client has not taken (the transport's buffer);
        # too slow: by everything held for it, the frames queued for this flush too.
        taken_slowly = peer.buffered()
        conn.paused = paused = self.backpressure.paused(conn.paused, taken_slowly)
        buffered = taken_slowly + conn.outq_bytes
        decision = self.backpressure.decide(paused, buffered, len(frame), priority)
        if decision is Decision.SEND:
            queue = conn.outq
            if queue is None:
                queue = conn.outq = []
                self._dirty.append(conn)
                if self._flush_handle is None:
                    self._schedule_flush()
            queue.append(frame)
            conn.outq_bytes += len(frame)
            return True
        if decision is Decision.CLOSE:
            self.stats.slow_closed += 1
            log.warn(
                "Closing slow client",
                sessionId=conn.session_id,
                bufferedBytes=buffered,
                maxBuffer=self.backpressure.max_buffer,
            )
            self.close(conn, *codes.SLOW_CONSUMER)
        return False

    # ------------------------------------------------------------------ writing

    def _schedule_flush(self) -> None:
        """Flush on the next loop pass, or, while flushes are costly, a little later.

        The delay follows the cost of the last flush (capped at MAX_WRITE_DELAY):
        an idle hub writes at once; a hub busy fanning out lets frames gather so
        that each client gets several in one write (one system call), like Nagle's
        algorithm but bounded in time.
        """
        delay = min(MAX_WRITE_DELAY, self._flush_cost)
        if delay < 0.0005:
            self._flush_handle = self.clock.call_soon(self.flush)
        else:
            self._flush_handle = self.clock.call_later(delay, self.flush)

    def flush(self) -> None:
        """Write every queued frame: one write per client."""
        started = self.clock.now()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            self.flush_one(conn)
        self._flush_cost = self.clock.now() - started

    def flush_one(self, conn: Connection) -> None:
        queue = conn.outq
        if queue is None:
            return
        conn.outq = None
        conn.outq_bytes = 0
        if conn.closing:
            return
        peer = conn.peer
        if peer.is_closing():
            conn.closing = True
            return
        try:
            peer.write(queue[0] if len(queue) == 1 else b"".join(queue))
        except Exception as exc:  # a failed send drops this client, never the others
            log.warn("Send failed, dropping client", sessionId=conn.session_id, error=repr(exc))
            self.kill(conn, codes.Close.INTERNAL_ERROR, "Send failed")

    # ------------------------------------------------------------------ closing

    def close(self, conn: Connection, code: int, reason: str, *, read: bool = True) -> None:
        """Close with a handshake, waiting up to WS_CLOSE_TIMEOUT, then abort.

        `read=False` (a client closed for abuse): its bytes are no longer read at
        all, so a flood costs nothing while the close frame goes out; the socket
        is aborted once the frame has left, after a short grace at most.
        """
        if conn.closing:
            return
        self.flush_one(conn)  # what was accepted for it goes out before the close frame
        conn.closing = True
        conn.close_code, conn.close_reason = code, reason
        self._forget(conn)
        timeout = self.settings.close_timeout_ms / 1000
        if not read:
            timeout = min(timeout, SHED_GRACE)
        fut = asyncio.ensure_future(conn.peer.close(code, reason, timeout, read=read))
        self._closers.add(fut)
        fut.add_done_callback(self._closers.discard)

    def kill(self, conn: Connection, code: int, reason: str) -> None:
        """Presumed dead: unregister at once, close frame best-effort, abort the transport."""
        conn.closing = True
        conn.close_code, conn.close_reason = code, reason
        self._forget(conn)
        peer = conn.peer
        try:
            if not peer.is_closing():
                peer.write(frames.close(code, reason))
        except Exception:  # best effort: the peer is presumed gone
            pass
        peer.abort()

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

    # ------------------------------------------------------------------ heartbeat driver

    def start_heartbeat(self) -> None:
        """Start pinging (SPEC §4); logs the start or that it is disabled."""
        self._start_lag_monitor()
        if self.heartbeat is None:
            hb_log.info("Heartbeat disabled (interval <= 0)")
            return
        hb_log.info(
            "Starting heartbeat",
            intervalMs=self.settings.heartbeat_interval_ms,
            missed=self.settings.heartbeat_missed,
        )
        self._heartbeat_running = True
        due = self.heartbeat.next_due()
        if due is not None:
            self._schedule(due)

    def stop_heartbeat(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._heartbeat_running:
            self._heartbeat_running = False
            hb_log.info("Heartbeat stopped")

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
        if heartbeat is None or not self._heartbeat_running:
            return
        self._debug_pongs = ws_log.debug_enabled
        result = heartbeat.tick(now)
        pinged = 0
        head = frames.PING8_HEAD
        for beat in result.ping:
            conn = beat.owner
            if conn.closing:
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
                "Heartbeat tick", pinged=pinged, closed=len(result.stale), total=len(self.registry)
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
        self.kill(conn, *codes.HEARTBEAT_TIMEOUT)

    # ------------------------------------------------------------------ event-loop lag

    def _start_lag_monitor(self) -> None:
        if self.heartbeat is not None:
            self._lag_period = min(0.25, max(0.02, self.heartbeat.interval / 4))
        self._stall_threshold = self.heartbeat.interval if self.heartbeat is not None else 1.0
        self._lag_expected = self.clock.now() + self._lag_period
        self._lag_handle = self.clock.call_later(self._lag_period, self._lag_check)

    def _lag_check(self) -> None:
        now = self.clock.now()
        lag = max(0.0, now - self._lag_expected)
        stats = self.stats
        stats.loop_lag = lag
        stats.loop_lag_max = max(stats.loop_lag_max, lag)
        if lag > self._stall_threshold:
            stats.loop_stalls += 1
            log.warn(
                "Event loop stalled",
                lagMs=round(lag * 1000),
                thresholdMs=round(self._stall_threshold * 1000),
            )
        self._lag_expected = now + self._lag_period
        self._lag_handle = self.clock.call_later(self._lag_period, self._lag_check)

    def stop(self) -> None:
        """Stop timers (heartbeat and lag monitor)."""
        self.stop_heartbeat()
        if self._lag_handle is not None:
            self._lag_handle.cancel()
            self._lag_handle = None

    # ------------------------------------------------------------------ views

    def health(self) -> dict[str, Any]:
        hb = self.heartbeat
        s = self.stats
        return {
            "status": "shutting_down" if self.shutting_down else "ok",
            "pid": os.getpid(),
            "uptime": round(self.clock.now() - self.started_at, 3),
            "clients": len(self.registry),
            "heartbeat": {
                "enabled": hb is not None,
                "intervalMs": self.settings.heartbeat_interval_ms,
                "missed": self.settings.heartbeat_missed,
                "pinged": hb.pings_sent if hb else 0,
                "pongs": hb.pongs if hb else 0,
                "staleClosed": hb.stale_closed if hb else 0,
                "lateChecks": hb.late_checks if hb else 0,
            },
            "loop": {
                "lagMs": round(s.loop_lag * 1000, 3),
                "maxLagMs": round(s.loop_lag_max * 1000, 3),
                "stalls": s.loop_stalls,
            },
            "messages": {
                "published": sum(s.published),
                "duplicates": s.duplicates,
                "delivered": sum(s.delivered),
                "replayed": s.replayed,
                "skipped": {p.name.lower(): s.skipped[p] for p in Priority},
                "rateLimited": s.rate_limited,
                "abuseClosed": s.abuse_closed,
                "slowClosed": s.slow_closed,
                "resumes": s.resumes,
                "resyncs": s.resyncs,
            },
            "backplane": self.backplane.state(),
        }

    def connections(self) -> list[dict[str, Any]]:
        out = []
        for conn in self.registry:
            beat = conn.beat
            last_pong = None
            rtt = None
            if beat is not None:
                if beat.last_pong is not None:
                    last_pong = mono_to_iso(self.clock, beat.last_pong)
                if beat.rtt is not None:
                    rtt = round(beat.rtt * 1000, 3)
            unread = conn.peer.buffered()
            buffered = unread + conn.outq_bytes
            out.append(
                {
                    "sessionId": conn.session_id,
                    "connectedAt": iso(conn.connected_at),
                    "remote": conn.remote,
                    "lastPong": last_pong,
                    "rttMs": rtt,
                    "buffered": buffered,
                    "paused": self.backpressure.paused(conn.paused, unread),
                    "skipped": conn.skipped,
                    "topics": sorted(conn.topics),
                    "lastSeq": dict(conn.last_seq),
                }
            )
        return out
