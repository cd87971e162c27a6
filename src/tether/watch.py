"""What `tether watch URL` does: print messages, RTT and every reconnect (SPEC §9).

It is also a tunnel probe: each line is timestamped, the RTT line says how long
the connection has been up, and a drop says how long it lasted and why — so a
proxy that cuts idle WebSockets after ~100 s shows up as a column of numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from ssl import SSLContext
from typing import Any, TextIO

import orjson

from tether.client import Client, State, StateChange, Token
from tether.clock import Clock, SystemClock, iso
from tether.tls import client_context


class Watcher:
    """Formats the client's events as timestamped lines and counts them."""

    def __init__(self, out: TextIO, clock: Clock, count: int | None) -> None:
        self.out = out
        self.clock = clock
        self.count = count
        self.messages = 0
        self.resyncs = 0
        self.attempts = 0  # connection attempts, the first included
        self.connections = 0  # attempts that connected
        self.failures = 0  # attempts that never opened (refused, timed out, TLS, HTTP error)
        self.drops = 0  # open connections that ended
        self.longest = 0.0
        self.connected_at: float | None = None
        self.unauthorized = False
        self.done = asyncio.Event()

    def line(self, text: str) -> None:
        self.out.write(f"{iso(self.clock.wall())} {text}\n")
        self.out.flush()  # a pipe or a file is block-buffered: show each line now

    def up_for(self) -> float:
        return 0.0 if self.connected_at is None else self.clock.now() - self.connected_at

    def on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "resync" and msg.keys() <= {"type", "topic", "seq"}:
            self.resyncs += 1
            self.line(f"resync topic={msg.get('topic')} seq={msg.get('seq')} "
                      "(the server cannot replay the gap: refetch state)")
            return
        self.messages += 1
        self.line(f"message {orjson.dumps(msg).decode()}")
        if self.count is not None and self.messages >= self.count:
            self.done.set()

    def on_control(self, msg: dict[str, Any]) -> None:
        """The server's own messages worth a line: refusals, lost topics, token changes."""
        kind = msg.get("type")
        if kind == "error":
            self.line(f"error: {msg.get('error')}")
        elif kind == "unsubscribed":
            self.line(f"unsubscribed {','.join(map(str, msg.get('topics') or []))}: "
                      f"{msg.get('reason', 'as asked')}")
        elif kind == "authenticated" and msg.get("sub") is not None:
            self.line(f"authenticated sub={msg.get('sub')} expires in {msg.get('expiresIn')} s")

    def on_rtt(self, rtt: float) -> None:
        self.line(f"rtt {rtt * 1000:.1f} ms, up {self.up_for():.1f} s")

    def on_state(self, change: StateChange) -> None:
        state = change.state
        if state is State.CONNECTING:
            self.attempts += 1
            self.line(f"connecting (attempt {self.attempts})")
        elif state is State.CONNECTED:
            self.connections += 1
            self.connected_at = self.clock.now()
            self.line(f"connected session={change.session_id}")
        elif state is State.RECONNECTING:
            if change.up_for is not None:
                self.drops += 1
                self.longest = max(self.longest, change.up_for)
                self.connected_at = None
                self.line(f"disconnected after {change.up_for:.1f} s: {change.reason}")
            else:
                self.failures += 1
                self.line(f"attempt {self.attempts} failed: {change.reason}")
            self.line(f"reconnecting in {change.delay or 0.0:.2f} s "
                      f"(attempt {self.attempts + 1})")
        elif state is State.UNAUTHORIZED:
            if self.connected_at is None:
                self.failures += 1  # refused before it was admitted
            else:
                self.drops += 1
                self.longest = max(self.longest, self.up_for())
                self.connected_at = None
            self.unauthorized = True
            self.line(f"unauthorized: {change.reason} (the token will not do: not reconnecting)")
            self.done.set()
        elif state is State.DISCONNECTED:
            self.done.set()

    def summary(self) -> str:
        """The last line: what happened, counted as it happened (no reconnect that never was)."""
        self.longest = max(self.longest, self.up_for())
        if not self.connections:
            return (f"stopped: {self.messages} messages, never connected: {self.attempts} "
                    f"attempts, {self.failures} failed")
        return (f"stopped: {self.messages} messages, {self.resyncs} resyncs, {self.attempts} "
                f"attempts, {self.connections} connected, {self.failures} failed, "
                f"{self.drops} disconnects, longest connection {self.longest:.1f} s")


async def watch(
    url: str,
    *,
    topics: list[str] | None = None,
    ping_interval: float = 5.0,
    ping_timeout: float = 10.0,
    backoff: float = 1.0,
    count: int | None = None,
    out: TextIO | None = None,
    clock: Clock | None = None,
    token: Token | None = None,
    ssl: SSLContext | None = None,
) -> int:
    """Watch until Ctrl+C, SIGTERM or `count` messages; 0 on a clean exit, 1 when unauthorized.

    `token`: a connection token, or a function giving a fresh one (see `Client`).
    `ssl`: the context of a wss:// server (see `tls.client_context`); None: the system's CAs.
    """
    clock = clock or SystemClock()
    w = Watcher(out or sys.stdout, clock, count)
    client = Client(
        url,
        topics=topics or (),
        on_message=w.on_message,
        on_state=w.on_state,
        on_rtt=w.on_rtt,
        on_control=w.on_control,
        iterate=False,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        ping_periodic=True,  # measure the RTT even while messages flow
        backoff_base=backoff,
        backoff_cap=max(30.0, backoff),
        clock=clock,
        token=token,
        ssl=ssl,
    )
    loop = asyncio.get_running_loop()
    stoppers = (signal.SIGINT, signal.SIGTERM)
    for sig in stoppers:
        loop.add_signal_handler(sig, w.done.set)
    w.line(f"watching {client.url}")
    try:
        await client.start()
        await w.done.wait()
    finally:
        for sig in stoppers:
            loop.remove_signal_handler(sig)
        await client.close()
        w.line(w.summary())
    return 1 if w.unauthorized else 0


def main(url: str, topics: str | None, ping_interval: float, ping_timeout: float,
         backoff: float, count: int | None, token: str | None = None,
         ca_file: str | None = None) -> int:
    """`tether watch`: the CLI passes its parsed arguments here."""
    names = [t.strip() for t in (topics or "").split(",") if t.strip()]
    try:
        ctx = client_context(ca_file) if ca_file else None
    except ValueError as exc:
        print(f"tether watch: --ca-file {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(watch(url, topics=names, ping_interval=ping_interval,
                                 ping_timeout=ping_timeout, backoff=backoff, count=count,
                                 token=token or None, ssl=ctx))
    except ValueError as exc:
        print(f"tether watch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        return 0
