"""What `tether bench` does: a user's own measurement against a running tether (SPEC §9).

It opens N WebSocket clients (a progress bar while they connect), then measures:

- heartbeat RTT: the server's own protocol-ping round trips (`rttMs` in
  `/api/connections`) for these clients, once a heartbeat interval has passed;
- app-level RTT: `{"type":"ping"}` → `{"type":"pong"}` through the hub, per client;
- publish → last delivery: `POST /event` until every client has the message;
- deliveries per second: a burst of M messages to all N clients.

The clients subscribe to a topic of their own, so other subscribers of the
server are not flooded. Pings from the server are answered by aiohttp's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tether.tools import publish_event

PAD = "x" * 40  # a ~100-byte message on the wire, like the suite in bench/


@dataclass
class BenchResult:
    """What one `tether bench` run measured; times in milliseconds."""

    url: str
    connections: int = 0
    failed: int = 0
    connect_s: float = 0.0
    heartbeat_interval_ms: int = 0
    heartbeat_rtt_ms: list[float] = field(default_factory=list)
    app_rtt_ms: list[float] = field(default_factory=list)
    publish_latency_ms: list[float] = field(default_factory=list)
    messages: int = 0
    deliveries: int = 0
    expected_deliveries: int = 0
    deliveries_per_s: float = 0.0
    client_cpu_share: float = 0.0  # of one core, during the burst: near 1.0 = client-bound
    notes: list[str] = field(default_factory=list)


class _Client:
    """One benchmark client: counts deliveries of the bench topic and app-level pongs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.pong: asyncio.Future[float] | None = None


class _Tally:
    """Deliveries per seq, and when the last client got each one."""

    def __init__(self, topic: str, clients: int) -> None:
        self.topic = topic
        self.clients = clients
        self.count: dict[int, int] = {}
        self.complete: dict[int, float] = {}
        self.total = 0
        self.last = 0.0
        self.changed = asyncio.Event()

    def delivered(self, seq: int, now: float) -> None:
        n = self.count.get(seq, 0) + 1
        self.count[seq] = n
        self.total += 1
        self.last = now
        if n >= self.clients:
            self.complete[seq] = now
            self.changed.set()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of `values` (nearest rank); empty when there are none."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))


async def _read(client: _Client, tally: _Tally) -> None:
    async for msg in client.ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            continue
        now = time.monotonic()
        try:
            data = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        if data.get("topic") == tally.topic and isinstance(data.get("seq"), int):
            tally.delivered(data["seq"], now)
        elif data.get("type") == "pong" and client.pong is not None and not client.pong.done():
            client.pong.set_result(now)


async def _open(session: aiohttp.ClientSession, ws_url: str) -> _Client:
    ws = await session.ws_connect(ws_url, autoping=True, heartbeat=None, max_msg_size=0)
    hello = await ws.receive(timeout=10)
    session_id = ""
    if hello.type is aiohttp.WSMsgType.TEXT:
        data = orjson.loads(hello.data)
        if isinstance(data, dict):
            session_id = str(data.get("sessionId", ""))
    return _Client(ws, session_id)


async def _heartbeat_rtts(
    session: aiohttp.ClientSession, base: str, ids: set[str], wait: float
) -> list[float]:
    """rttMs of our clients from /api/connections, polling until most have one or `wait`."""
    deadline = time.monotonic() + wait
    rtts: list[float] = []
    while True:
        async with session.get(f"{base}/api/connections") as resp:
            body = orjson.loads(await resp.read())
        rtts = [
            float(c["rttMs"])
            for c in body.get("connections", [])
            if c.get("sessionId") in ids and c.get("rttMs") is not None
        ]
        if len(rtts) >= 0.95 * len(ids) or time.monotonic() >= deadline:
            return rtts
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


async def _app_rtts(clients: list[_Client]) -> list[float]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(8)  # a few at a time: a round trip, not a queue, is measured

    async def one(client: _Client) -> float | None:
        async with sem:
            client.pong = loop.create_future()
            t0 = time.monotonic()
            await client.ws.send_str('{"type":"ping"}')
            try:
                return (await asyncio.wait_for(client.pong, 10)) - t0
            except TimeoutError:
                return None

    got = await asyncio.gather(*(one(c) for c in clients))
    return [x * 1000 for x in got if x is not None]


async def _wait_total(tally: _Tally, total: int, idle: float) -> None:
    """Until `total` deliveries arrived, or none arrived for `idle` seconds."""
    while tally.total < total:
        seen = tally.total
        tally.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.changed.wait(), idle)
        if tally.total == seen:
            return


async def run_bench(
    url: str,
    connections: int,
    messages: int,
    token: str | None = None,
    rtt_wait: float = 35.0,
    console: Console | None = None,
) -> BenchResult:
    """Run the measurement against the tether at `url` (http://host:port)."""
    console = console or Console(stderr=True)
    base = url.rstrip("/")
    for suffix in ("/ws", "/event"):
        base = base.removesuffix(suffix)
    if base.startswith("ws"):
        base = "http" + base[2:]
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    ws_url = base.replace("http", "ws", 1) + f"/ws?topics={topic}"
    result = BenchResult(url=base)
    _raise_nofile(connections + 100)
    tally = _Tally(topic, connections)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{base}/health") as resp:
            health = orjson.loads(await resp.read())
        hb = health.get("heartbeat", {}) if isinstance(health, dict) else {}
        result.heartbeat_interval_ms = int(hb.get("intervalMs", 0)) if hb.get("enabled") else 0

        clients: list[_Client] = []
        readers: list[asyncio.Task[None]] = []
        sem = asyncio.Semaphore(50)
        t0 = time.monotonic()
        columns = (TextColumn("connecting"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("connect", total=connections)

            async def one() -> None:
                async with sem:
                    try:
                        client = await _open(session, ws_url)
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        result.failed += 1
                    else:
                        clients.append(client)
                        readers.append(asyncio.ensure_future(_read(client, tally)))
                    progress.advance(bar)

            await asyncio.gather(*(one() for _ in range(connections)))
        result.connect_s = time.monotonic() - t0
        result.connections = len(clients)
        tally.clients = len(clients)
        if not clients:
            result.notes.append("no connection could be opened")
            return result
        try:
            await _measure(session, base, token, clients, tally, messages, rtt_wait, result,
                           console)
        finally:
            for client in clients:
                await client.ws.close()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    return result


async def _measure(
    session: aiohttp.ClientSession,
    base: str,
    token: str | None,
    clients: list[_Client],
    tally: _Tally,
    messages: int,
    rtt_wait: float,
    result: BenchResult,
    console: Console,
) -> None:
    n = len(clients)
    result.app_rtt_ms = await _app_rtts(clients)

    def event(i: int) -> dict[str, Any]:
        return {"type": "bench", "topic": tally.topic, "payload": {"i": i, "pad": PAD}}

    # Publish → last delivery, one message at a time (at most 20 of them).
    with console.status("publish → last delivery"):
        for i in range(min(messages, 20)):
            t0 = time.monotonic()
            status, reply = await publish_event(base, event(i), token)
            if status != 202:
                result.notes.append(f"publish refused: HTTP {status} {reply.get('error', '')}")
                return
            seq = int(reply["seq"])
            deadline = t0 + 10
            while seq not in tally.complete and time.monotonic() < deadline:
                tally.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tally.changed.wait(), deadline - time.monotonic())
            if seq in tally.complete:
                result.publish_latency_ms.append((tally.complete[seq] - t0) * 1000)
            else:
                result.notes.append(f"seq {seq} reached {tally.count.get(seq, 0)}/{n} in 10 s")

    # Throughput: M messages published back to back, four POSTs in flight.
    with console.status(f"burst of {messages} messages to {n} clients"):
        start_total = tally.total
        sem = asyncio.Semaphore(4)

        async def post(i: int) -> None:
            async with sem:
                await publish_event(base, event(i), token)

        t0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(post(i) for i in range(messages)))
        await _wait_total(tally, start_total + messages * n, idle=3.0)
        result.messages = messages
        result.expected_deliveries = messages * n
        result.deliveries = tally.total - start_total
        if result.deliveries:
            elapsed = max(1e-9, tally.last - t0)
            result.deliveries_per_s = result.deliveries / elapsed
            result.client_cpu_share = (time.process_time() - cpu0) / elapsed

    # Heartbeat RTT, as the server measured it for these clients.
    interval = result.heartbeat_interval_ms / 1000
    if interval > 0:
        wait = min(rtt_wait, interval * 1.5 + 1)
        ids = {c.session_id for c in clients if c.session_id}
        with console.status(f"waiting up to {wait:.0f}s for heartbeat round trips"):
            result.heartbeat_rtt_ms = await _heartbeat_rtts(session, base, ids, wait)
        if len(result.heartbeat_rtt_ms) < len(ids):
            result.notes.append(
                f"heartbeat RTT known for {len(result.heartbeat_rtt_ms)}/{len(ids)} clients "
                f"(interval {interval:g}s; --rtt-wait to wait longer)"
            )
    else:
        result.notes.append("the server's heartbeat is disabled: no heartbeat RTT")


def render(result: BenchResult) -> Table:
    """The result table."""
    table = Table(title=f"tether bench · {result.url} · {result.connections} clients")
    table.add_column("measure", no_wrap=True)
    for col in ("p50", "p90", "p99", "max"):
        table.add_column(col, justify="right")
    table.add_column("n", justify="right")

    def row(label: str, values: list[float]) -> None:
        p = percentiles(values)
        cells = [f"{p[k]:.2f}" if p else "–" for k in ("p50", "p90", "p99", "max")]
        table.add_row(label, *cells, str(len(values)))

    row("heartbeat RTT ms (server)", result.heartbeat_rtt_ms)
    row("app ping→pong RTT ms", result.app_rtt_ms)
    row("publish→last delivery ms", result.publish_latency_ms)
    table.add_section()
    table.add_row("deliveries per second", f"{result.deliveries_per_s:,.0f}", "", "", "",
                  f"{result.deliveries}/{result.expected_deliveries}")
    table.add_row("bench client CPU", f"{result.client_cpu_share:.0%}", "", "", "",
                  "of a core")
    table.add_row("connect time s", f"{result.connect_s:.2f}", "", "", "",
                  f"{result.connections} ok, {result.failed} failed")
    return table


def bench(
    url: str, connections: int, messages: int, token: str | None = None, rtt_wait: float = 35.0
) -> int:
    """`tether bench`: 0 when it measured, 1 when it could not (message on stderr)."""
    err = Console(stderr=True)
    if connections < 1 or messages < 1:
        err.print("tether bench: --connections and --messages must be at least 1")
        return 2
    try:
        result = asyncio.run(run_bench(url, connections, messages, token, rtt_wait, err))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        err.print(f"tether bench: cannot reach {url}: {exc}")
        return 1
    Console().print(render(result))
    for note in result.notes:
        err.print(f"note: {note}")
    return 0 if result.connections else 1


def summary(result: BenchResult) -> dict[str, Any]:
    """The result as plain data (for scripts and tests)."""
    return {
        "connections": result.connections,
        "failed": result.failed,
        "heartbeat_rtt_ms": percentiles(result.heartbeat_rtt_ms),
        "app_rtt_ms": percentiles(result.app_rtt_ms),
        "publish_latency_ms": percentiles(result.publish_latency_ms),
        "publish_latency_median_ms": (
            statistics.median(result.publish_latency_ms) if result.publish_latency_ms else None
        ),
        "deliveries": result.deliveries,
        "deliveries_per_s": result.deliveries_per_s,
        "client_cpu_share": result.client_cpu_share,
    }
