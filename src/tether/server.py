"""The aiohttp edge: HTTP and WebSocket on one port (SPEC §6, §9).

With `stream.py`, the only modules that know aiohttp's server. This one turns
HTTP requests into hub calls and answers the WebSocket upgrade; after it, the
connection's bytes are tether's (`stream.py`): frames from clients are read by
`wire.FrameReader`, frames to clients are written pre-encoded (see `frames.py`),
with permessage-deflate off so the same bytes are valid on every connection.
"""

from __future__ import annotations

import asyncio
import hmac
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from aiohttp import StreamReader, web

from tether import metrics
from tether.auth import OPEN, AuthError, Grant
from tether.config import Settings
from tether.errors import BackplaneError, PublishError, Refusal, ShuttingDown
from tether.hub import Hub, parse_topics
from tether.idempotency import check_key
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, check_integers
from tether.proxies import client_address
from tether.registry import Connection
from tether.stream import ClientStream, SocketPeer

if TYPE_CHECKING:
    from tether.workerviews import WorkerViews

log = get_logger("server")
HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
STATIC = resources.files("tether") / "static"


# The answer to a publish once shutdown has begun: nothing was published.
SHUTTING_DOWN = {
    "error": "server shutting down: nothing was published; retry (another node, or after "
             "the restart) with the same Idempotency-Key",
    "status": 503,
    "retry": True,
}

# Why a publish was refused, as an HTTP status (the one place they are mapped).
HTTP_STATUS = {Refusal.INVALID: 400, Refusal.TOO_LARGE: 413, Refusal.KEY_REUSED: 422}


def _retry_later(answer: dict[str, Any]) -> web.Response:
    """A 503 that says when to try again (with the same Idempotency-Key)."""
    return web.Response(body=orjson.dumps(answer), status=503,
                        content_type="application/json", headers={"Retry-After": "1"})


def _refused(exc: PublishError) -> web.Response:
    return _error(HTTP_STATUS.get(exc.refusal, 400), exc.message)


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
        raise PublishError(Refusal.INVALID, "more than one Idempotency-Key header")
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
            raise PublishError(
                Refusal.TOO_LARGE, f"body larger than WS_MAX_MESSAGE ({limit} bytes)")
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

    def __init__(self, hub: Hub, settings: Settings, views: WorkerViews | None = None) -> None:
        self.hub = hub
        self.settings = settings
        self.views = views  # `--workers N`: the operator views gathered from every worker

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
        # aiohttp answers the upgrade; then tether reads and writes the socket
        # itself (stream.py), so aiohttp's own ping, close and compression
        # handling are off and its parser is never fed.
        ws = web.WebSocketResponse(autoping=False, autoclose=False, compress=False)
        await ws.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return ws
        epoch = request.query.get("epoch")

        def opener(peer: SocketPeer) -> Connection:
            conn = hub.open(peer, remote, topics, token=token)
            if epoch:
                conn.claimed_epoch = epoch[:64]  # the life of the history `?since=` comes from
            return conn

        # The socket becomes tether's; on plain TCP this returns at once and
        # aiohttp lets go of the request (stream.py).
        await ClientStream(hub, self.settings.max_message, opener, since).take_over(transport)
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
            return _refused(exc)
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
            return _refused(exc)
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
            return _refused(exc)
        except ShuttingDown:
            return _retry_later(SHUTTING_DOWN)
        except BackplaneError as exc:  # Redis away or failed mid-call (SPEC §8)
            # The backplane's error texts are redacted; the body names none of it.
            log.warn("Publish failed, backplane unavailable", error=str(exc),
                     outcome="unknown" if exc.outcome_unknown else "not published",
                     key=key is not None)
            return _retry_later(UNAVAILABLE)
        reply: dict[str, Any] = {"accepted": True, "topic": message.topic, "seq": message.seq}
        if message.duplicate:
            reply["duplicate"] = True
        return _json(reply, 202)

    async def health(self, request: web.Request) -> web.Response:
        # A load balancer gets status, uptime and clients without a token; the rest
        # (counters, backplane) is an operator view.
        views = self.views
        if self.admin(request) is not None:
            return _json(await views.minimal_health() if views else self.hub.minimal_health())
        return _json(await views.health() if views else self.hub.health())

    async def metrics(self, request: web.Request) -> web.Response:
        refused = self.admin(request)
        if refused is not None:
            return refused
        page = await self.views.metrics() if self.views else metrics.render(self.hub)
        return web.Response(body=page, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def connections(self, request: web.Request) -> web.Response:
        refused = self.admin(request)
        if refused is not None:
            return refused
        if self.views is not None:
            return _json(await self.views.connections())
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


def build_app(hub: Hub, settings: Settings, views: WorkerViews | None = None) -> web.Application:
    """The aiohttp application: every route of SPEC §9 on one port."""
    app = web.Application(client_max_size=settings.max_message + 1024)
    app[HUB] = hub
    routes = Routes(hub, settings, views)
    if views is not None:  # a worker's own views, served to its siblings while it runs
        app.on_startup.append(views.start)
        app.on_cleanup.append(views.stop)
    app.router.add_get("/", routes.index)
    app.router.add_get("/tether.js", routes.client_js)
    app.router.add_get("/ws", routes.websocket)
    app.router.add_post("/event", routes.event)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/api/connections", routes.connections)
    app.router.add_get("/metrics", routes.metrics)
    return app
