"""The aiohttp edge: HTTP and WebSocket on one port (SPEC §6, §9).

This is the only module that knows aiohttp's server. It adapts each WebSocket to
the hub's `Peer` and turns HTTP requests into hub calls. Frames from clients
are read with aiohttp's parser (`autoping=False`, so pings and pongs reach us),
behind `ClientStream`, which answers heartbeat pongs and checks masking first;
frames to clients are written pre-encoded to the transport (see `frames.py`),
with permessage-deflate off so the same bytes are valid on every connection.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from aiohttp import StreamReader, WebSocketError, WSMsgType, web

from tether import codes, frames, metrics
from tether.config import Settings
from tether.errors import BackplaneError, PublishError
from tether.heartbeat import decode_ping_id
from tether.hub import Hub, parse_since, parse_topics
from tether.logs import get_logger
from tether.message import check_integers
from tether.registry import Connection

log = get_logger("server")
HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
STATIC = resources.files("tether") / "static"


class AiohttpPeer:
    """One WebSocket as the hub sees it: write bytes, count buffered bytes, close.

    `write`, `buffered` and `is_closing` are the transport's own methods, bound
    once: the heartbeat and the flush call them for every client.
    """

    __slots__ = ("_closed", "buffered", "is_closing", "transport", "write", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws = ws
        self.transport = transport
        self.write: Callable[[bytes], None] = transport.write
        self.buffered: Callable[[], int] = transport.get_write_buffer_size
        self.is_closing: Callable[[], bool] = transport.is_closing
        self._closed: asyncio.Future[None] | None = None

    def abort(self) -> None:
        self.transport.abort()

    async def close(self, code: int, reason: str, timeout: float) -> None:
        """Send close (RFC 6455 §7.1.2), then FIN, and linger; abort after `timeout`.

        The close frame goes out after what is buffered, then FIN (§7.1.1: the
        server closes TCP first), while the socket keeps reading until the client
        answers with its close frame or EOF (the handler's `receive()` sees it and
        aiohttp closes the transport). Closing a socket with unread input resets
        it and drops what was not yet sent, so a client still sending (a flood)
        would never see its close code. A peer that does not read or answer would
        keep the socket forever: past `timeout` the transport is aborted.
        """
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        transport = self.transport
        try:
            async with asyncio.timeout(timeout):
                if not transport.is_closing():
                    transport.write(frames.close(code, reason))
                    transport.write_eof()
                while not transport.is_closing():  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.02)
                while transport.get_write_buffer_size() > 0:  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.02)
        except Exception:  # timeout or a broken transport: free it now
            transport.abort()
        finally:
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)


class ClientStream(asyncio.Protocol):
    """Reads a client's bytes before aiohttp's protocol does, once the upgrade is done.

    Installed with the public `transport.set_protocol`, it passes everything on
    to aiohttp's protocol (`inner`) except two things:

    * Whole pong frames, recognised in the header scan (the common one, a lone
      8-byte heartbeat pong, before it): they go to the hub and no further, so a
      pong costs no parse and no wake-up of the connection's handler task.
    * An unmasked client frame: a server must close the connection (RFC 6455
      §5.1) with 1002 and without waiting for a close handshake (§7.1.7).
      aiohttp's parser accepts such frames and has no option for it, so nothing
      from that frame on is passed on, and the hub kills the connection.
    """

    __slots__ = ("_check", "_conn", "_failed", "_hub", "_inner")

    def __init__(self, inner: asyncio.BaseProtocol, hub: Hub, conn: Connection) -> None:
        self._inner = cast(asyncio.Protocol, inner)
        self._hub = hub
        self._conn = conn
        self._check = frames.MaskCheck()
        self._failed = False

    def data_received(self, data: bytes) -> None:
        if self._failed:
            return
        check = self._check
        ping_id = check.lone_pong(data)
        if ping_id is not None:  # the common case: one heartbeat answer, nothing else
            self._hub.pong_id(self._conn, ping_id)
            return
        bad = check.feed(data)
        limit = len(data) if bad is None else bad
        rest: bytes = data if bad is None else data[:bad]
        if check.pongs:
            parts, last = [], 0
            for start, end in check.pongs:
                payload = frames.unmask_control(data, start, end)
                self._hub.pong_id(self._conn, decode_ping_id(payload))
                parts.append(data[last:start])
                last = end
            parts.append(data[last:limit])
            rest = b"".join(parts)
        if rest:
            self._inner.data_received(rest)  # the masked frames before a bad one still count
        if bad is not None:
            self._failed = True
            self._hub.kill(self._conn, *codes.UNMASKED_FRAME)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message, "status": status}, status)


async def read_body(content: StreamReader, limit: int) -> bytes:
    """The whole request body, or PublishError 413 once it passes `limit` bytes.

    `content.read(n)` returns as soon as any bytes are buffered, so a body split
    over TCP segments, or sent chunked, takes several reads. Never more than
    `limit` + 1 bytes are asked for, so an oversize body without a
    Content-Length (chunked) is refused after that many, not buffered whole.
    """
    body = bytearray()
    while chunk := await content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise PublishError(413, f"body larger than WS_MAX_MESSAGE ({limit} bytes)")
    return bytes(body)


async def _answer_and_close(request: web.Request, status: int, message: str) -> web.Response:
    """Send an error, then close the socket at once.

    Left to aiohttp, a request whose body is unread would be kept open for its
    lingering time, reading what the client sends, and then kept alive: a
    client that sends no body would hold the socket far past the deadline.
    """
    response = _error(status, message)
    response.force_close()  # Connection: close
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client is gone already
    if request.transport is not None:
        request.transport.close()  # after the buffered answer is written
    return response


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Cross-site WebSocket hijacking guard: same origin, localhost, or the allowlist.

    A request without an Origin header is not from a browser page; it is allowed.
    """
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if host and parts.netloc == host:
        return True
    return not allowed and parts.hostname in ("localhost", "127.0.0.1", "::1")


class Routes:
    """Request handlers, bound to one hub."""

    def __init__(self, hub: Hub, settings: Settings) -> None:
        self.hub = hub
        self.settings = settings

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        hub = self.hub
        if hub.shutting_down:
            return _error(503, "server shutting down")
        if len(hub.registry) >= self.settings.max_connections:
            hub.stats.connections_refused += 1
            log.warn("Connection refused, limit reached", limit=self.settings.max_connections,
                     remote=request.remote)
            return _error(503, "too many connections")
        if not origin_allowed(
            request.headers.get("Origin"), request.host, self.settings.allowed_origins
        ):
            log.warn("WebSocket origin refused", origin=request.headers.get("Origin"),
                     remote=request.remote)
            return _error(403, "origin not allowed")
        try:
            topics = parse_topics(request.query.get("topics", ""))
            since = parse_since(request.query.get("since", ""))
        except ValueError as exc:
            return _error(400, str(exc))
        ws = web.WebSocketResponse(
            autoping=False,  # tether answers and measures pings itself (SPEC §4)
            compress=False,  # one pre-encoded frame for every client
            # aiohttp refuses a message of max_msg_size bytes or more; WS_MAX_MESSAGE
            # is the largest one allowed (SPEC §2), so the cap is one above it.
            max_msg_size=self.settings.max_message + 1,  # over WS_MAX_MESSAGE: close 1009
            timeout=self.settings.close_timeout_ms / 1000,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return ws
        peer = AiohttpPeer(ws, transport)
        conn = hub.open(peer, request.remote or "?", topics)
        transport.set_protocol(ClientStream(transport.get_protocol(), hub, conn))
        code: int | None = None
        reason = ""
        try:
            if since:
                await hub.resume(conn, since)
            while True:
                if conn.outq is not None:
                    # Replies to what this client sent go out before its next frame
                    # is read: a protocol error there makes aiohttp write its close
                    # frame at once, and the replies must precede it.
                    hub.flush_one(conn)
                msg = await ws.receive()
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    hub.seen(conn)
                    await hub.text(conn, msg.data)
                elif kind is WSMsgType.PONG:
                    hub.pong(conn, msg.data)
                elif kind is WSMsgType.PING:
                    hub.seen(conn)
                    hub.client_ping(conn, msg.data)
                elif kind is WSMsgType.BINARY:
                    hub.seen(conn)
                    await hub.binary(conn, msg.data)
                elif kind is WSMsgType.CLOSE:
                    code, reason = msg.data, msg.extra or ""
                    break
                elif kind is WSMsgType.CLOSING:
                    await peer.wait_closed()
                    break
                else:  # CLOSED, ERROR
                    if isinstance(msg.data, WebSocketError):
                        # aiohttp sent this code (1002, 1007, 1009); ws.close_code
                        # says 1006 because the failed parser cannot read the reply.
                        code, reason = msg.data.code, str(msg.data)
                    break
        finally:
            hub.detach(conn, code if code is not None else ws.close_code, reason)
        return ws

    async def event(self, request: web.Request) -> web.Response:
        started = asyncio.get_running_loop().time()
        token = self.settings.publish_token
        if token is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            # aiohttp decodes header bytes with surrogateescape: encode them back the
            # same way, so a header that is not UTF-8 is a 401, not a 500.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                       expected.encode()):
                return _error(401, "missing or wrong bearer token")
        # A page on another origin can POST a `text/plain` body with no preflight
        # (a CORS "simple request"): the Origin rule of the upgrade applies here too,
        # and only application/json, which a simple request cannot send, is read.
        if not origin_allowed(
            request.headers.get("Origin"), request.host, self.settings.allowed_origins
        ):
            log.debug("Publish origin refused", origin=request.headers.get("Origin"),
                      remote=request.remote)
            return _error(403, "origin not allowed")
        if request.content_type != "application/json":
            return _error(415, "Content-Type must be application/json")
        if (request.charset or "utf-8").lower() != "utf-8":  # RFC 8259 §8.1: JSON is UTF-8
            return _error(415, "JSON must be sent as UTF-8")
        limit = self.settings.max_message
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body larger than WS_MAX_MESSAGE ({limit} bytes)")
        timeout = self.settings.handshake_timeout_ms
        try:
            async with asyncio.timeout_at(started + timeout / 1000):
                body = await read_body(request.content, limit)
        except TimeoutError:
            log.debug("Publish body timed out", remote=request.remote)
            return await _answer_and_close(
                request, 408, f"body not received within WS_HANDSHAKE_TIMEOUT ({timeout} ms)")
        except ConnectionError:  # the client left mid-body: nobody to answer
            return _error(400, "connection lost before the body was complete")
        except PublishError as exc:
            return _error(exc.status, exc.message)
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "body is not valid JSON")
        try:
            check_integers(body)
            message = await self.hub.publish(event)
        except PublishError as exc:
            return _error(exc.status, exc.message)
        except BackplaneError as exc:  # Redis away: nothing was published (SPEC §8)
            log.debug("Publish refused, backplane unavailable", error=str(exc))
            return _error(503, f"backplane unavailable: {exc}")
        return _json({"accepted": True, "topic": message.topic, "seq": message.seq}, 202)

    async def health(self, request: web.Request) -> web.Response:
        return _json(self.hub.health())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.hub),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def connections(self, request: web.Request) -> web.Response:
        conns = self.hub.connections()
        return _json({"count": len(conns), "connections": conns})

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=(STATIC / "index.html").read_bytes(), content_type="text/html", charset="utf-8"
        )

    async def client_js(self, request: web.Request) -> web.Response:
        return web.Response(
            body=(STATIC / "tether.js").read_bytes(),
            content_type="text/javascript",
            charset="utf-8",
        )


def build_app(hub: Hub, settings: Settings) -> web.Application:
    """The aiohttp application: every route of SPEC §9 on one port."""
    app = web.Application(client_max_size=settings.max_message + 1024)
    app[HUB] = hub
    routes = Routes(hub, settings)
    app.router.add_get("/", routes.index)
    app.router.add_get("/tether.js", routes.client_js)
    app.router.add_get("/ws", routes.websocket)
    app.router.add_post("/event", routes.event)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/api/connections", routes.connections)
    app.router.add_get("/metrics", routes.metrics)
    return app
