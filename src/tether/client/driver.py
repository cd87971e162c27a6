"""The Python client: stays connected, resumes by seq, surfaces resync (SPEC §4, §7, §9).

```python
async with Client("ws://localhost:4011/ws", topics=["orders"]) as client:
    async for msg in client:  # published messages, and {"type": "resync", ...}
        print(msg["topic"], msg["seq"], msg)
```

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
    JSON,
    Backoff,
    Kind,
    Liveness,
    SeqTracker,
    Verdict,
    classify,
    overslept,
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
    """

    def __init__(
        self,
        url: str,
        *,
        topics: Iterable[str] = (),
        since: Mapping[str, int] | None = None,
        token: str | None = None,
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
        status, reply, _ = await publish_retrying(
            http_url(self.url), body, self.token, key=key, attempts=attempts,
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
        try:
            while not self._closing:
                up_for, reason = await self._connect_once()
                if self._closing:
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
            self.state = State.DISCONNECTED
            with contextlib.suppress(Exception):
                await self._emit_state(StateChange(State.DISCONNECTED, session_id=self.session_id))
            self._queue.put_nowait(_END)

    async def _pause(self, delay: float) -> None:
        """Sleep `delay`, or less when `close` or `reconnect` wakes us."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()
        self._skip_delay = False

    async def _connect_once(self) -> tuple[float | None, str]:
        """One connection, from handshake to close: (seconds it was up or None, why it ended)."""
        await self._set_state(StateChange(State.CONNECTING, self.backoff.attempt))
        assert self._session is not None
        url = connect_url(self.url, self.topics, self.tracker.since())
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
            return None, f"connect timed out after {self.connect_timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"connect failed: {_describe(exc)}"
        self._ws = ws
        opened = self.clock.now()
        try:
            if self._closing:
                return 0.0, "closed"
            reason = await self._read(ws)
        finally:
            self._ws = None
            self._connected.clear()
            await self._close_ws(ws)
        return self.clock.now() - opened, reason

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Read one connection until it ends; why it ended."""
        clock = self.clock
        live = Liveness(self.ping_interval, self.ping_timeout, clock.wall(), self.ping_periodic)
        while True:
            wait = max(live.next_check(clock.wall()), 0.001)
            asked = clock.wall()
            try:
                msg = await ws.receive(timeout=wait)
            except TimeoutError:
                now = clock.wall()
                late = overslept(wait, now - asked, max(1.0, wait))
                verdict = live.check(now, late)
                if verdict is Verdict.PING:
                    await self._send_ping(ws, live, now)
                elif verdict is Verdict.DEAD:
                    log.warn("No answer to ping, reconnecting", url=str(self.url),
                             timeoutMs=round(self.ping_timeout * 1000))
                    return f"no answer to ping within {self.ping_timeout:g} s"
                continue
            live.received(clock.wall())
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await self._on_text(msg.data, live)
            elif kind is WSMsgType.PING:
                await ws.pong(msg.data)  # RFC 6455 §5.5.3: echo the payload
            elif kind is WSMsgType.CLOSE:
                return f"closed by server: {msg.data} {msg.extra or ''}".rstrip()
            elif kind is WSMsgType.ERROR:
                return f"connection error: {_describe(msg.data)}"
            elif kind in (WSMsgType.CLOSED, WSMsgType.CLOSING):
                return "connection lost"
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
            self._connected.set()
            await self._set_state(StateChange(State.CONNECTED, self.backoff.attempt,
                                              session_id=self.session_id))
        else:
            if msg.get("type") == "error":
                log.warn("Server reported an error", error=msg.get("error"))
            await _call(self.on_control, msg)

    async def _deliver(self, msg: JSON) -> None:
        await _call(self.on_message, msg)
        if self.iterate:
            while self._queue.qsize() >= self.queue_size and not self._closing:
                self._drained.clear()
                await self._drained.wait()
            self._queue.put_nowait(msg)

    async def _send(self, msg: JSON) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return  # sent with the next connection's URL
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
