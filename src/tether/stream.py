"""A WebSocket after the upgrade: what tether writes to, what it reads from, and the loop.

aiohttp does the HTTP upgrade; from then on tether owns the connection's bytes:

* `AiohttpPeer` is the hub's `Peer`: frames encoded once (`frames.py`) are
  written straight to the transport, never awaited.
* `ClientStream`, installed with asyncio's public `transport.set_protocol`, reads
  every byte the client sends, once, through `wire.FrameReader`: pongs and pings
  are handled at once (a heartbeat pong costs no wake-up of any task), messages
  and the close go to `serve` through a small inbox, and a protocol error is
  answered with the code `wire.py` decided. aiohttp's own parser never sees a
  byte.
* `serve` is the connection's one task: it hands messages to the hub in order,
  answers the close handshake, and tells the hub when the socket is gone.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web

from tether import codes, frames
from tether.heartbeat import decode_ping_id
from tether.wire import BINARY, CLOSE, PING, PONG, TEXT, Event, FrameReader

if TYPE_CHECKING:
    from tether.hub import Hub
    from tether.registry import Connection

# Inbox events beyond the wire's: the client broke the protocol, the socket is gone.
FAILED, GONE = -1, -2
# Messages waiting for `serve` before the socket stops being read (TCP then
# pushes back on the client), and the level at which reading resumes.
INBOX_HIGH, INBOX_LOW = 64, 16


class AiohttpPeer:
    """One WebSocket as the hub sees it: write bytes, count buffered bytes, close.

    `write`, `in_transport` and `is_closing` are the transport's own methods,
    bound once: the heartbeat and the flush call them for every client.
    """

    __slots__ = ("in_transport", "is_closing", "transport", "write", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws = ws
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
        client answers with its close frame or its FIN (`serve` and
        `ClientStream` see them and the transport closes). Closing a socket with
        unread input resets it, and a reset can overtake data the client has not
        read yet, so a client still sending would never see its close code. A
        peer that does not answer would keep the socket forever: past `timeout`
        the transport is aborted.

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


class ClientStream(asyncio.Protocol):
    """Every byte a client sends after the upgrade, read once (see the module)."""

    __slots__ = ("_conn", "_hub", "_inbox", "_inner", "_paused", "_reader", "_transport",
                 "_waiter")

    def __init__(self, inner: asyncio.BaseProtocol, transport: asyncio.Transport, hub: Hub,
                 conn: Connection, max_message: int) -> None:
        self._inner = cast(asyncio.Protocol, inner)  # aiohttp's: told when the socket ends
        self._transport = transport
        self._hub = hub
        self._conn = conn
        self._reader = FrameReader(max_message)
        self._inbox: collections.deque[Event] | None = None  # made at the first message
        transport.set_write_buffer_limits(high=hub.backpressure.high, low=hub.backpressure.low)
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if not conn.reading:
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
            # The messages before the bad frame are answered first; `serve` then
            # closes with the code. What comes after is read and dropped, so the
            # client's FIN is seen.
            conn.reading = False
            self._push((FAILED, reader.failure))

    def _push(self, event: Event) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = collections.deque()
        inbox.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(inbox) > INBOX_HIGH and not self._paused and self._conn.reading:
            self._paused = True
            self._transport.pause_reading()

    async def next(self) -> Event:
        """The next message, close, failure or end of this connection, in order."""
        while not self._inbox:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        inbox = self._inbox
        event = inbox.popleft()
        if self._paused and len(inbox) < INBOX_LOW:
            self._paused = False
            if self._conn.reading and not self._transport.is_closing():
                self._transport.resume_reading()
        return event

    def eof_received(self) -> bool | None:
        return False  # the client sent FIN: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._push((GONE, None))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        # The transport's limits are WS_BACKPRESSURE_HIGH/LOW (set at the upgrade):
        # this is the client draining, when what was held back is sent (fanout.py).
        self._inner.resume_writing()
        self._hub.fanout.drained(self._conn)


async def serve(hub: Hub, conn: Connection, stream: ClientStream, peer: AiohttpPeer,
                since: str) -> None:
    """The connection's task: its messages to the hub, in order, until the socket is gone."""
    code: int | None = None
    reason = ""
    try:
        if since:
            await hub.resume_query(conn, since)
        while True:
            if conn.outbox.queue is not None:
                # Replies to what this client sent go out before its next event's
                # effect: a close frame after a protocol error must follow them.
                hub.flush_one(conn)
            kind, value = await stream.next()
            if kind == TEXT:
                await hub.text(conn, value)
            elif kind == BINARY:
                await hub.binary(conn, value)
            elif kind == CLOSE:
                # The client's close (RFC 6455 §5.5.1): answered with 1000, unless
                # the server's own close frame is already out; then the closing
                # handshake is complete and the server closes TCP (§7.1.1).
                code, reason = value
                if not conn.closing and not peer.transport.is_closing():
                    peer.write(frames.close(codes.Close.NORMAL, ""))
                peer.transport.close()
                break
            elif kind == FAILED:
                code, reason = value
                closing = hub.fail(conn, code, reason)
                if closing is not None:
                    await asyncio.shield(closing)  # the close frame first, then the return
                break
            else:  # GONE: the socket closed (an abort, a reset, or after a close)
                code = codes.Close.ABNORMAL
                break
    finally:
        hub.detach(conn, code, reason)
