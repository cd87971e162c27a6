"""Where each kilobyte of an idle client goes: tracemalloc around N connections.

    .venv/bin/python -m bench.memprofile [--clients 2000] [--loop uvloop|asyncio] [--top 25]

tether runs in this process (the full hub, as `tether serve` builds it) with
tracemalloc on; the load generator (`bench/loadgen.py`, another process) opens
20 warm-up clients, then N more, and a few heartbeat rounds pass (I = 0.5 s) so
every connection has been pinged and has answered. The difference between the
two snapshots, divided by N, is what one idle client costs in Python objects,
grouped by the line that allocated it and by the package it belongs to. RSS
(`/proc/self/statm`) is shown beside it: it also holds what tracemalloc does
not see (the allocator's slack, and uvloop's and the kernel-facing C buffers).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import sys
import tracemalloc
from collections.abc import Iterable

from bench.proc import Child, raise_nofile, rss_bytes
from tether import Settings, Tether, logs

WARM = 20


def _owner(filename: str) -> str:
    """The package a source file belongs to, for the summary table."""
    parts = filename.replace("\\", "/").split("/")
    for name in ("tether", "aiohttp", "uvloop", "yarl", "multidict", "asyncio", "selectors",
                 "socket", "ssl"):
        if name in parts or parts[-1] == f"{name}.py":
            return name
    return parts[-1]


def table(stats: Iterable[tracemalloc.StatisticDiff], clients: int, top: int) -> list[str]:
    """The per-line and per-package rows of one snapshot difference, per client."""
    stats = sorted(stats, key=lambda s: s.size_diff, reverse=True)
    by_owner: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for s in stats:
        frame = s.traceback[0]
        by_owner[_owner(frame.filename)] += s.size_diff
        counts[_owner(frame.filename)] += s.count_diff
    total = sum(by_owner.values())
    rows = [f"{'bytes/client':>12} {'objects':>8}  allocated at"]
    for s in stats[:top]:
        frame = s.traceback[0]
        where = "/".join(frame.filename.split("/")[-2:])
        rows.append(f"{s.size_diff / clients:12.0f} {s.count_diff / clients:8.2f}  "
                    f"{where}:{frame.lineno}")
    rows.append("")
    rows.append(f"{'bytes/client':>12} {'objects':>8}  package")
    for owner, size in by_owner.most_common():
        if abs(size) / clients >= 1:
            rows.append(f"{size / clients:12.0f} {counts[owner] / clients:8.2f}  {owner}")
    rows.append(f"{total / clients:12.0f} {'':>8}  total (tracemalloc)")
    return rows


async def measure(clients: int, top: int) -> list[str]:
    logs.setup("warn")
    settings = Settings(port=0, log_level="warn", heartbeat_interval_ms=500, heartbeat_missed=3,
                        max_connections=100_000, max_per_address=0)
    t = Tether(settings)
    await t.start()
    gen = Child(["-m", "bench.loadgen", "--url", f"ws://127.0.0.1:{t.port}/ws"], "loadgen")
    try:
        await asyncio.to_thread(gen.wait_event, "ready", 30)

        async def connect(n: int) -> None:
            target = len(t.hub.registry) + n
            await asyncio.to_thread(gen.request, "connect", "connected", 120, n=n,
                                    concurrency=100)
            while len(t.hub.registry) < target:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.05)

        await connect(WARM)
        await asyncio.sleep(1.5)
        gc.collect()
        before, rss0 = tracemalloc.take_snapshot(), rss_bytes(os.getpid())
        await connect(clients)
        await asyncio.sleep(1.5)  # three heartbeat rounds: every client pinged and answered
        gc.collect()
        after, rss1 = tracemalloc.take_snapshot(), rss_bytes(os.getpid())
        held = len(t.hub.registry) - WARM
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")
        rows = [f"{held} idle clients, loop {type(asyncio.get_running_loop()).__module__}",
                *table(diff, held, top),
                f"{(rss1 - rss0) / held:12.0f} {'':>8}  RSS per client (with tracemalloc's"
                " own overhead)"]
        return rows
    finally:
        gen.stop()
        await t.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    raise_nofile()
    tracemalloc.start(1)
    coro = measure(args.clients, args.top)
    if args.loop == "uvloop":
        import uvloop

        rows = uvloop.run(coro)
    else:
        rows = asyncio.run(coro)
    print("\n".join(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
