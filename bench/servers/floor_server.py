"""The pure-Python floor: what B and the 19k broadcast cost with nothing but the essentials.

Not a product and not a competitor: a yardstick for "what would close the rest".
aiohttp does the upgrade on one port (as in tether), then the socket is handed to a
bare asyncio protocol (`transport.set_protocol`) that only recognises a 14-byte pong;
one timer pings the clients due, from a heap of (due, key) — no registry, history,
RTT, stale checks, logging or backpressure. It runs on uvloop.

`FLOOR_WRITE_THREADS=N` makes a broadcast write the frame with `os.write` on the raw
sockets from N threads (the GIL is released in the system call), to measure whether
spreading the kernel's per-send work over both cores helps; that bypasses the
transport and is only sound for idle sockets with empty buffers, as here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import os
import struct

from aiohttp import web

from bench.proc import emit
from bench.servers.common import command_loop, message, parse_args, run

PING_HEAD = bytes((0x89, 8))
PHI = 0.6180339887498949


class Bare(asyncio.Protocol):
    """Everything after the upgrade: a pong (or anything else) is proof of life."""

    def __init__(self, transport: asyncio.Transport, inner: asyncio.BaseProtocol,
                 done: asyncio.Future[None], key: int, clients: dict[int, Bare]) -> None:
        self.transport = transport
        self.inner = inner
        self.done = done
        self.key = key
        self.clients = clients
        self.alive = True

    def data_received(self, data: bytes) -> None:
        self.alive = True

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.clients.pop(self.key, None)
        if not self.done.done():
            self.done.set_result(None)
        self.inner.connection_lost(exc)


def blast(fds: list[int], frame: bytes) -> None:
    write = os.write
    for fd in fds:
        try:  # noqa: SIM105 - no context manager per send in the loop being measured
            write(fd, frame)
        except OSError:
            pass


async def main() -> None:
    threads = int(os.environ.get("FLOOR_WRITE_THREADS", "0"))
    args = parse_args()
    interval = args.interval
    loop = asyncio.get_running_loop()
    clients: dict[int, Bare] = {}
    heap: list[tuple[float, int]] = []
    keys = itertools.count(1)

    async def ws(request: web.Request) -> web.StreamResponse:
        resp = web.WebSocketResponse(autoping=False, compress=False)
        await resp.prepare(request)
        transport = request.transport
        if transport is None:
            return resp
        done: asyncio.Future[None] = loop.create_future()
        key = next(keys)
        bare = Bare(transport, transport.get_protocol(), done, key, clients)
        transport.set_protocol(bare)
        clients[key] = bare
        heapq.heappush(heap, (loop.time() + interval * ((key * PHI) % 1.0), key))
        await done
        return resp

    def tick() -> None:
        now = loop.time()
        horizon = now + 0.01
        while heap and heap[0][0] <= horizon:
            due, key = heapq.heappop(heap)
            bare = clients.get(key)
            if bare is None:
                continue
            bare.transport.write(PING_HEAD + struct.pack("!d", now))
            heapq.heappush(heap, (due + interval, key))
        loop.call_at(heap[0][0] if heap else now + interval, tick)

    loop.call_soon(tick)
    app = web.Application()
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    port = int(runner.addresses[0][1])
    emit("ready", port=port, server="floor")
    pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))

    async def broadcast(i: int) -> None:
        data = message(i).encode()
        frame = bytes((0x81, len(data))) + data
        if not threads:
            for bare in list(clients.values()):
                bare.transport.write(frame)
            return
        fds = [b.transport.get_extra_info("socket").fileno() for b in clients.values()]
        await asyncio.gather(*(loop.run_in_executor(pool, blast, fds[k::threads], frame)
                               for k in range(threads)))

    await command_loop(broadcast, lambda: len(clients))


if __name__ == "__main__":
    run(main, use_uvloop=True)
