"""The four measurements of issue 8 (A–D) and the scale check, one server process each.

Every function starts its own server and load generator, measures, and stops
both (by PID). Times that cross processes are CLOCK_MONOTONIC (`time.monotonic`
is system-wide on Linux) or wall-clock seconds where a log line is the source.

Bun (`bench/servers/bun_server.ts`) is an optional reference server: it runs only
when its binary is installed under bench/bun (`npm install --prefix bench/bun`).
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bench.proc import ROOT, Child

# The default list. `tether` runs on asyncio's own loop and `tether-uvloop` on uvloop,
# side by side in one run, so both are read as ratios to the same websockets run.
SERVERS = ("websockets", "aiohttp", "picows", "tether", "tether-uvloop")
OPTIONAL_SERVERS = ("bun", "floor")  # reference servers run only when asked for by name
KNOWN_SERVERS = SERVERS + OPTIONAL_SERVERS
TETHERS = ("tether", "tether-uvloop")

BUN_DIR = ROOT / "bench" / "bun"
BUN_SCRIPT = ROOT / "bench" / "servers" / "bun_server.ts"
# Where `npm install --prefix bench/bun` leaves the binary (the .bin link, or the file).
BUN_CANDIDATES = (BUN_DIR / "node_modules" / ".bin" / "bun",
                  BUN_DIR / "node_modules" / "bun" / "bin" / "bun.exe")
# Child runs `python ARGS`: this lifts the open-file limit, then execs bun in the same
# process, so the PID the suite measures (CPU, RSS, signals) is bun's own.
EXEC_BUN = ("import os, sys; from bench.proc import raise_nofile; raise_nofile(); "
            "os.execv(sys.argv[1], sys.argv[1:])")


@dataclass
class Config:
    servers: tuple[str, ...] = SERVERS
    runs: int = 3
    interval: float = 1.0  # I for A, B and D
    missed: int = 2  # K (tether; the peers have no such setting)
    idle: int = 10_000  # A and B
    rounds: int = 5  # B window, in heartbeat rounds
    c_clients: int = 1_000
    c_messages: int = 2_000
    d_clients: int = 100
    scale: bool = True
    scale_clients: int = 19_000
    scale_interval: float = 30.0
    scale_window: float = 60.0
    scale_broadcasts: int = 5
    scale_servers: tuple[str, ...] = ("tether",)
    # The scale run over `tether serve --workers N` on one Redis (bench/workers_scale.py).
    workers_scale: bool = True
    workers_scale_workers: int = 2
    workers_scale_clients: int = 38_000
    workers_scale_window: float = 60.0
    workers_scale_loadgens: int = 2  # 20,000 open files each: at least clients / 19,900
    tether_uvloop: bool = False  # --profile only: profile tether on uvloop
    quick: bool = False

    @classmethod
    def make_quick(cls) -> Config:
        return cls(runs=1, idle=500, rounds=1, c_clients=200, c_messages=200, d_clients=20,
                   scale=False, workers_scale=False, quick=True)


def bun_binary() -> str | None:
    """The bun binary installed for the bench under bench/bun, or None."""
    for path in BUN_CANDIDATES:
        if path.is_file() and path.stat().st_size > 1_000_000:  # not npm's placeholder
            return str(path)
    return None


def bun_version() -> str | None:
    binary = bun_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextmanager
def server(name: str, interval: float, missed: int, uvloop: bool = False) -> Iterator[Child]:
    opts = ["--interval", str(interval), "--missed", str(missed)]
    if name == "bun":
        binary = bun_binary()
        if binary is None:
            raise RuntimeError("bun is not installed for the bench: npm install --prefix bench/bun")
        args = ["-c", EXEC_BUN, binary, str(BUN_SCRIPT), *opts]
    else:
        script = "tether" if name in TETHERS else name
        args = ["-m", f"bench.servers.{script}_server", *opts]
    if uvloop or name == "tether-uvloop":
        args.append("--uvloop")
    child = Child(args, name)
    try:
        child.wait_event("ready", 30)
        yield child
    finally:
        child.stop()


@contextmanager
def loadgen(port: int, tag: str = "loadgen", source: str | None = None) -> Iterator[Child]:
    args = ["-m", "bench.loadgen", "--url", f"ws://127.0.0.1:{port}/ws"]
    if source:
        args += ["--source", source]
    child = Child(args, tag)
    try:
        child.wait_event("ready", 30)
        yield child
    finally:
        child.stop()


def port_of(child: Child) -> int:
    ready = next(line for line in child.log if line.get("ev") == "ready")
    return int(ready["port"])


def ping_period(child: Child, interval: float) -> float:
    """Seconds between two pings to a client: I, unless the server announced otherwise.

    Bun's keepalive runs on 4 s timer ticks: at I = 1 s it pings every 4 s, at
    I = 30 s every 28 s, and says so in its "ready" line.
    """
    ready = next(line for line in child.log if line.get("ev") == "ready")
    return float(ready.get("ping_period", interval))


def connect(gen: Child, n: int) -> dict[str, Any]:
    reply = gen.request("connect", "connected", timeout=60 + n / 50, n=n, concurrency=100)
    if reply["failed"]:
        print(f"    ! {reply['failed']} of {n} connections failed: {reply['errors']}", flush=True)
    return reply


def wait_count(srv: Child, n: int, timeout: float = 30.0, stall: float = 5.0) -> int:
    """Until the server itself counts `n` clients, or the count stops growing for `stall` s.

    (aiohttp's heartbeat drops healthy clients whose pong is later than I/2 while it
    is busy accepting thousands of handshakes: its count may never reach `n`.)
    """
    deadline = time.monotonic() + timeout
    best, best_at = -1, time.monotonic()
    seen = 0
    while time.monotonic() < deadline:
        seen = int(srv.request("count", "count", timeout=30)["n"])
        if seen >= n:
            return seen
        if seen > best:
            best, best_at = seen, time.monotonic()
        elif time.monotonic() - best_at > stall:
            break
        time.sleep(0.2)
    return seen


def gc_seconds(srv: Child) -> float:
    """Seconds the server process has spent in Python's cyclic GC so far."""
    return float(sum(srv.request("gc", "gc", timeout=30)["seconds"]))


def measure_ab(name: str, cfg: Config) -> dict[str, float]:
    """A: RSS delta per idle connection; B: server CPU per heartbeat round per 10k clients."""
    warm = 20
    with server(name, cfg.interval, cfg.missed) as srv, \
            loadgen(port_of(srv)) as gen:
        connect(gen, warm)  # first connections load code paths; not counted
        wait_count(srv, warm)
        time.sleep(0.5)
        rss0 = srv.rss()
        connect(gen, cfg.idle)
        n = wait_count(srv, warm + cfg.idle, timeout=60) - warm
        period = ping_period(srv, cfg.interval)  # I; Bun: its 4 s-tick period
        time.sleep(max(2 * period, 1.0))  # every client in its ping cycle
        gc0 = gc_seconds(srv)
        c0, g0, t0 = srv.cpu(), gen.cpu(), time.monotonic()
        time.sleep(cfg.rounds * period)
        c1, g1, t1 = srv.cpu(), gen.cpu(), time.monotonic()
        gc1 = gc_seconds(srv)
        rss1 = srv.rss()
        alive = int(srv.request("count", "count", timeout=30)["n"]) - warm
        rounds = (t1 - t0) / period
        per_10k = 1000 * 10_000 / max(1, (n + alive) / 2) / rounds  # ms per round per 10k
        return {
            "connections": n,
            "connections_end": alive,
            "A_bytes_per_conn": (rss1 - rss0) / max(1, n),
            "B_cpu_ms_per_round_10k": (c1 - c0) * per_10k,
            "B_loadgen_cpu_ms_per_round_10k": (g1 - g0) * per_10k,
            "B_gc_ms_per_round_10k": (gc1 - gc0) * per_10k,
            "B_ping_period_s": period,
        }


def measure_c(name: str, cfg: Config) -> dict[str, float]:
    """C: server CPU and rate for c_clients × c_messages ~100-byte deliveries."""
    # I = 30 s: the keepalive stays on but no heartbeat round falls in the window.
    with server(name, 30.0, cfg.missed) as srv, \
            loadgen(port_of(srv)) as gen:
        connect(gen, cfg.c_clients)
        n = wait_count(srv, cfg.c_clients)
        time.sleep(0.5)
        total = n * cfg.c_messages
        gen.request("expect", "armed", total=total, idle=3.0, timeout=600)
        c0, g0 = srv.cpu(), gen.cpu()
        published = srv.request("broadcast", "published", timeout=600, count=cfg.c_messages)
        got = gen.wait_event("received", 600)
        c1, g1 = srv.cpu(), gen.cpu()
        count = int(got["count"])
        elapsed = max(1e-9, float(got["last"]) - float(published["t0"]))
        cpu = c1 - c0
        return {
            "C_deliveries": count,
            "C_expected": total,
            "C_cpu_s": cpu,
            "C_cpu_s_per_2M": cpu * 2_000_000 / max(1, count),
            "C_us_per_delivery": cpu * 1e6 / max(1, count),
            "C_deliveries_per_s": count / elapsed,
            "C_loadgen_cpu_s": g1 - g0,
            "C_loadgen_busy": (g1 - g0) / elapsed,  # fraction of one core
        }


def _stale_times(srv: Child, name: str) -> list[float]:
    """Wall-clock instants at which the server closed a connection, from its own output."""
    if name in TETHERS:
        return [
            datetime.fromisoformat(line["timestamp"]).timestamp()
            for line in srv.log
            if line.get("message") == "Closing stale connection"
        ]
    return [float(line["wall"]) for line in srv.log if line.get("ev") == "closed"]


def measure_d(name: str, cfg: Config) -> dict[str, Any]:
    """D: SIGSTOP the client process; how long until the server closed each connection."""
    with server(name, cfg.interval, cfg.missed) as srv, \
            loadgen(port_of(srv)) as gen:
        connect(gen, cfg.d_clients)
        n = wait_count(srv, cfg.d_clients)
        time.sleep(3 * cfg.interval)  # pings and pongs flowing
        before = len(_stale_times(srv, name))
        stopped_at = time.time()
        gen.signal(signal.SIGSTOP)
        try:
            # Long enough for websockets' 10 s close timeout after its ping timeout.
            deadline = time.monotonic() + 10 * cfg.interval + 15
            while time.monotonic() < deadline:
                if len(_stale_times(srv, name)) - before >= n:
                    break
                time.sleep(0.05)
        finally:
            gen.signal(signal.SIGCONT)
        delays = sorted(t - stopped_at for t in _stale_times(srv, name)[before:])
        lo, hi = cfg.missed * cfg.interval, (cfg.missed + 1) * cfg.interval
        return {
            "D_clients": n,
            "D_closed": len(delays),
            "D_median_s": statistics.median(delays) if delays else float("nan"),
            "D_min_s": delays[0] if delays else float("nan"),
            "D_max_s": delays[-1] if delays else float("nan"),
            "D_in_bound": sum(1 for d in delays if lo <= d <= hi),
            "D_early": sum(1 for d in delays if d < lo),
        }


def measure_scale(cfg: Config, name: str = "tether") -> dict[str, Any]:
    """19,000 idle clients of `name`, I = 30 s: heartbeat CPU, and one broadcast's latency."""
    half = cfg.scale_clients // 2
    parts = (half, cfg.scale_clients - half)  # two generators: 20,000 open files each
    with server(name, cfg.scale_interval, cfg.missed) as srv, \
            loadgen(port_of(srv), "loadgen-1") as g1, loadgen(port_of(srv), "loadgen-2") as g2:
        t0 = time.monotonic()
        g1.send("connect", n=parts[0], concurrency=100)
        g2.send("connect", n=parts[1], concurrency=100)
        r1 = g1.wait_event("connected", 600)
        r2 = g2.wait_event("connected", 600)
        n = wait_count(srv, cfg.scale_clients, timeout=60)
        connect_s = time.monotonic() - t0
        rss = srv.rss()
        time.sleep(2.0)
        gc0 = gc_seconds(srv)
        c0, w0 = srv.cpu(), time.monotonic()
        time.sleep(cfg.scale_window)
        c1, w1 = srv.cpu(), time.monotonic()
        gc1 = gc_seconds(srv)
        latencies = []
        delivered = []
        for _ in range(cfg.scale_broadcasts):
            g1.request("expect", "armed", total=r1["ok"], idle=2.0, timeout=30)
            g2.request("expect", "armed", total=r2["ok"], idle=2.0, timeout=30)
            pub = srv.request("broadcast", "published", count=1)
            a = g1.wait_event("received", 60)
            b = g2.wait_event("received", 60)
            latencies.append(max(float(a["last"]), float(b["last"])) - float(pub["t0"]))
            delivered.append(int(a["count"]) + int(b["count"]))
            time.sleep(0.5)
        return {
            "server": name,
            "clients": n,
            "ping_period_s": ping_period(srv, cfg.scale_interval),
            "connect_s": connect_s,
            "rss_mb": rss / 1e6,
            "heartbeat_cpu_pct": (c1 - c0) / (w1 - w0) * 100,
            "window_s": w1 - w0,
            "gc_cpu_pct": (gc1 - gc0) / (w1 - w0) * 100,
            "broadcast_latency_ms": [x * 1000 for x in latencies],
            "broadcast_latency_median_ms": statistics.median(latencies) * 1000,
            "delivered": delivered,
        }
