"""The chaos test of the invariant (issue 15): no client ever sees a silent gap.

Several careful clients (`bench/chaos_client.py`) read several topics of real
tether servers while publishers POST at a steady rate at mixed priorities, and a
seeded random schedule of faults runs:

    pause     a client stops reading until the server pauses it (its normal and
              low messages held back), for a while, then reads again
    slow      a client stops reading until the server closes it as too slow (1013)
    stop      a client process suspended (SIGSTOP) past the heartbeat, then continued
    reset     a client's TCP connection reset (RST)
    restart   the in-memory server stopped and started again on its port; its
              clients hold back while publishes reach the new process
    redis     redis-server killed with -9 and started again on its port (empty)
    nodekill  one of two tether nodes on one Redis killed with -9; its clients
              reconnect to the other; it is started again later

Then publishing stops, every client catches up, and `bench/chaos_check.py`
checks what each one received against the invariant. It prints the seed, the
faults, the counts (recoveries, resumes, resyncs...), the duration, and every
violation with the client's received sequence around it; exit status 1 on a
violation.

    .venv/bin/python -m bench.chaos --minutes 10 [--seed N] [--backplane memory|redis|both]

`tests/test_chaos.py` runs a bounded form in `make test`: one fixed seed, each
fault once, on both backplanes. The processes it starts are in
`bench/chaos_procs.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.chaos_check import Accepted, ClientLog, Loss, Report, Violation, check
from bench.chaos_client import ChaosClient
from bench.chaos_procs import Node, ProcessClient, RedisControl, RedisProcess
from bench.proc import ROOT

OUTPUT = ROOT / "test-output"

# Topics of different heat: a hot one wraps the history during a long fault
# (resync), a cold one is overtaken quickly by a restarted server's new numbering.
TOPICS = {"t.hot": 0.5, "t.warm": 0.25, "t.cool": 0.15, "t.cold": 0.1}
PRIORITIES = {"high": 0.25, "normal": 0.5, "low": 0.25}
PAD = 120  # bytes of padding in a regular publish
BULK = 24_000  # bytes of padding in the messages that fill a stopped client's buffers
FILL_LIMIT = 400  # bulk messages at most per fault (~9.6 MB)

# The servers: a short heartbeat (a suspended client is closed within (K+1)·I =
# 0.9 s), small backpressure thresholds and buffer, a history that a long fault
# outruns on the hot topic.
SERVER_ENV = {
    "HOST": "127.0.0.1",
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
    "WS_HEARTBEAT_INTERVAL": "300",
    "WS_HEARTBEAT_MISSED": "2",
    "WS_BACKPRESSURE_HIGH": "16384",
    "WS_BACKPRESSURE_LOW": "4096",
    "WS_MAX_BUFFER": "262144",
    "WS_CLOSE_TIMEOUT": "1000",
    "HISTORY_SIZE": "300",
}

CLIENT_FAULTS = ("pause", "slow", "reset")  # on a client of the harness process
PROCESS_FAULTS = ("stop",)  # on a client in a process of its own
SERVER_FAULTS = {"memory": ("restart",), "redis": ("redis", "nodekill")}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------- publishing


class Publisher:
    """POST /event with an Idempotency-Key, retried on 503 and failed connections.

    Every 202 is recorded (the payload's id, topic, seq, first attempt, answer).
    """

    def __init__(self, run_id: str, urls: Callable[[], list[str]], rng: random.Random) -> None:
        self.run_id = run_id
        self.urls = urls
        self.rng = rng
        self.accepted: list[Accepted] = []
        self.counts: Counter[str] = Counter()
        self.number = 0
        self.session: aiohttp.ClientSession | None = None
        self.in_flight: set[asyncio.Task[Accepted | None]] = set()

    async def __aenter__(self) -> Publisher:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def publish(self, topic: str, priority: str, pad: int = PAD,
                      deadline: float = 60.0) -> Accepted | None:
        """One publish, retried with the same key until answered (or `deadline` s passed)."""
        assert self.session is not None
        self.number += 1
        ident = f"{self.run_id}-{self.number}"
        body = json.dumps({"type": "chaos", "topic": topic, "priority": priority,
                           "payload": {"id": ident, "pad": "x" * pad}})
        headers = {"Content-Type": "application/json", "Idempotency-Key": ident}
        first = time.monotonic()
        attempt = 0
        urls = self.urls()
        at = self.rng.randrange(len(urls))
        while time.monotonic() - first < deadline:
            urls = self.urls()
            url = urls[(at + attempt) % len(urls)]
            attempt += 1
            try:
                async with self.session.post(url + "/event", data=body, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=5)) as r:
                    reply = await r.json(content_type=None)
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                status, reply = 0, None
            if status == 202 and isinstance(reply, dict):
                pub = Accepted(ident, topic, int(reply["seq"]), first, time.monotonic())
                self.accepted.append(pub)
                self.counts["accepted"] += 1
                if attempt > 1:
                    self.counts["accepted after a retry"] += 1
                if reply.get("duplicate"):
                    self.counts["answered as a duplicate"] += 1
                return pub
            if status not in (0, 502, 503, 504):
                self.counts[f"refused {status}"] += 1
                return None
            self.counts["retries"] += 1
            await asyncio.sleep(self.rng.uniform(0.02, 0.1) * min(2 ** attempt, 16))
        self.counts["gave up"] += 1
        return None

    async def steady(self, rate: float, stop: asyncio.Event, limit: int = 64) -> None:
        """Publish `rate` a second to the regular topics until `stop` (at most `limit` at once)."""
        gate = asyncio.Semaphore(limit)
        topics, weights = list(TOPICS), list(TOPICS.values())
        prios, pweights = list(PRIORITIES), list(PRIORITIES.values())
        next_at = time.monotonic()
        while not stop.is_set():
            await gate.acquire()
            topic = self.rng.choices(topics, weights)[0]
            priority = self.rng.choices(prios, pweights)[0]
            task = asyncio.create_task(self.publish(topic, priority))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            task.add_done_callback(lambda _: gate.release())
            next_at = max(next_at + 1 / rate, time.monotonic() - 0.5)  # no catch-up burst
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))

    async def drain(self, timeout: float = 90.0) -> None:
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=timeout)


# ---------------------------------------------------------------------- the run


@dataclass
class Config:
    """One run: which backplane, how long, which seed, how much load."""

    backplane: str = "memory"  # or "redis"
    seconds: float = 60.0  # of faults and publishing
    seed: int = 0
    clients: int = 8  # in all
    process_clients: int = 2  # of which in processes of their own (SIGSTOP)
    rate: float = 200.0  # publishes a second
    bounded: bool = False  # each fault kind once, spread over `seconds`
    mean_gap: float = 2.5  # seconds between faults (random schedule)
    workdir: Path | None = None
    quiet: bool = False


@dataclass
class Fault:
    """One fault of the schedule, what it did (`note`) and whether it bit (`effect`)."""

    kind: str
    target: str
    start: float
    end: float = 0.0
    note: str = ""
    effect: bool = False  # it did what it is for (paused, closed, renumbered...)


@dataclass
class Result:
    """What a run found (`report`) and counted."""

    config: Config
    report: Report
    duration: float
    faults: list[Fault]
    client_counts: Counter[str]
    server_counts: Counter[str]
    publisher_counts: Counter[str]
    workdir: Path
    t0: float

    @property
    def ok(self) -> bool:
        return not self.report.violations


class Harness:
    """One chaos run: processes, clients, publishers, faults, the check."""

    def __init__(self, config: Config, redis: RedisControl | None = None) -> None:
        self.config = config
        # One generator per concern: the publishers' draws, which interleave with the
        # faults' in time, do not change the schedule a seed gives.
        self.rng = random.Random(config.seed)  # the faults
        self.setup_rng = random.Random(config.seed + 1)  # who reads what
        self.publish_rng = random.Random(config.seed + 2)
        self.workdir = config.workdir or Path(tempfile.mkdtemp(
            prefix=f"chaos-{config.backplane}-{config.seed}-", dir=_output_dir()))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own_redis: RedisProcess | None = None
        self.redis = redis
        self.nodes: list[Node] = []
        self.clients: list[ChaosClient] = []
        self.procs: list[ProcessClient] = []
        self.client_tasks: list[asyncio.Task[None]] = []
        self.losses: list[Loss] = []
        self.faults: list[Fault] = []
        self.busy: set[str] = set()  # clients under a fault
        self.server_free = asyncio.Event()
        self.server_free.set()
        self.health: dict[int, dict[str, Any]] = {}  # last /health of each server process
        self.t0 = self.t_start = time.monotonic()
        self.publisher: Publisher | None = None
        self.http: aiohttp.ClientSession | None = None

    def say(self, msg: str) -> None:
        if not self.config.quiet:
            log(f"[{time.monotonic() - self.t0:7.2f}] {msg}")

    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    # ------------------------------------------------------------------ set-up

    async def _start_servers(self) -> None:
        env = dict(SERVER_ENV)
        if self.config.backplane == "redis":
            if self.redis is None:
                self._own_redis = RedisProcess(self.workdir).start()
                self.redis = self._own_redis
            env["REDIS_URL"] = self.redis.url
            self.nodes = [Node("node-a", env, self.workdir), Node("node-b", env, self.workdir)]
        else:
            self.nodes = [Node("memory", env, self.workdir)]
        await asyncio.gather(*(n.start() for n in self.nodes))

    def _start_clients(self) -> None:
        regular = list(TOPICS)
        for i in range(self.config.clients):
            name = f"c{i}"
            topics = sorted(self.setup_rng.sample(regular, self.setup_rng.randint(2, 3)))
            seed = self.setup_rng.randrange(2**31)
            if i < self.config.process_clients:
                self.procs.append(ProcessClient(name, self.urls(), topics, seed, self.workdir))
            else:
                # A topic of its own, for the bulk messages that fill its buffers.
                client = ChaosClient(name, self.urls(), [*topics, f"p.{name}"], seed)
                self.clients.append(client)
                self.client_tasks.append(asyncio.create_task(client.run()))

    async def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in self.clients)), timeout)
        for proc in self.procs:
            while True:
                state = await proc.state()
                if all(t in state["positions"] for t in proc.topics):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} never subscribed")
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ server views

    async def _get(self, url: str, path: str) -> Any:
        assert self.http is not None
        try:
            async with self.http.get(url + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def _snapshot(self, node: Node) -> None:
        health = await self._get(node.url, "/health")
        if health is not None:
            self.health[int(health["pid"])] = health

    async def _watch_health(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.gather(*(self._snapshot(n) for n in self.nodes if n.alive))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _session(self, url: str | None, session_id: str | None) -> dict[str, Any] | None:
        """The server's view of one connection (None when it is not registered there)."""
        if url is None or session_id is None:
            return None
        conns = await self._get(url, "/api/connections")
        for conn in (conns or {}).get("connections", []):
            if conn["sessionId"] == session_id:
                return dict(conn)
        return None

    # ------------------------------------------------------------------ faults

    async def _fill(self, client: ChaosClient, priority: str, paused: bool,
                    seconds: float = 20.0) -> tuple[int, bool]:
        """Bulk messages on the client's own topic until the server pauses it (`paused`) or
        no longer has it, or a bound.

        Returns how many were sent, and whether the server paused it (`paused`) or
        closed it (not `paused`).
        """
        assert self.publisher is not None
        url, sid = client.url, client.session_id
        deadline = time.monotonic() + seconds
        sent = 0
        while True:
            view = await self._session(url, sid)
            if view is None:
                return sent, not paused
            if paused and view["paused"]:
                return sent, True
            if sent >= FILL_LIMIT or time.monotonic() > deadline:
                return sent, False
            for _ in range(8):
                await self.publisher.publish(f"p.{client.name}", priority, BULK, deadline=10)
                sent += 1

    async def _epoch(self, node: Node) -> str | None:
        """The epoch a new connection to `node` is told (None when it cannot connect)."""
        assert self.http is not None
        try:
            async with self.http.ws_connect(node.url.replace("http", "ws") + "/ws") as ws:
                hello = await ws.receive_json(timeout=5)
                return str(hello.get("epoch"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def fault_pause(self, fault: Fault, client: ChaosClient) -> None:
        client.pause_reading(None)
        try:
            sent, paused = await self._fill(client, "normal", paused=True)
            fault.effect = paused
            hold = self.rng.uniform(0.3, 2.0)
            fault.note = (f"{sent} bulk messages, server paused it: {paused}, "
                          f"reads again in {hold:.1f} s")
            await asyncio.sleep(hold)
            view = await self._session(client.url, client.session_id)
            if view is not None:
                fault.note += f", {view['deferred']} held back"
        finally:
            client.resume_reading()

    async def fault_slow(self, fault: Fault, client: ChaosClient) -> None:
        client.pause_reading(None)
        try:
            sent, fault.effect = await self._fill(client, "high", paused=False)
            fault.note = f"{sent} bulk high messages, closed by the server: {fault.effect}"
            await asyncio.sleep(0.2)
        finally:
            client.resume_reading()

    async def fault_reset(self, fault: Fault, client: ChaosClient) -> None:
        fault.effect = client.reset()
        fault.note = "RST sent" if fault.effect else "not connected"

    async def fault_stop(self, fault: Fault, proc: ProcessClient) -> None:
        seconds = self.rng.uniform(1.5, 3.0)
        state = await proc.state()
        proc.suspend()
        try:
            await asyncio.sleep(seconds)
            # Closed by the heartbeat while it was suspended: the server no longer has it.
            fault.effect = await self._session(state["url"], state["sessionId"]) is None
            fault.note = f"SIGSTOP for {seconds:.1f} s, closed meanwhile: {fault.effect}"
        finally:
            proc.resume()

    def _hold_clients(self, seconds: float) -> None:
        for client in self.clients:
            client.hold(seconds)
        for proc in self.procs:
            proc.send("hold", seconds=seconds)

    async def _pause_over(self, client: ChaosClient) -> str:
        """Pause `client` until the server holds messages back for it; what it did."""
        client.pause_reading(None)
        sent, paused = await self._fill(client, "normal", paused=True)
        if paused:  # the regular traffic goes on: some of it held back for it
            await asyncio.sleep(self.rng.uniform(0.2, 0.6))
        view = await self._session(client.url, client.session_id)
        return (f"{client.name} paused over it: {paused} ({sent} bulk messages, "
                f"{view['deferred'] if view else '?'} held back)")

    async def fault_restart(self, fault: Fault, node: Node) -> None:
        self._hold_clients(60)  # until the new process has taken publishes
        hold = self.rng.uniform(0.0, 1.0)
        # A client paused with messages held back when the shutdown begins: they were
        # accepted, so they reach it before its 1001 (it reads again meanwhile).
        free = [c for c in self.clients
                if c.name not in self.busy and c.ws is not None and c.session_id]
        paused = self.rng.choice(free) if free else None
        if paused is not None:
            self.busy.add(paused.name)
        try:
            before = await self._epoch(node)
            over = await self._pause_over(paused) if paused is not None else "no client paused"
            await self._snapshot(node)
            start = time.monotonic()
            stopping = asyncio.create_task(node.stop())
            if paused is not None:
                # It reads again once the shutdown began (the 1001 frames go out then),
                # well within WS_CLOSE_TIMEOUT: it reads its 1001, not a reset.
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    health = await self._get(node.url, "/health")
                    if health is None or health["status"] != "ok":
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
                paused.resume_reading()
            code = await stopping
            end = time.monotonic()
            self.losses.append(Loss("restart", start, end))
            await node.start()
            after = await self._epoch(node)
            fault.effect = code == 0 and before is not None and after not in (None, before)
            # Publishes that reach the new process before its old clients are back:
            # more of them than the old process had numbered on a cold topic, so that a
            # client's old position is a valid seq of the new numbering (issue 15's case).
            assert self.publisher is not None
            topic = "t.cold"
            last = max((p.seq for p in self.publisher.accepted if p.topic == topic), default=0)
            burst = min(FILL_LIMIT, last + self.rng.randint(5, 40))
            gate = asyncio.Semaphore(32)

            async def one() -> None:
                async with gate:
                    assert self.publisher is not None
                    await self.publisher.publish(topic, self.publish_rng.choice(list(PRIORITIES)))

            await asyncio.gather(*(one() for _ in range(burst)))
            fault.note = (f"exit {code}, down {end - start:.2f} s, new epoch: {fault.effect}, "
                          f"{over}, {burst} publishes to {topic} before the clients come "
                          f"back ({hold:.1f} s later)")
        finally:
            self._hold_clients(hold)
            if paused is not None:
                paused.resume_reading()
                self.busy.discard(paused.name)

    async def _epochs(self) -> set[str | None]:
        return {await self._epoch(n) for n in self.nodes}

    async def fault_redis(self, fault: Fault, _target: object) -> None:
        assert self.redis is not None
        down = self.rng.uniform(0.3, 1.5)
        before = await self._epochs()
        start = time.monotonic()
        self.redis.kill()
        await asyncio.sleep(down)
        await asyncio.to_thread(self.redis.start)
        self.losses.append(Loss("redis", start, time.monotonic()))
        # Each node learns the new dataset when its reader reconnects (backoff up to 2 s).
        deadline = time.monotonic() + 10
        after = await self._epochs()
        while (after & before or None in after) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = await self._epochs()
        fault.effect = len(after) == 1 and not after & before
        fault.note = f"down {time.monotonic() - start:.2f} s, every node on a new epoch: " \
                     f"{fault.effect}"

    async def fault_nodekill(self, fault: Fault, node: Node) -> None:
        down = self.rng.uniform(1.0, 3.0)
        await self._snapshot(node)
        pid = node.proc.pid if node.proc is not None else None
        node.kill()
        await asyncio.sleep(down)
        await node.start()
        fault.effect = node.proc is not None and node.proc.pid != pid
        fault.note = f"down {down:.1f} s"

    async def _run_fault(self, kind: str) -> None:
        """One fault on a target free of others; skipped when there is none."""
        target: Any
        key: str
        if kind in CLIENT_FAULTS:
            free = [c for c in self.clients
                    if c.name not in self.busy and c.ws is not None and c.session_id]
            if not free:
                return
            target = self.rng.choice(free)
            key = target.name
        elif kind in PROCESS_FAULTS:
            free_procs = [p for p in self.procs if p.name not in self.busy]
            if not free_procs:
                return
            target = self.rng.choice(free_procs)
            key = target.name
        else:
            if not self.server_free.is_set():
                return
            self.server_free.clear()
            target = self.rng.choice(self.nodes)
            key = target.name if kind != "redis" else "redis"
        self.busy.add(key)
        fault = Fault(kind, key, time.monotonic())
        self.faults.append(fault)
        try:
            handler: Callable[[Fault, Any], Awaitable[None]] = getattr(self, f"fault_{kind}")
            await handler(fault, target)
        except Exception as exc:  # a fault that failed is reported, the run goes on
            fault.note += f" FAILED: {type(exc).__name__}: {exc}"
        finally:
            fault.end = time.monotonic()
            self.busy.discard(key)
            if kind not in CLIENT_FAULTS and kind not in PROCESS_FAULTS:
                self.server_free.set()
            self.say(f"{kind:<8} {key:<7} {fault.end - fault.start:5.2f} s  {fault.note}"
                     + ("" if fault.effect else "  (NO EFFECT)"))

    def kinds(self) -> list[str]:
        kinds = list(CLIENT_FAULTS) + list(SERVER_FAULTS[self.config.backplane])
        if self.procs:
            kinds += list(PROCESS_FAULTS)
        return kinds

    async def _settled(self, timeout: float = 5.0) -> None:
        """Until every client is connected again (or `timeout`): the next fault bites."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.ws is not None and c.session_id for c in self.clients):
                return
            await asyncio.sleep(0.05)

    async def _schedule(self, stop: asyncio.Event) -> None:
        """The faults: each kind once, one after the other (bounded), or at random."""
        tasks: set[asyncio.Task[None]] = set()
        end = self.t_start + self.config.seconds
        if self.config.bounded:
            # One at a time, each on settled clients, so that each has its effect.
            kinds = self.kinds()
            self.rng.shuffle(kinds)
            slot = self.config.seconds / (len(kinds) + 1)
            for i, kind in enumerate(kinds):
                at = self.t_start + slot * (i + 0.3) + self.rng.uniform(0, slot / 3)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, at - time.monotonic()))
                if stop.is_set():
                    return
                await self._settled()
                await self._run_fault(kind)
            return
        weights = {"pause": 3, "slow": 2, "reset": 3, "stop": 2, "restart": 1, "redis": 1,
                   "nodekill": 1}
        kinds, times = [], []
        at = self.t_start + self.rng.expovariate(1 / self.config.mean_gap)
        while at < end - 2:
            options = self.kinds()
            kinds.append(self.rng.choices(options, [weights[k] for k in options])[0])
            times.append(at)
            at += self.rng.expovariate(1 / self.config.mean_gap)
        for kind, at in zip(kinds, times, strict=True):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, at - time.monotonic()))
            if stop.is_set():
                break
            if kind not in CLIENT_FAULTS and kind not in PROCESS_FAULTS:
                await self.server_free.wait()  # one server fault at a time
            task = asyncio.create_task(self._run_fault(kind))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks))

    # ------------------------------------------------------------------ the end

    async def _targets(self) -> dict[str, int]:
        """Each topic's current seq, as a fresh subscriber is told (`subscribed`)."""
        topics = list(TOPICS) + [f"p.{c.name}" for c in self.clients]
        assert self.http is not None
        node = next(n for n in self.nodes if n.alive)
        async with self.http.ws_connect(node.url.replace("http", "ws") + "/ws") as ws:
            await ws.receive_json(timeout=10)
            await ws.send_json({"type": "subscribe", "topics": topics})
            while True:
                msg = await ws.receive_json(timeout=10)
                if msg.get("type") == "subscribed":
                    return {t: int(s) for t, s in msg["seqs"].items()}

    async def _catch_up(self, timeout: float = 60.0) -> list[str]:
        """Until every client has the last seq of each of its topics; those still behind."""
        deadline = time.monotonic() + timeout
        targets = await self._targets()
        behind: list[str] = []
        while time.monotonic() < deadline:
            behind = []
            states = [(c.name, c.topics, c.state()) for c in self.clients]
            for proc in self.procs:
                states.append((proc.name, proc.topics, await proc.state()))
            for name, topics, state in states:
                for topic in topics:
                    have = state["positions"].get(topic)
                    if have is None or have[0] != targets.get(topic, 0):
                        behind.append(f"{name} {topic} {have} of {targets.get(topic)}")
            if not behind:
                return []
            await asyncio.sleep(0.1)
        return behind

    # ------------------------------------------------------------------ run

    async def run(self) -> Result:
        cfg = self.config
        self.say(f"chaos: backplane {cfg.backplane}, seed {cfg.seed}, {cfg.seconds:.0f} s, "
                 f"{cfg.clients} clients, {cfg.rate:.0f} publishes/s, "
                 f"{'each fault once' if cfg.bounded else 'random faults'}; {self.workdir}")
        started = time.monotonic()
        self.http = aiohttp.ClientSession()
        stop = asyncio.Event()
        watcher: asyncio.Task[None] | None = None
        behind: list[str] = []
        try:
            await self._start_servers()
            self._start_clients()
            await self._wait_ready()
            async with Publisher(f"{cfg.seed}-{cfg.backplane}", self.urls,
                                 self.publish_rng) as pub:
                self.publisher = pub
                watcher = asyncio.create_task(self._watch_health(stop))
                self.t_start = time.monotonic()
                steady = asyncio.create_task(pub.steady(cfg.rate, stop))
                schedule = asyncio.create_task(self._schedule(stop))
                if cfg.bounded:  # every fault runs, however long they take
                    await asyncio.gather(asyncio.sleep(cfg.seconds), schedule)
                else:
                    await asyncio.sleep(cfg.seconds)
                stop.set()
                await schedule  # the faults under way end, and restore what they changed
                await steady
                await pub.drain()
                behind = await self._catch_up()
                for node in self.nodes:
                    await self._snapshot(node)
            client_events = await self._finish_clients()
        finally:
            stop.set()
            if watcher is not None:
                await watcher
            for client in self.clients:
                client.stop()
            if any(not t.done() for t in self.client_tasks):
                await asyncio.wait(self.client_tasks, timeout=10)
            for proc in self.procs:
                proc.kill()
            for node in self.nodes:
                await node.stop()
            if self._own_redis is not None:
                self._own_redis.close()
            await self.http.close()
        duration = time.monotonic() - started
        assert self.publisher is not None
        logs = [ClientLog(name, topics, events) for name, topics, events in client_events]
        report = check(logs, self.publisher.accepted, self.losses,
                       shutdown=cfg.backplane == "memory", t0=self.t0)
        if report.violations:  # for a post-mortem: every client's events, one JSON a line
            for client in self.clients:
                await asyncio.to_thread(_dump, self.workdir / f"{client.name}.events",
                                        client.events)
        if behind:
            # Publishing stopped and every fault ended a minute ago: a client that still
            # lacks a topic's last seq lost it (the accepted rule says which, if it can).
            report.add(Violation("catch-up", ", ".join(sorted({b.split()[0] for b in behind})),
                                 None, "*", "not at the last seq 60 s after the end: "
                                 + "; ".join(behind[:20])))
        client_counts: Counter[str] = Counter()
        for client in self.clients:
            client_counts.update(client.counts)
        return Result(cfg, report, duration, self.faults, client_counts, self._server_counts(),
                      self.publisher.counts, self.workdir, self.t0)

    async def _finish_clients(self) -> list[tuple[str, list[str], list[list[Any]]]]:
        out: list[tuple[str, list[str], list[list[Any]]]] = []
        for client in self.clients:
            client.stop()
        if self.client_tasks:
            await asyncio.wait(self.client_tasks, timeout=10)
        for client in self.clients:
            out.append((client.name, client.topics, client.events))
        for proc in self.procs:
            out.append((proc.name, proc.topics, await proc.finish()))
        return out

    def _server_counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for health in self.health.values():
            m = health["messages"]
            counts["recovered (held back, then sent from the history)"] += m["recovered"]
            counts["deferred (held back while paused)"] += sum(m["deferred"].values())
            counts["resumes"] += m["resumes"]
            counts["resyncs"] += m["resyncs"]
            counts["replayed"] += m["replayed"]
            counts["closed as too slow (1013)"] += m["slowClosed"]
            counts["closed as stale (heartbeat)"] += health["heartbeat"]["staleClosed"]
            counts["duplicates"] += m["duplicates"]
            counts["published"] += m["published"]
        counts["server processes"] = len(self.health)
        return counts


def _dump(path: Path, events: list[list[Any]]) -> None:
    with open(path, "w") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")


def _output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


def summary(result: Result, max_shown: int = 10) -> str:
    """What a run did and found, for people."""
    cfg = result.config
    lines = [f"chaos {cfg.backplane}: seed {cfg.seed}, {result.duration:.1f} s "
             f"({cfg.seconds:.0f} s of faults), workdir {result.workdir}"]
    kinds = Counter(f.kind for f in result.faults)
    lines.append("faults: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    lines.append("publishes: " + ", ".join(f"{k} {n}" for k, n in
                                           sorted(result.publisher_counts.items())))
    lines.append("server: " + ", ".join(f"{k} {n}" for k, n in
                                        sorted(result.server_counts.items())))
    counts = result.report.counts
    checked = {k: v for k, v in counts.items() if not k.startswith("violations")}
    lines.append("clients: " + ", ".join(f"{k} {n}" for k, n in sorted(checked.items())))
    violations = result.report.violations
    rules = Counter(v.rule for v in violations)
    lines.append(f"violations: {len(violations)}"
                 + (" (" + ", ".join(f"{r} {n}" for r, n in sorted(rules.items())) + ")"
                    if rules else ""))
    shown: Counter[str] = Counter()
    for v in violations:
        if shown[v.rule] < max_shown:
            lines.append(str(v))
        shown[v.rule] += 1
    if violations:
        lines.append("faults (t from the start):")
        lines += [f"  t={f.start - result.t0:8.3f}..{f.end - result.t0:8.3f} {f.kind:<8} "
                  f"{f.target:<7} {f.note}" for f in result.faults]
    idle = [f"{f.kind} {f.target}" for f in result.faults if not f.effect]
    if idle:
        lines.append("faults without their effect (timing; the invariant was still checked): "
                     + ", ".join(idle))
    return "\n".join(lines)


async def run_chaos(config: Config, redis: RedisControl | None = None) -> Result:
    """One chaos run (the test calls this with its own redis-server)."""
    return await Harness(config, redis).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="of faults and publishing, in all (split between backplanes)")
    parser.add_argument("--seed", type=int, help="random when not given (printed)")
    parser.add_argument("--backplane", choices=("memory", "redis", "both"), default="both")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=200.0, help="publishes a second")
    parser.add_argument("--bounded", action="store_true", help="each fault kind once")
    args = parser.parse_args(argv)
    backplanes = ["memory", "redis"] if args.backplane == "both" else [args.backplane]
    seconds = args.minutes * 60 / len(backplanes)
    failed = False
    for backplane in backplanes:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        log(f"== {backplane}: seed {seed} (rerun: python -m bench.chaos --backplane {backplane} "
            f"--seed {seed} --minutes {seconds / 60:g})")
        config = Config(backplane=backplane, seconds=seconds, seed=seed, clients=args.clients,
                        rate=args.rate, bounded=args.bounded)
        result = asyncio.run(run_chaos(config))
        log(summary(result))
        failed = failed or not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
