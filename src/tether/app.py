"""The composition root: settings → logging → backplane → hub → server → lifecycle.

`Tether` is also the Python API: start a hub inside your own asyncio program,
publish to it, register shutdown handlers, stop it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from aiohttp import web

from tether import codes, loops
from tether.backplane.base import Backplane, Published
from tether.backplane.memory import MemoryBackplane
from tether.clock import Clock
from tether.config import Settings, host_is_loopback
from tether.errors import BackplaneError, ListenError
from tether.hub import Hub, MessageHandler
from tether.idempotency import check_key
from tether.lifecycle import Handler, Lifecycle
from tether.logs import get_logger
from tether.redact import redact_text, url_secrets
from tether.registry import Connection
from tether.server import build_app
from tether.workerviews import WorkerViews

log = get_logger("main")


def make_backplane(settings: Settings, clock: Clock | None = None) -> Backplane:
    """The in-memory backplane, or Redis when REDIS_URL is set."""
    window = settings.idempotency_window_ms
    if settings.redis_url:
        from tether.backplane.redis import RedisBackplane  # only Redis users import redis

        return RedisBackplane(settings.redis_url, settings.history_size,
                              idempotency_window_ms=window, clock=clock)
    return MemoryBackplane(settings.history_size, idempotency_window_ms=window, clock=clock)


class Tether:
    """One tether server: `await start()`, `await publish(...)`, `await stop()`."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backplane: Backplane | None = None,
        clock: Clock | None = None,
        sock: socket.socket | None = None,
        greet: bool = True,
    ) -> None:
        # greet=False: no `connected` message on open, for an application that
        # speaks its own protocol over tether's WebSocket (on_message / send).
        self.settings = settings or Settings()
        self.backplane = backplane or make_backplane(self.settings, clock)
        self.hub = Hub(self.settings, self.backplane, clock, greet=greet)
        self.lifecycle = Lifecycle()
        self.app: web.Application = build_app(self.hub, self.settings,
                                              WorkerViews.from_env(self.hub))
        self.ssl_context: ssl.SSLContext | None = None
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            from tether.tls import server_context

            # ConfigError naming TLS_CERT or TLS_KEY for Settings made without config.load.
            self.ssl_context = server_context(self.settings.tls_cert, self.settings.tls_key)
        self._runner: web.AppRunner | None = None
        self._sock = sock
        self.port = 0
        self.on_shutdown("ws-heartbeat", self._stop_heartbeat, 55)
        self.on_shutdown("http-server", self._stop_http, 50)
        self.on_shutdown("backplane", self.backplane.stop, 40)

    # ---- public API

    def on_shutdown(self, name: str, handler: Handler, priority: int = 0) -> None:
        """Register a shutdown handler (SPEC §5): highest priority runs first."""
        self.lifecycle.on_shutdown(name, handler, priority)

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Handle client messages that are not tether's own protocol (see Hub.on_message)."""
        return self.hub.on_message(handler)

    def send(self, conn: Connection, data: str | bytes) -> bool:
        """Send one text (str) or binary (bytes) message to one client."""
        return self.hub.send(conn, data)

    async def publish(self, event: dict[str, Any], *, key: str | None = None) -> Published:
        """Publish like `POST /event`; raises PublishError when the event is refused.

        `key` is an idempotency key (as the `Idempotency-Key` header): a repeat
        within IDEMPOTENCY_WINDOW returns the original topic and seq with
        `duplicate=True` and delivers nothing. BackplaneError means Redis is
        away: retry with the same key.
        """
        if key is not None:
            check_key(key)
        return await self.hub.publish(event, key)

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
        if ":" in shown:
            shown = f"[{shown}]"
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{shown}:{self.port}"

    async def start(self) -> None:
        """Listen, start the heartbeat, and log `Server ready`.

        Raises ListenError (an OSError) when the port is taken or HOST is not
        this machine's, with nothing left running.
        """
        await self.backplane.start(self.hub.deliver)
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self.settings.close_timeout_ms / 1000 + 1,
            # aiohttp starts this timer when TCP connects: a client that sends no
            # request (or half a request line) is dropped after it (SPEC §10).
            keepalive_timeout=self.settings.handshake_timeout_ms / 1000,
            # A request refused before its body was read (401, 413...) has the rest
            # read and dropped for at most this long, then its socket is closed.
            lingering_time=self.settings.handshake_timeout_ms / 1000,
        )
        await runner.setup()
        self._runner = runner
        site = Site(runner, self.settings, self._sock, self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            await self.backplane.stop()
            raise ListenError.of(self.settings.host, self.settings.port, exc) from exc
        self.port = _bound_port(runner, self.settings.port)
        self.hub.start_heartbeat()
        if self.ssl_context is None and _exposed(self.settings, runner.addresses):
            log.warn("Serving without TLS on a non-loopback address", host=self.settings.host,
                     why="PUBLISH_TOKEN, connection tokens and ADMIN_TOKEN travel in clear: set "
                         "TLS_CERT and TLS_KEY, or put a TLS proxy in front")
        url = self.url
        log.info(
            "Server ready",
            url=url,
            health=f"{url}/health",
            ws=url.replace("http", "ws", 1) + "/ws",
            backplane=self.backplane.name,
            loop=loops.name_of(asyncio.get_running_loop()),
        )

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM, shut down; returns the exit status (0 clean, 1 forced)."""
        self.lifecycle.install_signals()
        await self.start()
        name = await self.lifecycle.wait()
        return 0 if await self.lifecycle.shutdown(name) else 1

    async def stop(self, reason: str = "stop") -> bool:
        """Run the shutdown handlers, as a signal would."""
        return await self.lifecycle.shutdown(reason)

    # ---- shutdown handlers

    def _stop_heartbeat(self) -> None:
        log.info("Stopping WebSocket heartbeat")
        self.hub.stop_heartbeat()

    async def _stop_http(self) -> None:
        self.hub.shutting_down = True  # new upgrades and publishes get 503
        # What was accepted before reaches the clients before they are closed: the
        # publishes still waiting for the backplane finish first (a few ms; 2 s at most).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while self.hub.fanout.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        # Held back from paused clients was accepted too, and a memory history dies with
        # this process: it goes out before the 1001 (or the client closes 1013 trying).
        await self.hub.fanout.recover_all()
        self.hub.flush()
        await self.hub.close_all(*codes.SHUTTING_DOWN)
        self.hub.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Site(web.BaseSite):
    """aiohttp's TCPSite and SockSite in one, with TLS and its handshake bounded.

    asyncio gives a TLS handshake 60 s, and aiohttp's keep-alive timer (our
    WS_HANDSHAKE_TIMEOUT) starts only once it is done: a silent TCP connection
    to the TLS port would be held six times as long as one to the plain port.
    The handshake gets WS_HANDSHAKE_TIMEOUT of its own (SPEC §10).
    """

    def __init__(self, runner: web.AppRunner, settings: Settings, sock: socket.socket | None,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.settings = settings
        self.sock = sock

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.settings.host}:{self.settings.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context,
                   "ssl_handshake_timeout": self.settings.handshake_timeout_ms / 1000}
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self._server = await loop.create_server(server, sock=self.sock,
                                                    backlog=self._backlog, **tls)
        else:
            self._server = await loop.create_server(
                server, self.settings.host, self.settings.port, backlog=self._backlog,
                reuse_port=self.settings.workers > 1, **tls)


def _exposed(settings: Settings, addresses: list[Any]) -> bool:
    """Whether HOST, or an address actually bound, is reachable from other machines."""
    if not settings.is_loopback:
        return True
    return any(isinstance(a, tuple) and not host_is_loopback(str(a[0])) for a in addresses)


def _secrets(settings: Settings) -> tuple[str, ...]:
    return url_secrets(settings.redis_url) if settings.redis_url else ()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return asked


async def serve(settings: Settings) -> int:
    """Run one server process until a signal; the exit status (2: could not start)."""
    from tether.workers import ready, watch_parent

    tether = Tether(settings)
    tether.lifecycle.install_signals()
    try:
        await tether.start()
    except BackplaneError as exc:
        # The backplane's errors are redacted already; a URL in any text is masked again.
        log.error("Cannot start the backplane", backplane=tether.backplane.name,
                  error=redact_text(str(exc), _secrets(settings)))
        return 2
    except ListenError as exc:
        log.error("Cannot listen", host=exc.host, port=exc.port, error=exc.reason)
        return 2
    orphan_guard = watch_parent(tether.lifecycle.request_stop)
    ready()  # tells a `--workers` parent that this process is listening
    name = await tether.lifecycle.wait()
    if orphan_guard is not None:
        orphan_guard.cancel()
    return 0 if await tether.lifecycle.shutdown(name) else 1


def run(settings: Settings) -> int:
    """`tether serve` in one process (or one worker), on the loop EVENT_LOOP chooses."""
    return loops.run(serve(settings), settings.event_loop)
