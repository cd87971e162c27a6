"""One connection's conversation with the server, from handshake to close (SPEC §4, §7).

`Session.run` connects once. Without a token, the topics and the resume point
ride on the URL. With one, the first message is `{"type":"auth","token"}`, and
the resume and the topics are asked for once the server has said
`authenticated`; a token function is asked for a fresh token before the last
one expires. Then it reads until the connection ends: it answers the server's
pings, sends an app-level ping when the server has been quiet (`Liveness`), and
hands published messages and `resync` to the client, dropping duplicates
(`SeqTracker`). `Client` (driver.py) opens one Session per connection; the
reconnecting, the backoff and the callbacks' queue are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import WSMsgType

from tether.client.events import call
from tether.client.inbox import Inbox
from tether.client.logic import (
    JSON,
    Kind,
    Liveness,
    SeqTracker,
    Verdict,
    classify,
    overslept,
    refresh_delay,
)
from tether.client.urls import connect_url
from tether.logs import get_logger

if TYPE_CHECKING:
    from tether.client.driver import Client

log = get_logger("client")

# A connection token: the JWT itself, or a function (sync or async) that gives a
# fresh one; it is called before each connection and before the last one expires.
Token = str | Callable[[], str | Awaitable[str]]


class Tokens:
    """The token in use: the last one given, which `Client.publish` also bears."""

    def __init__(self, token: Token | None) -> None:
        self.value: str | None = token if isinstance(token, str) else None

    async def fresh(self, source: Token | None) -> str:
        """A token for the next `auth` message: the string, or the function's answer."""
        if source is None or isinstance(source, str):
            value = source or ""
        else:
            given = source()
            if inspect.isawaitable(given):
                given = await given
            if not isinstance(given, str) or not given:
                raise ValueError("the token function must give a non-empty string")
            value = given
        self.value = value
        return value


class Session:
    """One connection: connect, authenticate, resume, read, ping, refresh the token.

    It reads its settings, topics, resume point and callbacks from `client`,
    and sets the client's `session_id`, `connections`, `reconnects`, `rtt` and
    `sub`. It hands messages to `on_message` and to the iterator's `inbox`,
    calls `ready` once what was asked for flows and `lost` as the connection
    ends, and asks `closing` whether the application has closed the client.
    """

    def __init__(
        self,
        client: Client,
        http: aiohttp.ClientSession,
        tokens: Tokens,
        inbox: Inbox,
        *,
        ready: Callable[[], Awaitable[None]],
        lost: Callable[[], None],
        closing: Callable[[], bool],
    ) -> None:
        self.client = client
        self.http = http
        self.tokens = tokens
        self.inbox = inbox
        self.ready = ready
        self.lost = lost
        self.closing = closing
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.admitted = client.token is None  # may send (auth said `authenticated`)
        self.awaiting_subscribed = False  # its topics asked for after `authenticated`
        self.refresh_at: float | None = None  # clock.now() to fetch a fresh token at
        self.epoch: str | None = None  # the server's, from `connected`

    async def run(self) -> tuple[float | None, str, int | None]:
        """One connection, from handshake to close.

        (seconds it was up or None, why it ended, the server's close code or None).
        """
        client = self.client
        if client.token is None:
            url = connect_url(client.url, client.topics, client.tracker.since(),
                              client.tracker.epoch)
        else:
            try:
                await self.tokens.fresh(client.token)
            except Exception as exc:  # the application's token source failed: retry later
                log.warn("Cannot get a token", url=str(client.url), error=describe(exc))
                return None, f"cannot get a token: {describe(exc)}", None
            # Topics and resume point follow `authenticated`: the token is read first.
            url = connect_url(client.url, (), {})
        try:
            async with asyncio.timeout(client.connect_timeout):
                ws = await self.http.ws_connect(
                    url,
                    autoping=False,  # we see the server's pings (proof of life) and answer them
                    autoclose=True,
                    heartbeat=None,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None,
                                                    ws_close=client.close_timeout),
                    ssl=True if client.ssl is None else client.ssl,  # True: aiohttp's default
                )
        except TimeoutError:
            return None, f"connect timed out after {client.connect_timeout:g} s", None
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"connect failed: {describe(exc)}", None
        self.ws = ws
        opened = client.clock.now()
        code: int | None = None
        try:
            if self.closing():
                return 0.0, "closed", None
            if self.tokens.value is not None and client.token is not None:
                await self._send_now(ws, {"type": "auth", "token": self.tokens.value})
            reason, code = await self._read(ws)
        finally:
            self.ws = None
            self.lost()
            await self._close_ws(ws)
        return client.clock.now() - opened, reason, code

    async def deliver(self, msg: JSON) -> None:
        """Hand a message to the application: `on_message`, then the iterator's inbox."""
        await call(self.client.on_message, msg)
        if self.client.iterate:
            await self.inbox.put(msg)

    async def send(self, msg: JSON) -> None:
        """Send `msg` if this connection is open and admitted (else the next one asks)."""
        ws = self.ws
        if ws is None or ws.closed or not self.admitted:
            return  # sent with the next connection's URL, or once `authenticated` comes
        await self._send_now(ws, msg)

    async def hang_up(self) -> None:
        """Close this connection if it is open (`run` then returns)."""
        ws = self.ws
        if ws is not None:
            await self._close_ws(ws)

    async def _close_ws(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Close handshake, bounded: a dead peer never answers it."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.client.close_timeout):
                await ws.close()

    async def _refresh(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send a fresh token before the last one expires (its answer re-arms this)."""
        self.refresh_at = None
        try:
            await self.tokens.fresh(self.client.token)
        except Exception as exc:  # the server closes at exp (4001); reconnecting asks again
            log.warn("Cannot refresh the token", url=str(self.client.url), error=describe(exc))
            return
        await self._send_now(ws, {"type": "auth", "token": self.tokens.value})

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[str, int | None]:
        """Read one connection until it ends; why it ended, and the server's close code."""
        client = self.client
        clock = client.clock
        live = Liveness(client.ping_interval, client.ping_timeout, clock.wall(),
                        client.ping_periodic)
        while True:
            wait = max(live.next_check(clock.wall()), 0.001)
            if self.refresh_at is not None:
                wait = max(min(wait, self.refresh_at - clock.now()), 0.001)
            asked = clock.wall()
            try:
                msg = await ws.receive(timeout=wait)
            except TimeoutError:
                if self.refresh_at is not None and clock.now() >= self.refresh_at:
                    await self._refresh(ws)
                now = clock.wall()
                late = overslept(wait, now - asked, max(1.0, wait))
                verdict = live.check(now, late)
                if verdict is Verdict.PING and self.admitted:
                    await self._send_ping(ws, live, now)
                elif verdict is Verdict.DEAD:
                    log.warn("No answer to ping, reconnecting", url=str(client.url),
                             timeoutMs=round(client.ping_timeout * 1000))
                    return f"no answer to ping within {client.ping_timeout:g} s", None
                continue
            live.received(clock.wall())
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await self._on_text(msg.data, live)
            elif kind is WSMsgType.PING:
                await ws.pong(msg.data)  # RFC 6455 §5.5.3: echo the payload
            elif kind is WSMsgType.CLOSE:
                code = msg.data if isinstance(msg.data, int) else None
                return f"closed by server: {msg.data} {msg.extra or ''}".rstrip(), code
            elif kind is WSMsgType.ERROR:
                return f"connection error: {describe(msg.data)}", None
            elif kind in (WSMsgType.CLOSED, WSMsgType.CLOSING):
                return "connection lost", ws.close_code
            # PONG and BINARY: proof of life only

    async def _send_ping(
        self, ws: aiohttp.ClientWebSocketResponse, live: Liveness, now: float
    ) -> None:
        ping_id = live.ping_sent(now)
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await ws.send_str(orjson.dumps({"type": "ping", "id": ping_id}).decode())

    async def _on_text(self, text: str, live: Liveness) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            log.warn("Server sent invalid JSON", data=text[:200])
            return
        if not isinstance(msg, dict):
            return
        client = self.client
        kind = classify(msg)
        if kind is Kind.DATA:
            tracker = client.tracker
            if tracker.accept(msg["topic"], msg["seq"]):
                await self.deliver(msg)
            else:
                asks = tracker.take_asks()
                if asks:  # a hole: the topic again, from what we hold
                    log.warn("A hole in a topic's seqs, resuming it", topics=asks)
                    await self.send(resume_message(tracker, asks))
        elif kind is Kind.RESYNC:
            seq = msg.get("seq")
            client.tracker.resync(msg["topic"], seq if isinstance(seq, int) else None)
            await self.deliver(msg)
        elif kind is Kind.PONG:
            rtt = live.pong(msg.get("id"), client.clock.wall())
            if rtt is not None:
                client.rtt = rtt
                await call(client.on_rtt, rtt)
        elif kind is Kind.CONNECTED:
            client.session_id = str(msg.get("sessionId"))
            take_positions(client.tracker, msg.get("seqs"))
            epoch = msg.get("epoch")
            self.epoch = epoch if isinstance(epoch, str) else None
            if client.token is None:  # our positions went with the URL: now of this epoch
                client.tracker.epoch = self.epoch
            client.connections += 1
            if client.connections > 1:
                client.reconnects += 1
            if client.token is None:
                await self.ready()
        elif msg.get("type") == "authenticated" and client.token is not None:
            await self._authenticated(msg)
            await call(client.on_control, msg)
        elif msg.get("type") == "subscribed":
            take_positions(client.tracker, msg.get("seqs"))
            await call(client.on_control, msg)
            if self.awaiting_subscribed:
                self.awaiting_subscribed = False
                await self.ready()
        else:
            if msg.get("type") == "error":
                log.warn("Server reported an error", error=msg.get("error"),
                         topic=msg.get("topic"))
            await call(client.on_control, msg)

    async def _authenticated(self, msg: JSON) -> None:
        """The server took our token: arm the refresh; the first time, ask for our topics."""
        client = self.client
        expires_in = msg.get("expiresIn")
        if callable(client.token) and isinstance(expires_in, (int, float)):
            delay = refresh_delay(float(expires_in), client.refresh_margin)
            self.refresh_at = client.clock.now() + delay
        sub = msg.get("sub")
        client.sub = sub if isinstance(sub, str) else None
        if self.admitted:
            return  # a refresh
        self.admitted = True
        since = client.tracker.since()
        if not since and not client.topics:
            await self.ready()
            return
        if since:
            await self.send(resume_message(client.tracker, since))
            client.tracker.epoch = self.epoch
        # The server answers in order: its `subscribed` says the resume is done too,
        # so `connected` means what was asked for flows (as with `?topics=`).
        self.awaiting_subscribed = True
        await self.send({"type": "subscribe", "topics": sorted(client.topics)})

    @staticmethod
    async def _send_now(ws: aiohttp.ClientWebSocketResponse, msg: JSON) -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await ws.send_str(orjson.dumps(msg).decode())


def take_positions(tracker: SeqTracker, seqs: object) -> None:
    """Where each topic stands (`connected`, `subscribed`): a topic never received starts there."""
    for topic, seq in (seqs.items() if isinstance(seqs, dict) else ()):
        if isinstance(topic, str) and isinstance(seq, int):
            tracker.position(topic, seq)


def resume_message(tracker: SeqTracker, since: dict[str, int]) -> JSON:
    """A `resume` of `since`, naming the epoch those positions belong to."""
    msg: JSON = {"type": "resume", "since": since}
    if tracker.epoch:
        msg["epoch"] = tracker.epoch
    return msg


def describe(exc: object) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
