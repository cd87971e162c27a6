"""The client protocol: what each frame a client sends does (SPEC §4, §6, §7, §10).

Frames arrive here already parsed, one call per frame kind: a pong (`pong_id`),
a ping (`client_ping`), a text or binary message (`text`, `binary`), and a count
of frames of every kind (`count_frames`). Each is held to its rate (`limits.py`);
a client over a rate for long is closed 1008 and no longer read. Text messages
are tether's JSON protocol (ping, subscribe, unsubscribe, resume, auth) or go to
the application's handlers. Numbers and topic lists a client names are validated
here, and a bad one is answered with `{"type":"error"}`: the connection stays.
A connection waiting for its token (`access.py`) may send `auth` and nothing else.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from tether import codes, frames
from tether.clock import iso
from tether.errors import PublishError
from tether.limits import TokenBucket
from tether.logs import get_logger
from tether.message import check_topic
from tether.views import RTT_BUCKETS

if TYPE_CHECKING:
    from tether.hub import Hub
    from tether.registry import Connection

log = get_logger("hub")
ws_log = get_logger("websocket")

MessageHandler = Callable[["Connection", str | bytes], Awaitable[None] | None]

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


_PROTOCOL_TYPES = frozenset({"ping", "subscribe", "unsubscribe", "resume", "auth"})


class Inbound:
    """What the hub does with each frame a client sends."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        settings = hub.settings
        self.max_topics = settings.max_topics
        self.message_rate = settings.message_rate
        self.control_rate = settings.ping_rate
        self.frame_rate = settings.frame_rate
        self.handlers: list[MessageHandler] = []
        # Whether `Received pong` is logged: the heartbeat driver reads it once a
        # tick, not once per pong.
        self.debug_pongs = ws_log.debug_enabled

    # ---- frames and their rates

    def seen(self, conn: Connection) -> None:
        """Any frame from the client is proof of life (SPEC §4)."""
        beat, heartbeat = conn.beat, self.hub.heartbeat
        if beat is not None and heartbeat is not None:
            heartbeat.seen(beat, self.hub.clock.now())

    def pong_id(self, conn: Connection, ping_id: int | None) -> float | None:
        """A pong whose payload was already read as a ping id (None: not one of ours).

        Pongs count against the control-frame rate with pings (RFC 6455 §5.5.3
        allows unsolicited pongs, not a flood of them): one over the rate is
        ignored, a flood closes the connection.
        """
        hub = self.hub
        now = hub.clock.now()
        bucket = conn.control_bucket
        if bucket is None:
            bucket = conn.control_bucket = TokenBucket(self.control_rate, self.control_rate, now)
        if not bucket.take(now):
            self._refused(conn, bucket, "pong flood")
            return None
        beat, heartbeat = conn.beat, hub.heartbeat
        if beat is None or heartbeat is None:
            return None
        rtt = heartbeat.pong(beat, ping_id, now)
        if rtt is not None:
            stats = hub.stats
            stats.rtt_counts[bisect_left(RTT_BUCKETS, rtt)] += 1
            stats.rtt_sum += rtt
        if self.debug_pongs:
            ws_log.debug(
                "Received pong",
                sessionId=conn.session_id,
                rttMs=None if rtt is None else round(rtt * 1000, 3),
            )
        return rtt

    def client_ping(self, conn: Connection, payload: bytes | bytearray) -> None:
        """A ping frame from the client: answer it (RFC 6455 §5.5.3) within its rate."""
        now = self.hub.clock.now()
        bucket = conn.control_bucket
        if bucket is None:
            bucket = conn.control_bucket = TokenBucket(self.control_rate, self.control_rate, now)
        if bucket.take(now):
            # Answered at once (RFC 6455 §5.5.3), ahead of anything queued.
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
        now = self.hub.clock.now()
        bucket = conn.frame_bucket
        if bucket is None:
            bucket = conn.frame_bucket = TokenBucket(self.frame_rate, self.frame_rate, now)
        if bucket.take(now, count):
            return True
        self.hub.stats.rate_limited += 1
        self._abuse(conn, "frame flood")
        return False

    def _refused(self, conn: Connection, bucket: TokenBucket, what: str) -> None:
        self.hub.stats.rate_limited += 1
        if bucket.abusive:
            self._abuse(conn, what)

    def _within_rate(self, conn: Connection) -> bool:
        now = self.hub.clock.now()
        bucket = conn.message_bucket
        if bucket is None:
            bucket = conn.message_bucket = TokenBucket(self.message_rate, self.message_rate, now)
        if bucket.take(now):
            return True
        self.hub.stats.rate_limited += 1
        if bucket.abusive:
            self._abuse(conn, "message flood")
        elif bucket.strikes == 1:
            self.client_error(conn, "rate limited: too many messages")
        return False

    def _abuse(self, conn: Connection, what: str) -> None:
        if not conn.reading:  # the flood's tail, read before reading stopped: once is enough
            return
        conn.reading = False
        if conn.closing:  # already closing for another reason: just stop reading it
            conn.peer.pause_reading()
            return
        self.hub.stats.abuse_closed += 1
        log.warn("Closing abusive client", sessionId=conn.session_id, reason=what)
        self.hub.close(conn, *codes.FLOODING, read=False)

    # ---- messages

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Register an application handler for client messages that are not tether's own.

        Text that is not a tether protocol message (ping, subscribe, unsubscribe,
        resume) and every binary message go to the handlers, in order.
        """
        self.handlers.append(handler)
        return handler

    async def binary(self, conn: Connection, data: bytes) -> None:
        """A binary message: for the application's handlers, else an error reply."""
        if not self._within_rate(conn):
            return
        if conn.grant is None:  # waiting for its token: `auth` or nothing
            self.hub.access.before_auth(conn)
            return
        if self.handlers:
            await self._to_handlers(conn, data)
        else:
            self.client_error(conn, "binary messages are not supported")

    async def _to_handlers(self, conn: Connection, data: str | bytes) -> None:
        for handler in self.handlers:
            try:
                result = handler(conn, data)
                if result is not None:
                    await result
            except Exception:  # an application bug must not take the connection down
                log.exception("Message handler failed", sessionId=conn.session_id)

    async def text(self, conn: Connection, data: str) -> None:
        """A text message from the client: the client protocol of SPEC §4, §6, §7."""
        if not self._within_rate(conn):
            return
        if conn.grant is None:  # waiting for its token: `auth` or nothing
            await self._first(conn, data)
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            if self.handlers:
                await self._to_handlers(conn, data)
            else:
                self.client_error(conn, "invalid JSON")
            return
        if not isinstance(msg, dict) or msg.get("type") not in _PROTOCOL_TYPES or (
            # Without tokens, an application that speaks its own `auth` keeps it.
            msg.get("type") == "auth" and self.handlers and not self.hub.access.enabled
        ):
            if self.handlers:
                await self._to_handlers(conn, data)
            elif not isinstance(msg, dict):
                self.client_error(conn, "a message must be a JSON object")
            else:
                self.client_error(conn, f"unknown message type {msg.get('type')!r}")
            return
        kind = msg.get("type")
        hub = self.hub
        try:
            if kind == "ping":
                reply: dict[str, Any] = {"type": "pong", "timestamp": iso(hub.clock.wall())}
                if "id" in msg and isinstance(msg["id"], (int, float, str)):
                    reply["id"] = msg["id"]
                hub.send_control(conn, reply)
            elif kind == "subscribe":
                topics = parse_topics(msg.get("topics"), self.max_topics)
                admission = hub.registry.admit(conn, topics, self.max_topics)
                hub.access.refused_topics(conn, admission.refused)
                await hub.fanout.subscribe(conn, admission.granted)
            elif kind == "unsubscribe":
                topics = parse_topics(msg.get("topics"), self.max_topics)
                hub.unsubscribe(conn, topics)
                hub.send_control(conn, {"type": "unsubscribed", "topics": topics})
            elif kind == "resume":
                since = parse_since(msg.get("since"), self.max_topics)
                epoch = msg.get("epoch")
                if isinstance(epoch, str):
                    conn.claimed_epoch = epoch[:64]
                await hub.fanout.resume(conn, since)
            else:  # auth: a fresh token (access.py)
                await hub.access.auth(conn, msg.get("token"))
        except ValueError as exc:
            self.client_error(conn, str(exc))

    async def _first(self, conn: Connection, data: str) -> None:
        """A message from a connection still waiting for its token: `auth`, or it is closed."""
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "auth":
            await self.hub.access.auth(conn, msg.get("token"))
        else:
            self.hub.access.before_auth(conn)

    async def resume_query(self, conn: Connection, raw: str) -> None:
        """The `?since=` of an upgrade: a resume whose error is answered, the connection kept.

        A connection still waiting for its token keeps it until it is admitted.
        """
        if conn.closing or self.hub.access.hold_since(conn, raw):
            return
        try:
            await self.hub.fanout.resume(conn, parse_since(raw, self.max_topics))
        except ValueError as exc:
            self.client_error(conn, f"since: {exc}")

    def client_error(self, conn: Connection, error: str) -> None:
        """Answer a bad message with `{"type":"error"}`; the connection stays."""
        self.hub.stats.client_errors += 1
        self.hub.send_control(conn, {"type": "error", "error": error})
