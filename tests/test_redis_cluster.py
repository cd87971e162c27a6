"""Several tether processes on one Redis (SPEC §8): fan-out, resume from any node, workers,
and a Redis outage. Real processes, real sockets on 127.0.0.1, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.aio import eventually, post_event
from tests.redis_server import RedisServer, running_redis, serve_without_redis
from tests.support import ServerProcess

pytestmark = pytest.mark.redis


class Client:
    """A WebSocket client that records every JSON message it gets."""

    def __init__(self, session: aiohttp.ClientSession, node: ServerProcess, query: str) -> None:
        self.session = session
        self.node = node
        self.query = query
        self.got: list[dict[str, Any]] = []
        self.closed_by_server: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self) -> Client:
        self.ws = await self.session.ws_connect(f"{self.node.ws_url}?{self.query}", autoping=True)
        hello = await self.ws.receive_json(timeout=5)
        assert hello["type"] == "connected"
        self._task = asyncio.create_task(self._read(self.ws))
        return self

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.got.append(json.loads(msg.data))
        self.closed_by_server = ws.close_code

    def messages(self, topic: str) -> list[dict[str, Any]]:
        return [m for m in self.got if m.get("topic") == topic and m["type"] != "resync"]

    def resyncs(self, topic: str) -> list[dict[str, Any]]:
        return [m for m in self.got if m["type"] == "resync" and m["topic"] == topic]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            await self._task


async def health(session: aiohttp.ClientSession, node: ServerProcess) -> dict[str, Any]:
    async with session.get(f"{node.url}/health") as r:
        body: dict[str, Any] = await r.json()
        return body


async def watching(session: aiohttp.ClientSession, nodes: list[ServerProcess], count: int) -> None:
    """Until every node reads `count` topic streams (its subscriptions are in effect)."""
    waiting = list(nodes)
    seen: dict[str, Any] = {}

    async def in_effect() -> bool:
        while waiting:
            bp = (await health(session, waiting[0]))["backplane"]
            if bp["pending"] != 0 or bp["watched"] < count:
                seen.update(port=waiting[0].port, backplane=bp)
                return False
            waiting.pop(0)
        return True

    assert await eventually(in_effect, 5, interval=0.02), seen


@contextlib.contextmanager
def nodes(url: str, count: int, **env: str) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for _ in range(count):
            started.append(ServerProcess(
                env={"REDIS_URL": url, "LOG_LEVEL": "info", **env}).start())
        yield started
    finally:
        for node in started:
            node.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def check_in_order(client: Client, topic: str, expected: int) -> None:
    seqs = [m["seq"] for m in client.messages(topic)]
    assert seqs == list(range(1, expected + 1)), (
        f"{topic} on node {client.node.port}: {len(seqs)} of {expected}")


async def test_three_nodes_deliver_1000_messages_exactly_once_in_order(
    redis_server: RedisServer, session: aiohttp.ClientSession,
) -> None:
    with nodes(redis_server.url, 3, HISTORY_SIZE="2000") as procs:
        clients = []
        for node in procs:
            clients.append(await Client(session, node, "topics=a,b").connect())
            clients.append(await Client(session, node, "topics=c").connect())
        await watching(session, procs, 4)  # a, b, c and *

        topics = ["a", "b", "c", "*"]
        rng = random.Random(7)
        plan = [(rng.choice(procs), rng.choice(topics), i) for i in range(1000)]
        accepted: dict[str, int] = dict.fromkeys(topics, 0)
        sem = asyncio.Semaphore(16)

        async def send(node: ServerProcess, topic: str, i: int) -> None:
            async with sem:
                status, body, _ = await post_event(node.url, {"type": "n", "topic": topic, "i": i},
                                                   session=session)
            assert status == 202, body
            accepted[topic] += 1

        await asyncio.gather(*(send(*p) for p in plan))
        assert sum(accepted.values()) == 1000

        def wanted(c: Client) -> int:
            return sum(accepted[t] for t in (["a", "b", "*"] if "a,b" in c.query else ["c", "*"]))

        assert await eventually(lambda: all(len(c.got) >= wanted(c) for c in clients), 20), \
            "delivery"
        await asyncio.sleep(0.2)  # and nothing more (no duplicates)
        for c in clients:
            assert len(c.got) == wanted(c)
            for topic in (["a", "b", "*"] if "a,b" in c.query else ["c", "*"]):
                check_in_order(c, topic, accepted[topic])
        for c in clients:
            await c.close()


async def test_client_cut_off_on_one_node_resumes_on_another(
    redis_server: RedisServer, session: aiohttp.ClientSession,
) -> None:
    with nodes(redis_server.url, 3) as (a, b, c):
        client = await Client(session, a, "topics=r").connect()
        await watching(session, [a], 2)
        for i in range(10):
            reply = await post_event(c.url, {"type": "n", "topic": "r", "i": i}, session=session)
            assert reply.status == 202
        assert await eventually(lambda: len(client.messages("r")) == 10, 5), "first 10"
        assert client.ws is not None
        client.ws._response.connection.transport.abort()  # type: ignore[union-attr]  # cut off
        await client.close()

        # Publishing goes on, to every node, while the client is away and while it
        # resumes on B: replay and live delivery must join without a gap.
        async def publisher() -> int:
            sent = 0
            for i in range(60):
                node = (a, b, c)[i % 3]
                event = {"type": "n", "topic": "r", "i": i}
                assert (await post_event(node.url, event, session=session)).status == 202
                sent += 1
                await asyncio.sleep(0.005)
            return sent

        task = asyncio.create_task(publisher())
        await asyncio.sleep(0.1)
        last = client.messages("r")[-1]["seq"]
        resumed = await Client(session, b, f"since=r:{last}").connect()
        sent = await task
        total = 10 + sent
        assert await eventually(lambda: len(resumed.messages("r")) >= total - last, 10), "resume"
        await asyncio.sleep(0.1)
        seqs = [m["seq"] for m in client.messages("r") + resumed.messages("r")]
        assert seqs == list(range(1, total + 1))
        assert resumed.resyncs("r") == []
        await resumed.close()


async def test_workers_share_one_port_and_all_get_a_publish(
    redis_server: RedisServer, session: aiohttp.ClientSession,
) -> None:
    server = ServerProcess(env={"REDIS_URL": redis_server.url, "LOG_LEVEL": "info",
                                "TETHER_WORKERS": "2"})
    server.start()
    try:
        ready = server.wait_for("Workers ready")
        pids = set(ready["data"]["pids"])
        assert len(pids) == 2
        clients = [await Client(session, server, "topics=w").connect() for _ in range(24)]
        # Which process holds which clients: each worker's entry in /health
        # (tests/test_workers_views.py checks these against the kernel's view).
        h = await health(session, server)
        seen = {w["pid"]: w["clients"] for w in h["workers"]}
        assert set(seen) == pids, seen
        assert all(n > 0 for n in seen.values()) and sum(seen.values()) == 24, seen

        async def both_read_w() -> bool:
            h = await health(session, server)
            return all(w["backplane"]["pending"] == 0 and w["backplane"]["watched"] == 2
                       for w in h["workers"])

        assert await eventually(both_read_w, 5), "each worker reads the topic's stream"
        reply = await post_event(server.url, {"type": "n", "topic": "w"}, session=session)
        assert reply.status == 202
        assert await eventually(lambda: all(len(c.messages("w")) == 1 for c in clients), 5), \
            "fan-out"
        for c in clients:
            await c.close()
    finally:
        status = server.stop()
    assert status == 0
    for pid in pids:  # the workers are gone too
        assert _gone(pid)
    assert "Workers stopped" in server.text()


def _gone(pid: int) -> bool:
    """The process has exited (or is a zombie waiting for its parent's wait)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"
    return True


def test_workers_exit_non_zero_when_a_worker_cannot_start() -> None:
    done = serve_without_redis({"TETHER_WORKERS": "2"}, timeout=30)
    assert done.returncode == 2, done.stdout[-2000:]
    assert b"Cannot start the backplane" in done.stdout
    assert b"Worker failed to start" in done.stdout


async def test_redis_outage_no_node_exits_no_client_closed_nothing_lost_silently(
    session: aiohttp.ClientSession,
) -> None:
    with running_redis() as redis, nodes(redis.url, 3, WS_HEARTBEAT_INTERVAL="500") as procs:
        clients = [await Client(session, node, "topics=o").connect() for node in procs]
        await watching(session, procs, 2)
        accepted: list[tuple[float, int]] = []  # (when, i) of each 202
        refused = 0
        stop = asyncio.Event()

        async def publisher() -> None:
            nonlocal refused
            i = 0
            while not stop.is_set():
                event = {"type": "n", "topic": "o", "i": i}
                status, _, _ = await post_event(procs[i % 3].url, event, session=session)
                if status == 202:
                    accepted.append((time.monotonic(), i))
                else:
                    assert status == 503
                    refused += 1
                i += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(publisher())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis.stop)
        assert await eventually(lambda: refused > 0, 5), "a refused publish"
        down = (await health(session, procs[0]))["backplane"]
        assert down["status"] == "down", down
        await asyncio.sleep(2.0)
        await asyncio.to_thread(redis.start)  # empty: no persistence, numbering restarts
        restarted = time.monotonic()
        for node in procs:
            assert await eventually(lambda n=node: bool(n.find("Redis connection restored")),
                                    10), "restore"
        await asyncio.sleep(0.5)
        stop.set()
        await task

        after = {i for t, i in accepted if t > restarted}
        assert after, "publishing resumed after Redis came back"
        everything = {i for _, i in accepted}
        assert await eventually(
            lambda: all(after <= {m["i"] for m in c.messages("o")} for c in clients), 10), \
            "delivery after the outage"
        await asyncio.sleep(0.2)
        for node in procs:
            assert node.proc is not None and node.proc.poll() is None, "a node exited"
        for c in clients:
            assert c.closed_by_server is None and c.ws is not None and not c.ws.closed
            got = [m["i"] for m in c.messages("o")]
            assert len(got) == len(set(got)), "a message came twice"
            # Every message, or a resync that tells the client to refetch.
            assert set(got) == everything or c.resyncs("o"), (len(got), len(everything))
            # Seqs only rise, except after a resync (Redis restarted empty: renumbered).
            seqs = [m.get("seq") for m in c.got if m.get("topic") == "o"]
            for prev, cur in itertools.pairwise(seqs):
                assert cur is not None and prev is not None and (cur > prev or cur == 0)
        for c in clients:
            await c.close()
        for node in procs:
            assert node.find("Redis connection lost") and node.find("Redis connection restored")
            h = (await health(session, node))["backplane"]
            assert h["status"] == "up" and h["outages"] == 1
        # No client was reaped by the heartbeat while Redis was away.
        for node in procs:
            assert not node.find("Closing stale connection")


async def test_workers_stop_when_the_supervisor_is_killed(redis_server: RedisServer) -> None:
    server = ServerProcess(env={"REDIS_URL": redis_server.url, "LOG_LEVEL": "info",
                                "TETHER_WORKERS": "2"})
    server.start()
    try:
        pids = server.wait_for("Workers ready")["data"]["pids"]
        server.signal(9)  # SIGKILL: the parent cannot forward anything
        assert await eventually(lambda: all(_gone(pid) for pid in pids), 10), \
            "orphaned workers exit"
        assert "Supervisor gone, stopping this worker" in server.text()
    finally:
        server.stop()


def test_a_worker_checks_the_supervisor_pid_it_was_given() -> None:
    """The pid comes from the supervisor, so a worker orphaned before it looked still notices."""
    server = ServerProcess(env={"TETHER_WORKER": "0", "TETHER_SUPERVISOR_PID": "999999999"})
    server.start()
    try:
        assert server.proc is not None
        assert server.proc.wait(10) == 0  # stopped cleanly by itself
        assert server.find("Supervisor gone, stopping this worker")
    finally:
        server.stop()
