"""End-to-end publish → deliver latency through the Redis backplane (SPEC §8).

Starts a redis-server (or uses --redis-url) and two tether processes on it. A
WebSocket client on each node subscribes to one topic; N events are POSTed to
node A one after another, each carrying its send time (CLOCK_MONOTONIC, which
is system-wide on Linux), and each client records when it received it. Prints
the median, p99 and max for the client on node B (cross-node) and on node A
(its own publish, which also comes back through Redis).

    .venv/bin/python -m bench.redis_latency --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install -y redis-server)")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="tether-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


class Node:
    """One `tether serve` process; `url` is read from its `Server ready` line."""

    def __init__(self, redis_url: str) -> None:
        env = {**os.environ, "PORT": "0", "REDIS_URL": redis_url, "LOG_LEVEL": "info"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tether", "serve"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self.url = ""
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if line.get("message") == "Server ready":
                    self.url = line["data"]["url"].replace("localhost", "127.0.0.1")
                    break
        if not self.url:
            sys.exit(f"tether did not start (exit {self.proc.wait()})")
        # Keep draining its log so that the pipe never fills.
        self._drain = asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.read)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(15)


async def receiver(ws: aiohttp.ClientWebSocketResponse, count: int, out: list[float]) -> None:
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            now = time.monotonic()
            event = json.loads(msg.data)
            if event.get("type") == "lat":
                out.append(now - event["t"])
                if len(out) == count:
                    return


def summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (f"{name:<34} {len(ms):>6} {statistics.median(ms):>9.3f} {p99:>9.3f}"
            f" {ms[-1]:>9.3f}")


async def run(redis_url: str, messages: int, gap: float) -> None:
    a, b = Node(redis_url), Node(redis_url)
    try:
        async with aiohttp.ClientSession() as session:
            ws_a = await session.ws_connect(a.url.replace("http", "ws") + "/ws?topics=lat")
            ws_b = await session.ws_connect(b.url.replace("http", "ws") + "/ws?topics=lat")
            for ws in (ws_a, ws_b):
                assert (await ws.receive_json())["type"] == "connected"
            for node in (a, b):  # until both nodes read the topic's stream
                for _ in range(500):
                    async with session.get(node.url + "/health") as r:
                        bp = (await r.json())["backplane"]
                    if bp["pending"] == 0 and bp["watched"] >= 2:
                        break
                    await asyncio.sleep(0.01)
            got_a: list[float] = []
            got_b: list[float] = []
            tasks = [asyncio.create_task(receiver(ws_a, messages, got_a)),
                     asyncio.create_task(receiver(ws_b, messages, got_b))]
            for _ in range(messages):
                event = {"type": "lat", "topic": "lat", "t": time.monotonic()}
                async with session.post(a.url + "/event", json=event) as r:
                    assert r.status == 202, await r.text()
                if gap:
                    await asyncio.sleep(gap)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            await ws_a.close()
            await ws_b.close()
    finally:
        a.stop()
        b.stop()
    print(f"publish → deliver through Redis, {messages} messages, POST to node A, "
          f"{gap * 1000:.1f} ms apart (milliseconds)")
    print(f"{'':<34} {'n':>6} {'median':>9} {'p99':>9} {'max':>9}")
    print(summary("client on node B (other process)", got_b))
    print(summary("client on node A (publishing one)", got_a))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=1.0, help="pause between publishes")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = parser.parse_args()

    async def go(url: str) -> None:
        await run(url, args.messages, args.gap_ms / 1000)

    if args.redis_url:
        asyncio.run(go(args.redis_url))
    else:
        with redis_server() as url:
            asyncio.run(go(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())

