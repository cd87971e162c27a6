"""`tether serve --workers 2` seen as one server: /health, /api/connections and /metrics (issue 17).

Real processes on a real Redis, real sockets on 127.0.0.1. Which worker holds
which client is learnt without asking tether: from the kernel (the worker
process that owns the server end of each client's TCP connection, by
/proc/PID/fd and /proc/net/tcp), and each worker's index from its environment.
Every answer, whichever worker the kernel gave it to, must count every client
and each worker's share; a worker that is stopped (SIGSTOP) must not stop the
answer, which comes within the deadline and names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.aio import eventually, post_event
from tests.redis_server import RedisServer
from tests.support import ServerProcess
from tether import metrics, workerviews
from tether.workerviews import Missing, merge_health

pytestmark = pytest.mark.redis

TOKEN = "op"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ASKS = 16  # answers read of each route: the kernel picks a worker for each new connection
EVENTS = 3


class Client:
    """A WebSocket client that keeps reading, so its messages can be counted."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.port: int = ws.get_extra_info("sockname")[1]
        self.got = 0
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, server: ServerProcess) -> Client:
        ws = await session.ws_connect(f"{server.ws_url}?topics=v")
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "connected"
        return cls(ws, hello["sessionId"])

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT and '"topic":"v"' in msg.data:
                self.got += 1

    async def close(self) -> None:
        await self.ws.close()
        await self.task


def worker_index(pid: int) -> int:
    """A worker's index, from the environment its supervisor gave it."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"TETHER_WORKER="))[14:])


def worker_dir(pid: int) -> Path:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return Path(next(v for v in env if v.startswith(b"TETHER_WORKER_DIR="))[18:].decode())


def holders(pids: list[int], port: int) -> dict[int, int]:
    """Client port → the pid holding the server end of that connection, from the kernel."""
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner[int(target[8:-1])] = pid
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == port and inode in owner:
            found[int(remote.split(":")[1], 16)] = owner[inode]
    return found


@contextlib.asynccontextmanager
async def workers(redis_server: RedisServer) -> AsyncIterator[tuple[ServerProcess, list[int]]]:
    server = ServerProcess(env={"REDIS_URL": redis_server.url, "LOG_LEVEL": "info",
                                "TETHER_WORKERS": "2", "ADMIN_TOKEN": TOKEN})
    server.start()
    try:
        pids = server.wait_for("Workers ready")["data"]["pids"]
        yield server, sorted(pids, key=worker_index)  # pids[i] is worker i
    finally:
        assert server.stop() == 0


async def clients_on_both(session: aiohttp.ClientSession, server: ServerProcess,
                          pids: list[int]) -> tuple[list[Client], dict[str, int]]:
    """Clients until both workers hold some (at least 8, at most 64); session id → worker."""
    clients: list[Client] = []
    held: dict[int, int] = {}
    while len(clients) < 64:
        clients.append(await Client.connect(session, server))
        if len(clients) >= 8:
            held = holders(pids, server.port)
            if len(set(held.values())) == 2:
                break
    assert len(set(held.values())) == 2, "64 clients, all on one worker"
    where = {c.session_id: pids.index(held[c.port]) for c in clients}
    return clients, where


async def get(session: aiohttp.ClientSession, server: ServerProcess, path: str,
              admin: bool = True) -> aiohttp.ClientResponse:
    async with session.get(f"{server.url}{path}", headers=ADMIN if admin else {}) as reply:
        await reply.read()
        assert reply.status == 200, (path, reply.status, await reply.text())
        return reply


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a page that the official parser reads, keyed by name and labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, key
            out[key] = s.value
    return out


async def test_each_answer_counts_every_worker_s_clients_and_counters(
    redis_server: RedisServer,
) -> None:
    async with workers(redis_server) as (server, pids), aiohttp.ClientSession() as session:
        clients, where = await clients_on_both(session, server, pids)
        n = len(clients)
        share = Counter(where.values())
        for i in range(EVENTS):  # each POST lands on one worker or the other
            reply = await post_event(server.url, {"type": "n", "topic": "v", "i": i})
            assert reply.status == 202
        assert await eventually(lambda: all(c.got == EVENTS for c in clients), 10), \
            [c.got for c in clients]

        answered_by: set[int] = set()
        fresh = aiohttp.TCPConnector(force_close=True)  # a new connection, a new pick, each time
        async with aiohttp.ClientSession(connector=fresh) as http:
            for _ in range(ASKS):
                h = await (await get(http, server, "/health")).json()
                assert h["status"] == "ok" and h["clients"] == n, h
                answered_by.add(h["worker"])
                assert h["pid"] == server.proc.pid if server.proc else False
                assert h["messages"]["published"] == EVENTS
                assert h["messages"]["delivered"] == EVENTS * n
                assert h["heartbeat"]["intervalMs"] == 30000  # a setting: not summed
                assert h["backplane"]["status"] == "up"
                assert [(w["worker"], w["pid"], w["status"], w["clients"],
                         w["messages"]["delivered"]) for w in h["workers"]] == [
                    (i, pids[i], "ok", share[i], EVENTS * share[i]) for i in (0, 1)]

                # Without the admin token: what a load balancer needs, for the whole server.
                m = await (await get(http, server, "/health", admin=False)).json()
                assert set(m) == {"status", "uptime", "clients"} and m["clients"] == n, m

                c = await (await get(http, server, "/api/connections")).json()
                assert c["count"] == n
                answered_by.add(c["worker"])
                assert {x["sessionId"]: x["worker"] for x in c["connections"]} == where
                assert len(c["connections"]) == n  # each once
                assert [(w["worker"], w["pid"], w["count"]) for w in c["workers"]] == [
                    (i, pids[i], share[i]) for i in (0, 1)]

                text = await (await get(http, server, "/metrics")).text()
                for family in ("tether_connections", "tether_rtt_seconds",
                               "tether_messages_delivered_total", "tether_worker_up"):
                    assert text.count(f"# TYPE {family} ") == 1, family
                    assert text.count(f"# HELP {family} ") == 1, family
                got = samples(text)
                for i in (0, 1):
                    w = (("worker", str(i)),)
                    assert got[("tether_connections", w)] == share[i]
                    assert got[("tether_worker_up", w)] == 1
                    assert got[("tether_messages_delivered_total",
                                (("priority", "normal"), *w))] == EVENTS * share[i]
                assert sum(v for (name, _), v in got.items()
                           if name == "tether_connections_opened_total") == n
        assert answered_by == {0, 1}, "every answer came from one worker: the test proved nothing"

        # The workers' sockets live in a directory of this user's alone.
        directory = worker_dir(pids[0])
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert directory.stat().st_uid == os.geteuid()
        assert sorted(p.name for p in directory.iterdir()) == ["worker-0.sock", "worker-1.sock"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
        for c in clients:
            await c.close()
    assert not directory.exists(), "the supervisor removes the directory"


async def test_a_stopped_worker_delays_no_answer_past_the_deadline_and_is_named(
    redis_server: RedisServer,
) -> None:
    async with workers(redis_server) as (server, pids), aiohttp.ClientSession() as session:
        clients, where = await clients_on_both(session, server, pids)
        share = Counter(where.values())
        # One kept-alive connection: it stays with the worker that accepted it.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            live = (await (await get(http, server, "/health")).json())["worker"]
            stopped = 1 - live
            os.kill(pids[stopped], signal.SIGSTOP)
            try:
                for _ in range(2):
                    started = time.monotonic()
                    h = await (await get(http, server, "/health")).json()
                    took = time.monotonic() - started
                    assert workerviews.TIMEOUT * 0.9 <= took < workerviews.TIMEOUT + 1.5, took
                    assert h["worker"] == live and h["status"] == "degraded", h
                    assert h["clients"] == share[live]
                    gone = h["workers"][stopped]
                    assert gone == {"worker": stopped, "status": "unresponsive",
                                    "error": "no answer within 1000 ms"}, gone
                    assert h["workers"][live]["status"] == "ok"

                    m = await (await get(http, server, "/health", admin=False)).json()
                    assert m["status"] == "degraded" and m["clients"] == share[live], m

                    started = time.monotonic()
                    c = await (await get(http, server, "/api/connections")).json()
                    assert time.monotonic() - started < workerviews.TIMEOUT + 1.5
                    assert c["worker"] == live and c["count"] == share[live]
                    assert {x["worker"] for x in c["connections"]} == {live}
                    assert c["workers"][stopped]["status"] == "unresponsive"

                    started = time.monotonic()
                    got = samples(await (await get(http, server, "/metrics")).text())
                    assert time.monotonic() - started < workerviews.TIMEOUT + 1.5
                    assert got[("tether_worker_up", (("worker", str(stopped)),))] == 0
                    assert got[("tether_worker_up", (("worker", str(live)),))] == 1
                    assert got[("tether_connections", (("worker", str(live)),))] == share[live]
                    assert not [k for k in got if ("worker", str(stopped)) in k[1]
                                and k[0] != "tether_worker_up"]
            finally:
                os.kill(pids[stopped], signal.SIGCONT)

            async def whole_again() -> bool:
                h = await (await get(http, server, "/health")).json()
                return bool(h["status"] == "ok" and h["clients"] == len(clients))

            assert await eventually(whole_again, 5), "the worker counts again once it runs"
        for c in clients:
            await c.close()


async def test_a_worker_serves_no_views_in_a_directory_others_can_enter(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    os.chmod(tmp_path, 0o755)
    server = ServerProcess(env={"REDIS_URL": redis_server.url, "LOG_LEVEL": "info",
                                "TETHER_WORKER": "0", "TETHER_WORKERS": "2",
                                "TETHER_WORKER_DIR": str(tmp_path)})
    with server:
        refused = server.wait_for("Worker views unavailable")["data"]
        assert refused["path"] == str(tmp_path / "worker-0.sock")
        assert "alone (0700)" in refused["error"]
        assert os.listdir(tmp_path) == []
        async with aiohttp.ClientSession() as http:  # it still serves, and says what it lacks
            h = await (await get(http, server, "/health")).json()
        assert h["status"] == "degraded" and h["workers"][1]["status"] == "unresponsive"
        assert h["workers"][1]["error"].startswith("not reachable")


def test_the_merge_sums_counters_keeps_settings_and_takes_the_largest_lag() -> None:
    def doc(pid: int, clients: int, lag: float, codes: dict[str, int], bp: str) -> dict[str, Any]:
        return {"status": "ok", "pid": pid, "uptime": 10.0 + pid, "clients": clients,
                "heartbeat": {"enabled": True, "intervalMs": 500, "missed": 2, "pinged": clients},
                "loop": {"lagMs": lag, "maxLagMs": lag * 2, "stalls": 1}, "disconnects": codes,
                "backplane": {"name": "redis", "status": bp, "node": f"n{pid}"}}

    merged = merge_health({0: doc(1, 3, 0.5, {"1000": 2}, "up"),
                           1: doc(2, 4, 7.25, {"1000": 1, "1006": 5}, "down"),
                           2: Missing("no answer within 1000 ms")}, 1, 99)
    assert merged["status"] == "degraded" and merged["pid"] == 99 and merged["worker"] == 1
    assert merged["uptime"] == 12.0 and merged["clients"] == 7
    assert merged["heartbeat"] == {"enabled": True, "intervalMs": 500, "missed": 2, "pinged": 7}
    assert merged["loop"] == {"lagMs": 7.25, "maxLagMs": 14.5, "stalls": 2}
    assert merged["disconnects"] == {"1000": 3, "1006": 5}
    assert merged["backplane"] == {"name": "redis", "status": "down"}  # node differs: left out
    assert [w["worker"] for w in merged["workers"]] == [0, 1, 2]
    assert merged["workers"][2] == {"worker": 2, "status": "unresponsive",
                                    "error": "no answer within 1000 ms"}
    shutting = merge_health({0: {**doc(1, 0, 0, {}, "up"), "status": "shutting_down"},
                             1: Missing("x")}, 0, 99)
    assert shutting["status"] == "shutting_down"


def test_pages_merge_into_one_group_per_family_in_first_seen_order() -> None:
    one = (b'# HELP a_total A\n# TYPE a_total counter\na_total{worker="0"} 1.0\n'
           b'# HELP b B\n# TYPE b gauge\n')  # a family with no sample yet
    two = (b'# HELP c C\n# TYPE c gauge\nc{worker="1"} 3.0\n'
           b'# HELP b B\n# TYPE b gauge\nb{worker="1"} 2.0\n'
           b'# HELP a_total A\n# TYPE a_total counter\na_total{worker="1"} 4.0\n')
    assert metrics.merge([one, two]).decode().splitlines() == [
        "# HELP a_total A", "# TYPE a_total counter", 'a_total{worker="0"} 1.0',
        'a_total{worker="1"} 4.0',
        "# HELP b B", "# TYPE b gauge", 'b{worker="1"} 2.0',
        "# HELP c C", "# TYPE c gauge", 'c{worker="1"} 3.0']
