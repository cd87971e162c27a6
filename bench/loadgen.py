"""The load generator: many idle WebSocket clients in one process (picows on uvloop).

Pings are answered by picows itself (auto-pong, in C), so an idle client costs
this process almost nothing. Text frames are only counted, never parsed.
Commands (JSON lines on stdin):

- `connect` n, concurrency → `connected` ok, failed, secs
- `expect` total, idle, timeout → `armed` at once, then `received` count, first, last
  (monotonic seconds, comparable across processes on Linux)
- `count` → `open` n
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.proc import emit, raise_nofile


class State:
    def __init__(self) -> None:
        self.open = 0
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.target = 0
        self.done: asyncio.Event | None = None


STATE = State()
TEXT = WSMsgType.TEXT


class Client(WSListener):
    __slots__ = ()

    def on_ws_connected(self, transport: WSTransport) -> None:
        STATE.open += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is TEXT:
            # Kept lean: this runs once per delivery, and the generator must not be
            # the bottleneck. The clock is read only every 256 frames and at the end.
            s = STATE
            n = s.count = s.count + 1
            if n & 255 == 1:
                s.last = time.monotonic()
                if n == 1:
                    s.first = s.last
            if n == s.target:
                s.last = time.monotonic()
                if s.done is not None:
                    s.done.set()
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        STATE.open -= 1


async def connect(url: str, n: int, concurrency: int, keep: list[WSTransport],
                  source: str | None = None) -> None:
    t0 = time.monotonic()
    # One source address gives ~28,000 ephemeral ports (ip_local_port_range); load
    # generators bound to distinct loopback addresses (127.0.0.2, ...) go past it together.
    extra: dict[str, Any] = {"local_addr": (source, 0)} if source else {}
    sem = asyncio.Semaphore(concurrency)
    failed = 0
    errors: list[str] = []

    async def one() -> None:
        nonlocal failed
        async with sem:
            for attempt in range(3):
                try:
                    transport, _ = await ws_connect(Client, url, websocket_handshake_timeout=30,
                                                    **extra)
                    keep.append(transport)
                    return
                except Exception as exc:  # counted and reported, never fatal
                    if attempt == 2:
                        failed += 1
                        if len(errors) < 3:
                            errors.append(repr(exc))
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(one() for _ in range(n)))
    emit("connected", ok=n - failed, failed=failed, secs=time.monotonic() - t0, errors=errors)


async def expect(total: int, idle: float, timeout: float) -> None:
    s = STATE
    s.count, s.first, s.last, s.target = 0, 0.0, 0.0, total
    s.done = asyncio.Event()
    emit("armed")
    deadline = time.monotonic() + timeout
    while not s.done.is_set():
        seen = s.count
        try:
            await asyncio.wait_for(s.done.wait(), min(idle, max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            if (s.count == seen and seen > 0) or time.monotonic() >= deadline:
                break  # nothing more is coming
    emit("received", count=s.count, first=s.first, last=s.last, target=total)
    s.target = 0


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--source", help="local address to connect from (e.g. 127.0.0.2)")
    args = p.parse_args()
    raise_nofile()
    keep: list[WSTransport] = []
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("ready")
    while True:
        raw = await reader.readline()
        if not raw:
            break
        cmd = json.loads(raw)
        name = cmd["cmd"]
        if name == "connect":
            task = asyncio.ensure_future(
                connect(args.url, int(cmd["n"]), int(cmd.get("concurrency", 100)), keep,
                        args.source))
        elif name == "expect":
            task = asyncio.ensure_future(
                expect(int(cmd["total"]), float(cmd.get("idle", 2.0)),
                       float(cmd.get("timeout", 120))))
        elif name == "count":
            emit("open", n=STATE.open)
            continue
        else:
            continue
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for transport in keep:
        transport.disconnect(graceful=False)


if __name__ == "__main__":
    uvloop.run(main())
