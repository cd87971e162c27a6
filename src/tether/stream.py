"""A WebSocket after the upgrade: tether owns the socket, and nothing else is kept.

aiohttp answers the upgrade (`101`); from then on the connection is tether's:

* `take_over` hands the socket over. On plain TCP it is duplicated
  (`socket.dup()`, public) and given to a transport of tether's own
  (`loop.connect_accepted_socket`); aiohttp's transport is then aborted, which
  closes only aiohttp's descriptor, so aiohttp's handler returns and its
  request, `WebSocketResponse`, parser and task are freed. An idle client then
  costs a transport, a `ClientStream`, a `SocketPeer` and the hub's `Connection`
  (bench/README.md has the table per kilobyte). Over TLS the socket cannot
  change hands (the TLS state lives in aiohttp's transport), so `ClientStream`
  is installed on that transport (`transport.set_protocol`) and the handler
  waits for the end, as before.
* `SocketPeer` is the hub's `Peer`: frames encoded once (`frames.py`) are
  written straight to the transport, never awaited.
* `ClientStream` reads every byte the client sends, once, through
  `wire.FrameReader`: pongs and pings are handled at once (a heartbeat pong
  costs no task), messages and the close go through a small inbox to a task
  that runs only while there is something to do (an idle client has none).

"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tether import codes, frames
from tether.fanout import hold
from tether.heartbeat import decode_ping_id
from tether.logs import get_logger
from tether.wire import BINARY, CLOSE, PING, PONG, TEXT, Event, FrameReader

if TYPE_CHECKING:
    from tether.hub import Hub
    from tether.registry import Connection

log = get_logger("websocket")

# Inbox events beyond the wire's: the client broke the protocol, the socket is gone.
FAILED, GONE = -1, -2
# Messages waiting for their task before the socket stops being read (TCP then
# pushes back on the client), and the level at which reading resumes.
INBOX_HIGH, INBOX_LOW = 64, 16

Opener = Callable[["SocketPeer"], "Connection"]


class SocketPeer:
    """One WebSocket as the hub sees it: write bytes, count buffered bytes, close.

    `write`, `in_transport` and `is_closing` are the transport's own methods,
    bound once: the heartbeat and the flush call them for every client.
    """

    __slots__ = ("in_transport", "is_closing", "transport", "write")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.write: Callable[[bytes], None] = transport.write
        self.in_transport: Callable[[], int] = transport.get_write_buffer_size
        self.is_closing: Callable[[], bool] = transport.is_closing

    def abort(self) -> None:
        self.transport.abort()

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    async def close(self, code: int, reason: str, timeout: float, *, read: bool = True) -> None:
        """Send close (RFC 6455 §7.1.2), then FIN, and linger; abort after `timeout`.

        The close frame goes out after what is buffered, then FIN (§7.1.1: the
        server closes TCP first), while the socket keeps being read until the
        client answers with its close frame or its FIN (`ClientStream` sees
        them and the transport closes). Closing a socket with unread input
        resets it, and a reset can overtake data the client has not read yet,
        so a client still sending would never see its close code. A peer that
        does not answer would keep the socket forever: past `timeout` the
        transport is aborted.

        `read=False` (a client closed for flooding): reading stops first, so the
        flood costs nothing more; the client has `timeout` to read its close
        frame before the socket is reset.
        """
        transport = self.transport
        try:
            async with asyncio.timeout(timeout):
                if not transport.is_closing():
                    if not read:
                        transport.pause_reading()
                    transport.write(frames.close(code, reason))
                    transport.write_eof()
                while not transport.is_closing():  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.02)
                while transport.get_write_buffer_size() > 0:  # noqa: ASYNC110 - no event
                    await asyncio.sleep(0.02)
        except Exception:  # timeout or a broken transport: free it now
            transport.abort()


def _own_socket(transport: asyncio.Transport) -> socket.socket | None:
    """A duplicate of the upgraded socket for tether's own transport, or None (keep aiohttp's).

    Not over TLS (its state is in aiohttp's transport), and not while the `101`
    still waits in aiohttp's buffer (it must reach the client before any frame).
    """
    if transport.get_extra_info("ssl_object") is not None:
        return None
    if transport.get_write_buffer_size() > 0:
        return None
    raw = transport.get_extra_info("socket")
    if raw is None:
        return None
    try:
        return cast(socket.socket, raw.dup())
    except OSError:  # out of descriptors: keep aiohttp's transport
        return None


class ClientStream(asyncio.Protocol):
    """A connection after the upgrade: every byte read once, its messages in order (module)."""

    __slots__ = ("_conn", "_ended", "_hub", "_inbox", "_inner", "_opener", "_paused",
                 "_reader", "_since", "_task", "_transport", "_waiter")

    def __init__(self, hub: Hub, max_message: int, opener: Opener, since: str = "") -> None:
        self._hub = hub
        self._reader = FrameReader(max_message)
        self._opener: Opener | None = opener  # registers the client once the socket is ours
        self._since = since
        self._conn: Connection | None = None
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None  # aiohttp's, over TLS: told the socket ended
        self._inbox: collections.deque[Event] | None = None  # made at the first message
        self._task: asyncio.Task[None] | None = None  # runs only while the inbox has work
        self._paused = False
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None  # over TLS: the handler waits on it

    # ------------------------------------------------------------------ the hand-over

    async def take_over(self, transport: asyncio.Transport) -> None:
        """Make the upgraded connection tether's (see the module); over TLS, until it ends."""
        loop = asyncio.get_running_loop()
        sock = _own_socket(transport)
        if sock is not None:
            transport.pause_reading()  # from now on the bytes are read by tether's transport
            try:
                await loop.connect_accepted_socket(lambda: self, sock)
            except OSError:
                sock.close()  # the client left during the hand-over
            # Only aiohttp's descriptor closes: the socket stays open through the
            # duplicate. aiohttp's handler then returns, and its objects are freed.
            transport.abort()
            return
        self._inner = cast(asyncio.Protocol, transport.get_protocol())
        transport.set_protocol(self)
        self._waiter = loop.create_future()
        self.connection_made(transport)
        await self._waiter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self._transport = cast(asyncio.Transport, transport)
        hub = self._hub
        transport.set_write_buffer_limits(high=hub.backpressure.high, low=hub.backpressure.low)
        opener, self._opener = self._opener, None
        assert opener is not None
        if hub.shutting_down:  # the upgrade raced the shutdown: 1001, as every client gets
            transport.write(frames.close(*codes.SHUTTING_DOWN))
            transport.close()
            if self._waiter is not None:
                self._waiter.set_result(None)
            return
        self._conn = opener(SocketPeer(transport))
        if self._since:
            # The resume comes before any message the client sends, and live
            # messages wait for it: its task starts on the next loop pass.
            hold(self._conn)
            self._start()

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or not conn.reading:
            return  # closed for flooding, or broke the protocol: nothing more is parsed
        reader, hub = self._reader, self._hub
        ping_id = reader.lone_pong(data)
        if ping_id is not None:  # the common case: one heartbeat answer, nothing else
            hub.pong_id(conn, ping_id)
            return
        events = reader.feed(data)
        if reader.frames:
            count, reader.frames = reader.frames, 0
            if not hub.count_frames(conn, count):
                return  # a frame flood: closed, and not read any further
        alive = False  # any frame but a pong is proof of life (a pong counts itself)
        for event in events:
            kind = event[0]
            if kind == PONG:
                hub.pong_id(conn, decode_ping_id(event[1]))
            elif kind == PING:
                alive = True
                hub.client_ping(conn, event[1])
            else:
                alive = True
                self._push(event)
            if not conn.reading:
                return
        if alive:
            hub.seen(conn)
        if reader.failure is not None:
            # The messages before the bad frame are answered first; then the
            # connection is failed with the code. What comes after is read and
            # dropped, so the client's FIN is seen.
            conn.reading = False
            self._push((FAILED, reader.failure))

    def eof_received(self) -> bool | None:
        return False  # the client sent FIN: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)
        if self._conn is None:
            return
        if self._task is None and not self._inbox and not self._ended:
            self._end(codes.Close.ABNORMAL, "")  # nothing pending: no task needed
        else:
            self._push((GONE, None))

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        # The transport's limits are WS_BACKPRESSURE_HIGH/LOW (set when the
        # socket became tether's): this is the client draining, when what was
        # held back is sent (fanout.py).
        if self._inner is not None:
            self._inner.resume_writing()
        if self._conn is not None:
            self._hub.fanout.drained(self._conn)

    # ------------------------------------------------------------------ the inbox and its task

    def _push(self, event: Event) -> None:
        if self._ended:
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = collections.deque()
        inbox.append(event)
        if self._task is None:
            self._start()
        if len(inbox) > INBOX_HIGH and not self._paused and self._conn is not None \
                and self._conn.reading and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Work through the inbox in order, then end: an idle client holds no task."""
        conn, hub = self._conn, self._hub
        assert conn is not None
        try:
            if self._since:
                since, self._since = self._since, ""
                try:
                    await hub.resume_query(conn, since)
                finally:
                    hub.fanout.release(conn)
            inbox = self._inbox
            while inbox and not self._ended:
                if conn.outbox.queue is not None:
                    # Replies to what this client sent go out before its next event's
                    # effect: a close frame after a protocol error must follow them.
                    hub.flush_one(conn)
                event = inbox.popleft()
                self._resume_reading(len(inbox))
                await self._handle(conn, event)
            if conn.outbox.queue is not None and not self._ended:
                hub.flush_one(conn)
        except Exception:
            log.exception("WebSocket handler failed", sessionId=conn.session_id)
            hub.kill(conn, *codes.INTERNAL)
            self._end(*codes.INTERNAL)
        finally:
            self._task = None

    def _resume_reading(self, left: int) -> None:
        if self._paused and left < INBOX_LOW:
            self._paused = False
            conn, transport = self._conn, self._transport
            if conn is not None and conn.reading and transport is not None \
                    and not transport.is_closing():
                transport.resume_reading()

    async def _handle(self, conn: Connection, event: Event) -> None:
        kind, value = event
        hub = self._hub
        if kind == TEXT:
            await hub.text(conn, value)
        elif kind == BINARY:
            await hub.binary(conn, value)
        elif kind == CLOSE:
            # The client's close (RFC 6455 §5.5.1): answered with 1000, unless
            # the server's own close frame is already out; then the closing
            # handshake is complete and the server closes TCP (§7.1.1).
            code, reason = value
            transport = self._transport
            assert transport is not None
            if not conn.closing and not transport.is_closing():
                transport.write(frames.close(codes.Close.NORMAL, ""))
            transport.close()
            self._end(code, reason)
        elif kind == FAILED:
            code, reason = value
            closing = hub.fail(conn, code, reason)
            if closing is not None:
                await asyncio.shield(closing)  # the close frame first, then the end
            self._end(code, reason)
        else:  # GONE: the socket closed (an abort, a reset, or after a close)
            self._end(codes.Close.ABNORMAL, "")

    def _end(self, code: int | None, reason: str) -> None:
        """The connection is over: the hub forgets it and logs it, once."""
        if self._ended:
            return
        self._ended = True
        self._inbox = None
        conn = self._conn
        assert conn is not None
        self._hub.detach(conn, code, reason)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
