"""What every server script shares: arguments, the stdin command loop, the message."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable

from bench.proc import emit, raise_nofile

# ~100 bytes on the wire for every server (tether adds "topic" and "seq" to its event).
PAD = "x" * 40


def message(i: int) -> str:
    return json.dumps({"type": "tick", "payload": {"i": i, "pad": PAD}}, separators=(",", ":"))


class GcTimer:
    """Time spent in the cyclic garbage collector, per generation (a `gc` callback)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            gen = info["generation"]
            self.seconds[gen] += time.perf_counter() - self._start
            self.runs[gen] += 1


GC = GcTimer()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--interval", type=float, default=1.0, help="heartbeat interval I, seconds")
    p.add_argument("--missed", type=int, default=2, help="missed pings K (where configurable)")
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args()
    raise_nofile()
    return args


Broadcast = Callable[[int], Awaitable[None]]
Count = Callable[[], int]


async def command_loop(broadcast: Broadcast, count: Count) -> None:
    """Serve the suite's commands until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        raw = await reader.readline()
        if not raw:
            return
        cmd = json.loads(raw)
        if cmd["cmd"] == "broadcast":
            n = int(cmd["count"])
            t0 = time.monotonic()
            for i in range(n):
                await broadcast(i)
                await asyncio.sleep(0)  # let the loop read and flush between messages
            emit("published", count=n, t0=t0, t1=time.monotonic())
        elif cmd["cmd"] == "count":
            emit("count", n=count())
        elif cmd["cmd"] == "gc":
            emit("gc", seconds=GC.seconds, runs=GC.runs, objects=len(gc.get_objects()))


def run(main: Callable[[], Awaitable[None]], use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
