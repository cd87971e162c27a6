"""The Python client: stays connected, resumes by seq, surfaces resync (SPEC §4, §7, §9).

```python
async with Client("ws://localhost:4011/ws", topics=["orders"]) as client:
    async for msg in client:  # published messages, and {"type": "resync", ...}
        print(msg["topic"], msg["seq"], msg)
```

With `token=` (a string, or a function giving a fresh one), the client sends
`{"type":"auth","token"}` first on every connection, subscribes and resumes
once the server has said `authenticated`, and, with a function, fetches a new
token before the last one expires.

The decisions are pure (`logic.py`: backoff, sleep detection, seq tracking,
liveness, message kinds) and tested without sleeping; `Client` here is the
thin aiohttp driver around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import random as _random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from tether.client.logic import (
    FORBIDDEN,
    JSON,
    TOKEN_EXPIRED,
    Backoff,
    Kind,
    Liveness,
    SeqTracker,
    Verdict,
    classify,
    overslept,
    refresh_delay,
)
from tether.client.urls import connect_url, http_url, ws_url
from tether.clock import Clock, SystemClock
from tether.errors import PublishError, Refusal
from tether.logs import get_logger
from tether.tools import ATTEMPTS, Retry, publish_retrying

log = get_logger("client")

# What the server's HTTP status says about a refused publish.
REFUSALS = {400: Refusal.INVALID, 413: Refusal.TOO_LARGE, 422: Refusal.KEY_REUSED}

class State(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"  # closed by the application: final
    UNAUTHORIZED = "unauthorized"  # the server refused the token (4003): final


# A connection token: the JWT itself, or a function (sync or async) that gives a
# fresh one; it is called before each connection and before the last one expires.
Token = str | Callable[[], str | Awaitable[str]]


@dataclass(frozen=True, slots=True)
class StateChange:
    """A connection state event, given to `on_state`.

    On `reconnecting`, `reason` says why the last connection or attempt ended
    and `up_for` how long that connection had stayed up (None when it never
    opened); `delay` is the wait before attempt number `attempt`.
    """

    state: State
    attempt: int = 0
    delay: float | None = None
    reason: str | None = None
    up_for: float | None = None
    session_id: str | None = None


MessageCallback = Callable[[JSON], Awaitable[None] | None]
StateCallback = Callable[[StateChange], Awaitable[None] | None]
RttCallback = Callable[[float], Awaitable[None] | None]

_END = object()


class Client:
    """A tether connection that reconnects, resumes and checks its own liveness.

    Published messages (and `{"type":"resync","topic","seq"}` when part of a
    topic is gone: refetch that state) go to `on_message` and, when
    `iterate` (the default without `on_message`), to `async for msg in client`.
    The iterator's buffer holds `queue_size` messages; beyond that the client
    stops reading, the server eventually drops it as slow, and resume catches up.

    All durations are seconds: `ping_interval` idle time before an app-level
    ping, `ping_timeout` for its answer, `backoff_base`/`backoff_cap` for
    reconnect delays, `stable_after` the time a connection must last for the
    backoff to start over, `sleep_slack` how much longer than scheduled a wait
    must take to count as a sleep (which also resets the backoff).

    `token` (see `Token`) authenticates each connection with its first message;
    it is also the bearer of `publish` unless `publish_token` is given. A
    server that refuses it (close 4003, or 4001 when no function can give a
    fresh one) ends the client in state `unauthorized`. `refresh_margin`: how
    long before expiry a fresh token is fetched (at most; see `refresh_delay`).
    """

    def __init__(
        self,
        url: str,
        *,
        topics: Iterable[str] = (),
        since: Mapping[str, int] | None = None,
        token: Token | None = None,
        publish_token: str | None = None,
        refresh_margin: float = 30.0,
        on_message: MessageCallback | None = None,
        on_state: StateCallback | None = None,
        on_rtt: RttCallback | None = None,
        on_control: MessageCallback | None = None,
        iterate: bool | None = None,
        queue_size: int = 1000,
        ping_interval: float = 20.0,
        ping_timeout: float = 10.0,
        ping_periodic: bool = False,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        stable_after: float = 5.0,
        sleep_slack: float = 10.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        rand: Callable[[], float] | None = None,
        clock: Clock | None = None,
    ) -> None:
        base = ws_url(url)
        self.url = base.with_query({k: v for k, v in base.query.items()
                                    if k not in ("topics", "since")})
        self.topics: set[str] = set(topics)
        self.topics.update(t for t in base.query.get("topics", "").split(",") if t)
        initial = dict(_parse_since(base.query.get("since", "")))
        initial.update(since or {})
        self.tracker = SeqTracker(initial)
        self.token = token
        self.publish_token = publish_token
        self.refresh_margin = refresh_margin
        self._token_value: str | None = token if isinstance(token, str) else None
        self._admitted = False  # this connection may send (auth said `authenticated`)
        self._awaiting_subscribed = False  # its topics asked for after `authenticated`
        self._refresh_at: float | None = None  # clock.now() to fetch a fresh token at
        self.on_message = on_message
        self.on_state = on_state
        self.on_rtt = on_rtt
        self.on_control = on_control
        self.iterate = on_message is None if iterate is None else iterate
        self.queue_size = max(1, queue_size)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.ping_periodic = ping_periodic
        self.backoff = Backoff(backoff_base, backoff_cap, rand=rand or _random.random)
        self.stable_after = stable_after
        self.sleep_slack = sleep_slack
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.clock: Clock = clock or SystemClock()

        self.state = State.DISCONNECTED
        self.session_id: str | None = None
        self.rtt: float | None = None  # seconds, from the last app-level ping
        self.connections = 0  # connections opened
        self.reconnects = 0  # connections opened after the first
        self.sub: str | None = None  # the token's user, as the server read it
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._skip_delay = False
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._drained = asyncio.Event()
        self._drained.set()

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Connect in the background (and keep reconnecting until `close`)."""
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="tether-client")

    async def close(self) -> None:
        """Disconnect for good; the iterator ends after the messages it holds."""
        self._closing = True
        self._wake.set()
        self._drained.set()  # a reader waiting for room in the iterator's buffer
        ws = self._ws
        if ws is not None:
            await self._close_ws(ws)
        task = self._task
        if task is not None:
            # A handshake under way (or a slow callback) ends within close_timeout.
            done, _ = await asyncio.wait({task}, timeout=self.close_timeout)
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[JSON]:
        if not self.iterate:
            raise RuntimeError("this client delivers to on_message only (iterate=False)")
        return self

    async def __anext__(self) -> JSON:
        item = await self._queue.get()
        if self._queue.qsize() < self.queue_size:
            self._drained.set()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, dict)
        return item

    async def wait_connected(self, timeout: float | None = None) -> str:
        """Wait until connected; the session id."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()
        assert self.session_id is not None
        return self.session_id

    async def subscribe(self, topics: Iterable[str]) -> None:
        """Add topics (now, and on every reconnect)."""
        new = [t for t in topics if t not in self.topics]
        self.topics.update(new)
        if new:
            await self._send({"type": "subscribe", "topics": new})

    async def unsubscribe(self, topics: Iterable[str]) -> None:
        """Drop topics and their resume position."""
        gone = [t for t in topics if t in self.topics]
        for topic in gone:
            self.topics.discard(topic)
            self.tracker.forget(topic)
        if gone:
            await self._send({"type": "unsubscribe", "topics": gone})

    async def reconnect(self) -> None:
        """Drop the connection and connect again at once (resuming)."""
        self._skip_delay = True
        self._wake.set()
        ws = self._ws
        if ws is not None:
            await self._close_ws(ws)

    async def publish(
        self, event: JSON, *, topic: str | None = None, priority: str | None = None,
        key: str | None = None, attempts: int = ATTEMPTS,
    ) -> JSON:
        """`POST /event` to this server; the reply (`seq`...), or PublishError.

        The publish carries an idempotency key (`key`, or a new UUID) and is
        retried with it, up to `attempts` times with jittered backoff, while
        its outcome is unknown (503, a failed connection): it is delivered
        once. A reply with `"duplicate": true` is the answer to an earlier
        attempt. To retry later yourself without a duplicate, pass your own key.
        """
        body = dict(event)
        if topic is not None:
            body["topic"] = topic
        if priority is not None:
            body["priority"] = priority
        bearer = self.publish_token or self._token_value
        status, reply, _ = await publish_retrying(
            http_url(self.url), body, bearer, key=key, attempts=attempts,
            on_retry=_log_retry)
        if status != 202:
            raise PublishError(REFUSALS.get(status, Refusal.REFUSED),
                               str(reply.get("error", reply)), status)
        return reply

    @property
    def last_seq(self) -> dict[str, int]:
        return self.tracker.since()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        final, why = State.DISCONNECTED, None
        try:
            while not self._closing:
                up_for, reason, code = await self._connect_once()
                if self._closing:
                    break
                if code == FORBIDDEN or (code == TOKEN_EXPIRED and not callable(self.token)):
                    # The same token cannot do better: retrying would be refused again.
                    log.warn("Token refused, not reconnecting", url=str(self.url), code=code,
                             reason=reason)
                    final, why = State.UNAUTHORIZED, reason
                    break
                if up_for is not None and up_for >= self.stable_after:
                    self.backoff.reset()
                if self._skip_delay:
                    self._skip_delay = False
                    continue
                delay = self.backoff.next_delay()
                started = self.clock.wall()
                await self._set_state(StateChange(
                    State.RECONNECTING, self.backoff.attempt, delay, reason, up_for,
                    self.session_id,
                ))
                await self._pause(delay)
                if overslept(delay, self.clock.wall() - started, self.sleep_slack):
                    self.backoff.reset()
        except Exception as exc:
            log.exception("Client stopped by an error", url=str(self.url))
            self._queue.put_nowait(exc)
        finally:
            self._connected.clear()
            self.state = final
            with contextlib.suppress(Exception):
                await self._emit_state(StateChange(final, session_id=self.session_id,
                                                   reason=why))
            self._queue.put_nowait(_END)

    async def _pause(self, delay: float) -> None:
        """Sleep `delay`, or less when `close` or `reconnect` wakes us."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()
        self._skip_delay = False

    async def _connect_once(self) -> tuple[float | None, str, int | None]:
        """One connection, from handshake to close.

        (seconds it was up or None, why it ended, the server's close code or None).
        """
        await self._set_state(StateChange(State.CONNECTING, self.backoff.attempt))
        assert self._session is not None
        self._admitted = self.token is None
        self._awaiting_subscribed = False
        self._refresh_at = None
        if self.token is None:
            url = connect_url(self.url, self.topics, self.tracker.since())
        else:
            try:
                self._token_value = await self._fresh_token()
            except Exception as exc:  # the application's token source failed: retry later
                log.warn("Cannot get a token", url=str(self.url), error=_describe(exc))
                return None, f"cannot get a token: {_describe(exc)}", None
            # Topics and resume point follow `authenticated`: the token is read first.
            url = connect_url(self.url, (), {})
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self._session.ws_connect(
                    url,
                    autoping=False,  # we see the server's pings (proof of life) and answer them
                    autoclose=True,
                    heartbeat=None,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.close_timeout),
                )
        except TimeoutError:
            return None, f"connect timed out after {self.connect_timeout:g} s", None
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"connect failed: {_describe(exc)}", None
        self._ws = ws
        opened = self.clock.now()
        code: int | None = None
        try:
            if self._closing:
                return 0.0, "closed", None
            if self._token_value is not None and self.token is not None:
                await self._send_now(ws, {"type": "auth", "token": self._token_value})
            reason, code = await self._read(ws)
        finally:
            self._ws = None
            self._connected.clear()
            await self._close_ws(ws)
        return self.clock.now() - opened, reason, code

    async def _fresh_token(self) -> str:
        token = self.token
        if token is None or isinstance(token, str):
            return token or ""
        value = token()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str) or not value:
            raise ValueError("the token function must give a non-empty string")
        return value

    async def _refresh(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send a fresh token before the last one expires (its answer re-arms this)."""
        self._refresh_at = None
        try:
            self._token_value = await self._fresh_token()
        except Exception as exc:  # the server closes at exp (4001); reconnecting asks again
            log.warn("Cannot refresh the token", url=str(self.url), error=_describe(exc))
            return
        await self._send_now(ws, {"type": "auth", "token": self._token_value})

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[str, int | None]:
        """Read one connection until it ends; why it ended, and the server's close code."""
        clock = self.clock
        live = Liveness(self.ping_interval, self.ping_timeout, clock.wall(), self.ping_periodic)
        while True:
            wait = max(live.next_check(clock.wall()), 0.001)
            if self._refresh_at is not None:
                wait = max(min(wait, self._refresh_at - clock.now()), 0.001)
            asked = clock.wall()
            try:
                msg = await ws.receive(timeout=wait)
            except TimeoutError:
                if self._refresh_at is not None and clock.now() >= self._refresh_at:
                    await self._refresh(ws)
                now = clock.wall()
                late = overslept(wait, now - asked, max(1.0, wait))
                verdict = live.check(now, late)
                if verdict is Verdict.PING and self._admitted:
                    await self._send_ping(ws, live, now)
                elif verdict is Verdict.DEAD:
                    log.warn("No answer to ping, reconnecting", url=str(self.url),
                             timeoutMs=round(self.ping_timeout * 1000))
                    return f"no answer to ping within {self.ping_timeout:g} s", None
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
                return f"connection error: {_describe(msg.data)}", None
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
        kind = classify(msg)
        if kind is Kind.DATA:
            if self.tracker.accept(msg["topic"], msg["seq"]):
                await self._deliver(msg)
        elif kind is Kind.RESYNC:
            seq = msg.get("seq")
            self.tracker.resync(msg["topic"], seq if isinstance(seq, int) else None)
            await self._deliver(msg)
        elif kind is Kind.PONG:
            rtt = live.pong(msg.get("id"), self.clock.wall())
            if rtt is not None:
                self.rtt = rtt
                await _call(self.on_rtt, rtt)
        elif kind is Kind.CONNECTED:
            self.session_id = str(msg.get("sessionId"))
            self.connections += 1
            if self.connections > 1:
                self.reconnects += 1
            if self.token is None:
                await self._ready()
        elif msg.get("type") == "authenticated" and self.token is not None:
            await self._authenticated(msg)
            await _call(self.on_control, msg)
        elif msg.get("type") == "subscribed" and self._awaiting_subscribed:
            self._awaiting_subscribed = False
            await _call(self.on_control, msg)
            await self._ready()
        else:
            if msg.get("type") == "error":
                log.warn("Server reported an error", error=msg.get("error"),
                         topic=msg.get("topic"))
            await _call(self.on_control, msg)

    async def _authenticated(self, msg: JSON) -> None:
        """The server took our token: arm the refresh; the first time, ask for our topics."""
        expires_in = msg.get("expiresIn")
        if callable(self.token) and isinstance(expires_in, (int, float)):
            delay = refresh_delay(float(expires_in), self.refresh_margin)
            self._refresh_at = self.clock.now() + delay
        sub = msg.get("sub")
        self.sub = sub if isinstance(sub, str) else None
        if self._admitted:
            return  # a refresh
        self._admitted = True
        since = self.tracker.since()
        if not since and not self.topics:
            await self._ready()
            return
        if since:
            await self._send({"type": "resume", "since": since})
        # The server answers in order: its `subscribed` says the resume is done too,
        # so `connected` means what was asked for flows (as with `?topics=`).
        self._awaiting_subscribed = True
        await self._send({"type": "subscribe", "topics": sorted(self.topics)})

    async def _ready(self) -> None:
        self._connected.set()
        await self._set_state(StateChange(State.CONNECTED, self.backoff.attempt,
                                          session_id=self.session_id))

    async def _deliver(self, msg: JSON) -> None:
        await _call(self.on_message, msg)
        if self.iterate:
            while self._queue.qsize() >= self.queue_size and not self._closing:
                self._drained.clear()
                await self._drained.wait()
            self._queue.put_nowait(msg)

    async def _send(self, msg: JSON) -> None:
        ws = self._ws
        if ws is None or ws.closed or not self._admitted:
            return  # sent with the next connection's URL, or once `authenticated` comes
        await self._send_now(ws, msg)

    @staticmethod
    async def _send_now(ws: aiohttp.ClientWebSocketResponse, msg: JSON) -> None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await ws.send_str(orjson.dumps(msg).decode())

    async def _close_ws(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Close handshake, bounded: a dead peer never answers it."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.close_timeout):
                await ws.close()

    async def _set_state(self, change: StateChange) -> None:
        if self._closing and change.state is not State.DISCONNECTED:
            return
        self.state = change.state
        await self._emit_state(change)

    async def _emit_state(self, change: StateChange) -> None:
        await _call(self.on_state, change)


def _log_retry(retry: Retry) -> None:
    log.warn("Publish failed, retrying with the same key", attempt=retry.attempt,
             attempts=retry.attempts, retryInMs=round(retry.delay * 1000), reason=retry.reason,
             key=retry.key)


async def _call(callback: Callable[[Any], Awaitable[None] | None] | None, arg: Any) -> None:
    """Run an application callback (sync or async); its errors are logged, not raised."""
    if callback is None:
        return
    try:
        result = callback(arg)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("Callback failed", callback=getattr(callback, "__name__", repr(callback)))


def _parse_since(raw: str) -> Iterable[tuple[str, int]]:
    for part in filter(None, (p.strip() for p in raw.split(","))):
        topic, _, seq = part.rpartition(":")
        if topic and seq.isdigit():
            yield topic, int(seq)


def _describe(exc: object) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
