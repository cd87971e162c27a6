"""GET /metrics: Prometheus text format that the official parser reads, and counters that move.

One server; the test acts (connects, lets the heartbeat ping, publishes at each
priority, stalls a client, floods, resumes past the history) and scrapes after
each step, reading the page with `prometheus_client.parser`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.aio import eventually
from tests.conftest import StartTether
from tests.hostile import Raw
from tether.app import Tether

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(t: Tether) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(f"{t.url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("tether_"), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class Reader:
    """A well-behaved client: reads all the time (so aiohttp answers pings) into a queue."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.queue.put_nowait(msg.json())

    async def receive_json(self) -> Any:
        return await asyncio.wait_for(self.queue.get(), 5)

    async def close(self) -> None:
        await self.ws.close()
        await self.task


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape_until(t: Tether, check: Callable[[Samples], bool],
                       timeout: float = 5.0) -> Samples:
    """Scrape until `check(samples)` holds (the heartbeat and closes are asynchronous)."""
    samples: Samples = {}

    async def holds() -> bool:
        nonlocal samples
        samples = await scrape(t)
        return check(samples)

    assert await eventually(holds, timeout, interval=0.05), \
        {k: x for k, x in samples.items() if not k[1]}
    return samples


async def test_metrics_parse_and_move_as_the_hub_works(start_tether: StartTether) -> None:
    t = await start_tether(heartbeat_interval_ms=100, heartbeat_missed=2, message_rate=5,
                           history_size=5, backpressure_high=8_192, backpressure_low=2_048,
                           max_buffer=65_536, close_timeout_ms=300)
    m = await scrape(t)
    assert v(m, "tether_connections") == 0
    assert v(m, "tether_backplane_up", backplane="memory") == 1
    for p in ("high", "normal", "low"):
        assert v(m, "tether_messages_published_total", priority=p) == 0
    families = {name for name, _ in m}
    for name in ("tether_heartbeat_pings_sent_total", "tether_heartbeat_pongs_received_total",
                 "tether_heartbeat_stale_closed_total", "tether_loop_lag_seconds",
                 "tether_paused_clients", "tether_slow_closed_total", "tether_rate_limited_total",
                 "tether_resumes_total", "tether_resyncs_total", "tether_rtt_seconds_count"):
        assert name in families, name

    async with aiohttp.ClientSession() as s:
        # Connections, pings, pongs and RTT (aiohttp's client answers pings).
        clients = [Reader(await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws")) for _ in range(2)]
        for ws in clients:
            await ws.receive_json()
        m = await scrape_until(t, lambda m: v(m, "tether_rtt_seconds_count") >= 4)
        assert v(m, "tether_connections") == 2
        assert v(m, "tether_connections_opened_total") == 2
        assert v(m, "tether_heartbeat_pings_sent_total") >= 4
        assert v(m, "tether_heartbeat_pongs_received_total") >= 4
        buckets = sorted(((float(dict(k[1])["le"]), x) for k, x in m.items()
                          if k[0] == "tether_rtt_seconds_bucket"))
        assert [c for _, c in buckets] == sorted(c for _, c in buckets)  # cumulative
        assert buckets[-1][1] == v(m, "tether_rtt_seconds_count")
        assert 0 < v(m, "tether_rtt_seconds_sum") < v(m, "tether_rtt_seconds_count")

        # Published and delivered, by priority.
        for p in ("high", "normal", "low"):
            await t.publish({"type": "m", "priority": p})
        for ws in clients:
            assert [(await ws.receive_json())["priority"] for _ in range(3)] == [
                "high", "normal", "low"]
        m = await scrape(t)
        for p in ("high", "normal", "low"):
            assert v(m, "tether_messages_published_total", priority=p) == 1
            assert v(m, "tether_messages_delivered_total", priority=p) == 2

        # Stale: a client that never answers pings is closed within (K+1)·I.
        silent = await Raw.connect(t.port)
        await silent.recv_json()
        m = await scrape_until(t, lambda m: v(m, "tether_heartbeat_stale_closed_total") == 1)
        assert v(m, "tether_connections") == 2

        # Rate limited, then closed for abuse; a bad message counted as a client error.
        flood = await Raw.connect(t.port)
        await flood.recv_json()
        flood.send(0x1, b"{not json")
        for i in range(30):
            flood.send_json({"type": "ping", "id": i})
        assert (await flood.close_code())[0] == 1008
        m = await scrape_until(t, lambda m: v(m, "tether_abuse_closed_total") == 1)
        assert v(m, "tether_rate_limited_total") >= 5
        assert v(m, "tether_client_errors_total") >= 2  # the bad JSON and the rate error

        # Resume within the history, and past it (resync).
        for _ in range(10):
            await t.publish({"type": "r", "topic": "news"})
        async with s.ws_connect(f"ws://127.0.0.1:{t.port}/ws?since=news:8") as ws:
            await ws.receive_json()
            assert [(await ws.receive_json())["seq"] for _ in range(2)] == [9, 10]
        async with s.ws_connect(f"ws://127.0.0.1:{t.port}/ws?since=news:1") as ws:
            await ws.receive_json()
            assert (await ws.receive_json())["type"] == "resync"
        m = await scrape_until(t, lambda m: v(m, "tether_connections") == 2)
        assert v(m, "tether_resumes_total") == 2
        assert v(m, "tether_resyncs_total") == 1
        assert v(m, "tether_replayed_total") == 2
        for ws in clients:
            await ws.close()
    for raw in (silent, flood):
        raw.close()
    m = await scrape_until(t, lambda m: v(m, "tether_connections") == 0)
    assert v(m, "tether_connections_opened_total") == 6


async def test_metrics_show_paused_deferred_and_slow_closed_clients(
    start_tether: StartTether,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0, backpressure_high=8_192,
                           backpressure_low=2_048, max_buffer=65_536, close_timeout_ms=300)
    async with aiohttp.ClientSession() as s:
        reader = Reader(await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws"))
        await reader.receive_json()
        # A client that stops reading: paused, skips normal/low, then closed as slow (1013).
        stalled = await Raw.connect(t.port, limit=1024, rcvbuf=4096)
        await stalled.recv_json()
        for _ in range(2000):
            await t.publish({"type": "bulk", "priority": "low", "payload": "x" * 20_000})
            await reader.receive_json()
            if t.hub.stats.deferred[2] > 10:
                break
        m = await scrape(t)
        assert v(m, "tether_messages_deferred_total", priority="low") > 10
        assert v(m, "tether_messages_deferred_total", priority="high") == 0
        assert v(m, "tether_paused_clients") == 1
        assert v(m, "tether_slow_closed_total") == 0
        for _ in range(200):
            await t.publish({"type": "bulk", "priority": "high", "payload": "x" * 20_000})
            await reader.receive_json()
            if t.hub.stats.slow_closed:
                break
        m = await scrape_until(t, lambda m: v(m, "tether_slow_closed_total") == 1)
        m = await scrape_until(t, lambda m: v(m, "tether_connections") == 1)
        assert v(m, "tether_paused_clients") == 0
        assert v(m, "tether_messages_delivered_total", priority="low") >= 11
        await reader.close()
    stalled.close()
