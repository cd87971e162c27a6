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
import fcntl
import hmac
import struct
import termios
from collections.abc import Callable
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from aiohttp import StreamReader, WebSocketError, WSMsgType, web

from tether import codes, frames, metrics
from tether.auth import OPEN, AuthError, Grant
from tether.config import Settings
from tether.errors import BackplaneError, PublishError
from tether.heartbeat import decode_ping_id
from tether.hub import Hub, parse_topics
from tether.idempotency import check_key
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, check_integers
from tether.proxies import client_address
from tether.registry import Connection

log = get_logger("server")
HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
STATIC = resources.files("tether") / "static"


class AiohttpPeer:
    """One WebSocket as the hub sees it: write bytes, count buffered bytes, close.

    `write`, `in_transport` and `is_closing` are the transport's own methods,
    bound once: the heartbeat and the flush call them for every client.
    """

    __slots__ = ("_closed", "in_transport", "is_closing", "transport", "write", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws = ws
        self.transport = transport
        self.write: Callable[[bytes], None] = transport.write
        self.in_transport: Callable[[], int] = transport.get_write_buffer_size
        self.is_closing: Callable[[], bool] = transport.is_closing
        self._closed: asyncio.Future[None] | None = None

    def abort(self) -> None:
        self.transport.abort()

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    async def close(self, code: int, reason: str, timeout: float, *, read: bool = True) -> None:
        """Send close (RFC 6455 §7.1.2), then FIN, and linger; abort after `timeout`.

        The close frame goes out after what is buffered, then FIN (§7.1.1: the
        server closes TCP first), while the socket keeps reading until the client
        answers with its close frame or EOF (the handler's `receive()` sees it and
        aiohttp closes the transport). Closing a socket with unread input resets
        it and drops what was not yet sent, so a client still sending would never
        see its close code. A peer that does not read or answer would keep the
        socket forever: past `timeout` the transport is aborted.

        `read=False` (a client closed for flooding): reading stops first, so the
        flood costs nothing more; the socket is aborted as soon as the kernel has
        delivered every byte of the close frame (nothing left unacknowledged), or
        after `timeout`.
        """
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        transport = self.transport
        try:
            async with asyncio.timeout(timeout):
                if not transport.is_closing():
                    if not read:
                        transport.pause_reading()
                    transport.write(frames.close(code, reason))
                    transport.write_eof()
                if read:
                    while not transport.is_closing():  # noqa: ASYNC110 - no event for it
                        await asyncio.sleep(0.02)
                while transport.get_write_buffer_size() > 0 or (  # noqa: ASYNC110 - no event
                    not read and _unacknowledged(transport)
                ):
                    await asyncio.sleep(0.02)
                if not read:
                    transport.abort()
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
    * An unmasked client frame, or a control frame whose length is not in the
      7-bit field: a server must close the connection (RFC 6455 §5.1, §5.5)
      with 1002 and without waiting for a close handshake (§7.1.7). aiohttp's
      parser accepts unmasked frames and has no option for it, and it never
      sees the pongs taken out here, so nothing from that frame on is passed
      on, and the hub kills the connection.

    It also counts the frames against the client's frame rate, and once a
    client is closed for flooding it reads nothing more from it.
    """

    __slots__ = ("_check", "_conn", "_failed", "_hub", "_inner")

    def __init__(self, inner: asyncio.BaseProtocol, hub: Hub, conn: Connection) -> None:
        self._inner = cast(asyncio.Protocol, inner)
        self._hub = hub
        self._conn = conn
        self._check = frames.MaskCheck()
        self._failed = False

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if self._failed or not conn.reading:
            return  # refused or closed for flooding: nothing more is parsed
        check = self._check
        ping_id = check.lone_pong(data)
        if ping_id is not None:  # the common case: one heartbeat answer, nothing else
            self._hub.pong_id(conn, ping_id)
            return
        bad = check.feed(data)
        if check.frames:
            count, check.frames = check.frames, 0
            if not self._hub.count_frames(conn, count):
                return  # a frame flood: closed, and not read any further
        limit = len(data) if bad is None else bad
        rest: bytes = data if bad is None else data[:bad]
        if check.pongs:
            parts, last = [], 0
            for start, end in check.pongs:
                payload = frames.unmask_control(data, start, end)
                self._hub.pong_id(conn, decode_ping_id(payload))
                parts.append(data[last:start])
                last = end
            parts.append(data[last:limit])
            rest = b"".join(parts)
        if rest and conn.reading:
            self._inner.data_received(rest)  # the masked frames before a bad one still count
        if bad is not None:
            self._failed = True
            self._hub.kill(conn, *(check.error or codes.UNMASKED_FRAME))

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _unacknowledged(transport: asyncio.Transport) -> int:
    """Bytes the kernel holds for this socket that the peer has not acknowledged (Linux).

    0 when it cannot tell: the caller then waits out its grace period instead.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _same(given: str, expected: str) -> bool:
    """A header compared in constant time with what it must be.

    aiohttp decodes header bytes with surrogateescape: they are encoded back the
    same way, so a header that is not UTF-8 is refused, not an error.
    """
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message, "status": status}, status)


# The answer when the backplane failed: never its address or error text (they
# may name hosts, ports or worse), and what a publisher should do.
UNAVAILABLE = {
    "error": "backplane unavailable: the event may or may not have been published; "
             "retry with the same Idempotency-Key",
    "status": 503,
    "retry": True,
}


def idempotency_key(request: web.Request) -> str | None:
    """The request's `Idempotency-Key`, if any; PublishError (400) when it is not valid."""
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    if len(values) > 1:
        raise PublishError(400, "more than one Idempotency-Key header")
    return check_key(values[0])


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

    def remote(self, request: web.Request) -> str | None:
        """The client's address: the peer's, or X-Forwarded-For's behind a trusted proxy."""
        return client_address(request.remote, request.headers.getall("X-Forwarded-For", ()),
                              self.settings.trusted_proxies)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        hub = self.hub
        if hub.shutting_down:
            return _error(503, "server shutting down")
        remote = self.remote(request) or "?"
        if len(hub.registry) >= self.settings.max_connections:
            hub.stats.connections_refused += 1
            log.warn("Connection refused, limit reached", limit=self.settings.max_connections,
                     remote=remote)
            return _error(503, "too many connections")
        per_address = self.settings.max_per_address
        if per_address and hub.registry.from_address(remote) >= per_address:
            hub.stats.connections_refused += 1
            log.warn("Connection refused, address limit reached", limit=per_address,
                     remote=remote)
            return _error(429, "too many connections from this address")
        if not origin_allowed(
            request.headers.get("Origin"), request.host, self.settings.allowed_origins
        ):
            log.warn("WebSocket origin refused", origin=request.headers.get("Origin"),
                     remote=remote)
            return _error(403, "origin not allowed")
        try:
            topics = parse_topics(request.query.get("topics", ""), self.settings.max_topics)
        except ValueError as exc:
            return _error(400, str(exc))
        since = request.query.get("since", "")
        # `?token=`: for simple clients; a URL shows in proxy logs, so clients that can
        # send it as their first message (`{"type":"auth"}`) should. The hub checks it
        # once the socket is open, so a bad one gets a close code (4003), not an HTTP status.
        token = request.query.get("token")
        ws = web.WebSocketResponse(
            autoping=False,  # tether answers and measures pings itself (SPEC §4)
            autoclose=False,  # tether answers a close itself: 1002 for an invalid code
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
        conn = hub.open(peer, remote, topics, token=token)
        transport.set_protocol(ClientStream(transport.get_protocol(), hub, conn))
        code: int | None = None
        reason = ""
        try:
            if since:
                await hub.resume_query(conn, since)
            while True:
                if conn.outbox.queue is not None:
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
                    # Answer the client's close (RFC 6455 §5.5.1): 1000, or 1002 when
                    # its code is one no endpoint may send (§7.4). When the server
                    # closed first, its close frame is already out and this only
                    # closes the transport.
                    reply, why = codes.Close.NORMAL, ""
                    if not codes.valid_close_code(code):
                        reply, why = codes.INVALID_CLOSE_CODE
                        code, reason = reply, why
                    await ws.close(code=reply, message=why.encode(), drain=False)
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

    def publisher(self, request: web.Request) -> Grant | None:
        """Who may publish what: PUBLISH_TOKEN (every topic), a JWT's `publish`, or None (401).

        With neither PUBLISH_TOKEN nor auth configured, publishing is open (a
        loopback HOST only: config.py refuses it otherwise).
        """
        token = self.settings.publish_token
        given = request.headers.get("Authorization", "")
        if token is not None and _same(given, f"Bearer {token}"):
            return OPEN
        verifier = self.hub.access.verifier
        if verifier is not None:
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not value:
                return None
            try:
                return verifier.verify(value.strip(), self.hub.clock.wall())
            except AuthError as exc:
                log.debug("Publish token refused", reason=exc.reason, remote=self.remote(request))
                return None
        return OPEN if token is None else None

    def admin(self, request: web.Request) -> web.Response | None:
        """None when the request may see the operator views, else the answer to give.

        ADMIN_TOKEN set: its bearer only (401). Unset: open, unless auth is on,
        where the views stay closed (403), since they name every client.
        """
        token = self.settings.admin_token
        if token is not None:
            if _same(request.headers.get("Authorization", ""), f"Bearer {token}"):
                return None
            response = _error(401, "missing or wrong admin bearer token (ADMIN_TOKEN)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tether admin"'
            return response
        if self.settings.auth_enabled:
            return _error(403, "closed: set ADMIN_TOKEN to open the operator views "
                               "while AUTH_SECRET or AUTH_PUBLIC_KEY is set")
        return None

    async def event(self, request: web.Request) -> web.Response:
        started = asyncio.get_running_loop().time()
        grant = self.publisher(request)
        if grant is None:
            return _error(401, "missing or wrong bearer token")
        # A page on another origin can POST a `text/plain` body with no preflight
        # (a CORS "simple request"): the Origin rule of the upgrade applies here too,
        # and only application/json, which a simple request cannot send, is read.
        if not origin_allowed(
            request.headers.get("Origin"), request.host, self.settings.allowed_origins
        ):
            log.debug("Publish origin refused", origin=request.headers.get("Origin"),
                      remote=self.remote(request))
            return _error(403, "origin not allowed")
        if request.content_type != "application/json":
            return _error(415, "Content-Type must be application/json")
        if (request.charset or "utf-8").lower() != "utf-8":  # RFC 8259 §8.1: JSON is UTF-8
            return _error(415, "JSON must be sent as UTF-8")
        try:
            key = idempotency_key(request)
        except PublishError as exc:
            return _error(exc.status, exc.message)
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
        if grant is not OPEN and isinstance(event, dict):
            topic = event.get("topic", BROADCAST_TOPIC)
            if isinstance(topic, str) and not grant.can_publish(topic):
                return _error(403, f"this token may not publish to topic {topic[:200]!r}")
        try:
            check_integers(body)
            message = await self.hub.publish(event, key)
        except PublishError as exc:
            return _error(exc.status, exc.message)
        except BackplaneError as exc:  # Redis away or failed mid-call (SPEC §8)
            # The backplane's error texts are redacted; the body names none of it.
            log.warn("Publish failed, backplane unavailable", error=str(exc),
                     outcome="unknown" if exc.outcome_unknown else "not published",
                     key=key is not None)
            return web.Response(body=orjson.dumps(UNAVAILABLE), status=503,
                                content_type="application/json", headers={"Retry-After": "1"})
        reply: dict[str, Any] = {"accepted": True, "topic": message.topic, "seq": message.seq}
        if message.duplicate:
            reply["duplicate"] = True
        return _json(reply, 202)

    async def health(self, request: web.Request) -> web.Response:
        # A load balancer gets status, uptime and clients without a token; the rest
        # (counters, backplane) is an operator view.
        if self.admin(request) is not None:
            return _json(self.hub.minimal_health())
        return _json(self.hub.health())

    async def metrics(self, request: web.Request) -> web.Response:
        refused = self.admin(request)
        if refused is not None:
            return refused
        return web.Response(body=metrics.render(self.hub),
                            headers={"Content-Type": metrics.CONTENT_TYPE})

    async def connections(self, request: web.Request) -> web.Response:
        refused = self.admin(request)
        if refused is not None:
            return refused
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
