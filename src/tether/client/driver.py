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

`Client` here is the lifecycle: start and close, the public methods, the
reconnect loop with its backoff, the connection state and `on_state`. Each
connection is a `Session` (session.py: handshake, auth, resume, reading,
liveness pings); the iterator reads an `Inbox` (inbox.py); `publish` is
publishing.py's. The decisions are pure (`logic.py`: backoff, sleep detection,
seq tracking, liveness, message kinds) and tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
import ssl as _ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

import aiohttp

from tether import codes
from tether.client.events import (
    MessageCallback,
    RttCallback,
    State,
    StateCallback,
    StateChange,
    call,
)
from tether.client.inbox import Inbox
from tether.client.logic import JSON, Backoff, SeqTracker, overslept
from tether.client.publishing import publish
from tether.client.session import Session, Token, Tokens
from tether.client.urls import http_url, split_url
from tether.clock import Clock, SystemClock
from tether.logs import get_logger
from tether.tools import ATTEMPTS

log = get_logger("client")

# The server's "your token" closes (codes.py): forbidden never does again, expired
# does only with a way to fetch a fresh token.
FORBIDDEN, TOKEN_EXPIRED = codes.FORBIDDEN[0], codes.TOKEN_EXPIRED[0]

__all__ = ["Client", "State", "StateChange", "Token"]


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

    `ssl`: the TLS context of `wss://` connections and of `publish` over https
    (by default aiohttp's: the system's CAs, the host name checked).
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
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.url, named_topics, named_since = split_url(url)  # `?topics=` and `?since=`
        self.topics: set[str] = {*topics, *named_topics}
        self.tracker = SeqTracker({**named_since, **(since or {})})
        self.token = token
        self.publish_token = publish_token
        self.refresh_margin = refresh_margin
        self.on_message = on_message
        self.on_state = on_state
        self.on_rtt = on_rtt
        self.on_control = on_control
        self.iterate = on_message is None if iterate is None else iterate
        self._inbox = Inbox(queue_size)  # what the iterator reads
        self.queue_size = self._inbox.size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.ping_periodic = ping_periodic
        self.backoff = Backoff(backoff_base, backoff_cap, rand=rand or _random.random)
        self.stable_after = stable_after
        self.sleep_slack = sleep_slack
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.clock: Clock = clock or SystemClock()
        self.ssl = ssl

        self.state = State.DISCONNECTED
        self.session_id: str | None = None
        self.rtt: float | None = None  # seconds, from the last app-level ping
        self.connections = 0  # connections opened
        self.reconnects = 0  # connections opened after the first
        self.sub: str | None = None  # the token's user, as the server read it
        self._session: aiohttp.ClientSession | None = None
        self._tokens = Tokens(token)  # the token in use
        self._live: Session | None = None  # the connection under way
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._skip_delay = False
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()

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
        self._inbox.close()  # a delivery waiting for room in the iterator's buffer
        if self._live is not None:
            await self._live.hang_up()
        if self._task is not None:
            # A handshake under way (or a slow callback) ends within close_timeout.
            await _finish(self._task, self.close_timeout)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:  # once connected, its topics subscribed
        await self.start()
        await self.wait_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[JSON]:
        if not self.iterate:
            raise RuntimeError("this client delivers to on_message only (iterate=False)")
        return self

    async def __anext__(self) -> JSON:
        return await self._inbox.get()

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
        if new and self._live is not None:
            await self._live.send({"type": "subscribe", "topics": new})

    async def unsubscribe(self, topics: Iterable[str]) -> None:
        """Drop topics and their resume position."""
        gone = [t for t in topics if t in self.topics]
        for topic in gone:
            self.topics.discard(topic)
            self.tracker.forget(topic)
        if gone and self._live is not None:
            await self._live.send({"type": "unsubscribe", "topics": gone})

    async def reconnect(self) -> None:
        """Drop the connection and connect again at once (resuming)."""
        self._skip_delay = True
        self._wake.set()
        if self._live is not None:
            await self._live.hang_up()

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
        return await publish(http_url(self.url), event, self.publish_token or self._tokens.value,
                             topic=topic, priority=priority, key=key, attempts=attempts,
                             ssl=self.ssl)

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
            self._inbox.fail(exc)
        finally:
            self._connected.clear()
            self.state = final
            with contextlib.suppress(Exception):
                await call(self.on_state, StateChange(final, session_id=self.session_id,
                                                      reason=why))
            self._inbox.end()

    async def _pause(self, delay: float) -> None:
        """Sleep `delay`, or less when `close` or `reconnect` wakes us."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()
        self._skip_delay = False

    async def _connect_once(self) -> tuple[float | None, str, int | None]:
        """One connection, from handshake to close (a `Session`): how it ended."""
        await self._set_state(StateChange(State.CONNECTING, self.backoff.attempt))
        assert self._session is not None
        self._live = Session(self, self._session, self._tokens, self._inbox, ready=self._ready,
                             lost=self._connected.clear, closing=lambda: self._closing)
        try:
            return await self._live.run()
        finally:
            self._live = None

    async def _ready(self) -> None:
        self._connected.set()
        await self._set_state(StateChange(State.CONNECTED, self.backoff.attempt,
                                          session_id=self.session_id))

    async def _set_state(self, change: StateChange) -> None:
        if self._closing and change.state is not State.DISCONNECTED:
            return
        self.state = change.state
        await call(self.on_state, change)


async def _finish(task: asyncio.Task[None], timeout: float) -> None:
    """Wait up to `timeout` seconds for `task` to end; then cancel it."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
