"""The scale run over two workers on one Redis (issue 17): `tether serve --workers N`.

A redis-server, then `tether serve --workers N` on its backplane (I = 30 s), then
38,000 idle clients from load generators bound to distinct loopback source
addresses (one address gives ~28,000 ephemeral ports; one process 20,000 open
files). Per worker — the supervisor's children — it reads the kernel's numbers:
heartbeat CPU over the window as % of a core (/proc/PID/stat), RSS
(/proc/PID/statm), and the clients it holds (its ESTABLISHED sockets on the
port: /proc/net/tcp joined with its open files, whatever tether's own views
say). Then a few ~100-byte broadcasts through `POST /event`: publish → the last
of all deliveries, CLOCK_MONOTONIC across processes as in the 19,000-client run.

Every process is stopped by its own PID on the way out, on an error too: the load
generators, the supervisor (SIGTERM: it stops its workers), any worker still
alive after that, and redis-server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.chaos_procs import RedisProcess
from bench.measure import Config, loadgen
from bench.proc import Child, cpu_seconds, rss_bytes
from bench.servers.common import PAD

# Issue 17's targets for 38,000 clients over 2 workers.
TARGET_CPU_PCT = 5.0  # each worker's heartbeat, % of a core
TARGET_RSS_MB = 400.0  # the whole server: supervisor and workers
TARGET_MEDIAN_MS = 250.0  # publish → last delivery, median
FILES_PER_LOADGEN = 19_900  # of the 20,000 a process may open, some stay for the process itself

# `python -c EXEC_TETHER ARGS`: lift the open-file limit to the hard limit (the workers
# inherit it), then exec `python -m tether ARGS` in the same process, so the PID the
# bench holds is the supervisor's own.
EXEC_TETHER = ("import os, sys; from bench.proc import raise_nofile; raise_nofile(); "
               "os.execv(sys.executable, [sys.executable, '-m', 'tether', *sys.argv[1:]])")
TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"  # states in /proc/net/tcp (include/net/tcp_states.h)


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (the workers of a supervisor)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(proc_stat(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
    return sorted(out)


def started(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot): tells a PID from its reuse."""
    try:
        return int(proc_stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets `pid` holds open."""
    out = set()
    fds = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for name in os.listdir(fds):
            with contextlib.suppress(OSError):
                link = os.readlink(f"{fds}/{name}")
                if link.startswith("socket:["):
                    out.add(link[8:-1])
    return out


def tcp_table() -> dict[str, tuple[int, str]]:
    """Every IPv4 TCP socket of this network namespace: inode → (local port, state)."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            out[parts[9]] = (int(parts[1].rsplit(":", 1)[1], 16), parts[3])
    return out


def listening_port(pid: int, table: dict[str, tuple[int, str]]) -> int | None:
    for inode in socket_inodes(pid):
        port, state = table.get(inode, (0, ""))
        if state == TCP_LISTEN:
            return port
    return None


def held(pids: list[int], port: int) -> list[int]:
    """Per PID, its ESTABLISHED TCP connections on local `port`: the clients it holds."""
    table = tcp_table()
    return [sum(1 for inode in socket_inodes(pid) if table.get(inode) == (port, TCP_ESTABLISHED))
            for pid in pids]


def event_loop(pid: int) -> str:
    """uvloop when its extension is mapped into `pid`, else asyncio (its own loop); ? if gone."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "uvloop" if "/uvloop/loop." in f.read() else "asyncio"
    except OSError:
        return "?"


def wait_workers(sup: Child, n: int, timeout: float) -> tuple[list[int], int]:
    """The `n` worker PIDs once each listens, and the port they share."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = sup.proc.poll()
        if code is not None:
            tail = "\n".join(sup.stderr[-20:] + [json.dumps(x) for x in sup.log[-10:]])
            raise RuntimeError(f"tether serve --workers {n} exited with {code}\n{tail}")
        kids = children(sup.pid)
        if len(kids) == n:
            table = tcp_table()
            ports = {listening_port(pid, table) for pid in kids}
            if len(ports) == 1 and None not in ports:
                return kids, int(ports.pop() or 0)
        time.sleep(0.1)
    raise RuntimeError(f"tether serve --workers {n}: workers not listening within {timeout:.0f}s")


def stop_tether(sup: Child, known: list[int]) -> None:
    """SIGTERM to the supervisor (it stops its workers); then any worker left, by PID."""
    workers = {pid: started(pid) for pid in {*known, *children(sup.pid)}}
    sup.stop(timeout=30)
    deadline = time.monotonic() + 15  # a worker stops itself once its supervisor is gone
    for pid, start in workers.items():
        while start is not None and started(pid) == start and time.monotonic() < deadline:
            time.sleep(0.1)
        if start is not None and started(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def publish(port: int, token: str, i: int) -> float:
    """POST one ~100-byte event; the CLOCK_MONOTONIC instant just before it was sent."""
    body = json.dumps({"type": "tick", "payload": {"i": i, "pad": PAD}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.connect()  # the TCP handshake is not the publish
        t0 = time.monotonic()
        conn.request("POST", "/event", body, {"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        reply = conn.getresponse()
        text = reply.read()
    finally:
        conn.close()
    if reply.status != 202:
        raise RuntimeError(f"POST /event answered {reply.status}: {text[:200]!r}")
    return t0


def tether_env(redis_url: str, interval: float, missed: int, token: str) -> dict[str, str]:
    """What a bench needs of `tether serve`: no per-address cap (every client is from
    127.0.0.x), room for all of them, a publish token, and quiet logs."""
    return {
        "HOST": "127.0.0.1",
        "PORT": "0",
        "LOG_LEVEL": "warn",
        "REDIS_URL": redis_url,
        "PUBLISH_TOKEN": token,
        "WS_HEARTBEAT_INTERVAL": str(round(interval * 1000)),
        "WS_HEARTBEAT_MISSED": str(missed),
        "WS_MAX_CONNECTIONS": "1000000",
        "WS_MAX_PER_ADDRESS": "0",
    }


def measure_workers_scale(cfg: Config) -> dict[str, Any]:
    """Idle clients over `tether serve --workers N` on one Redis: per-worker CPU, RSS, clients,
    and publish → last delivery of a broadcast to every client."""
    n, clients = cfg.workers_scale_workers, cfg.workers_scale_clients
    gens_n = max(cfg.workers_scale_loadgens, -(-clients // FILES_PER_LOADGEN))
    parts = [clients // gens_n + (1 if i < clients % gens_n else 0) for i in range(gens_n)]
    token = secrets.token_hex(16)
    known: list[int] = []
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp, ExitStack() as stack:
        redis = RedisProcess(Path(tmp)).start()
        stack.callback(redis.close)
        sup = Child(["-c", EXEC_TETHER, "serve", "--workers", str(n)], "tether-workers",
                    env=tether_env(redis.url, cfg.scale_interval, cfg.missed, token))
        stack.callback(stop_tether, sup, known)
        pids, port = wait_workers(sup, n, 60)
        known += pids
        starts = [started(pid) for pid in pids]
        gens = [stack.enter_context(loadgen(port, f"loadgen-{i + 1}", f"127.0.0.{i + 2}"))
                for i in range(gens_n)]

        t0 = time.monotonic()
        for gen, part in zip(gens, parts, strict=True):
            gen.send("connect", n=part, concurrency=100)
        connected = [gen.wait_event("connected", 120 + part / 50)
                     for gen, part in zip(gens, parts, strict=True)]
        ok = [int(r["ok"]) for r in connected]
        failed = sum(int(r["failed"]) for r in connected)
        if failed:
            errors = [e for r in connected for e in r["errors"]][:3]
            print(f"    ! {failed} of {clients} connections failed: {errors}", flush=True)
        count = wait_held(pids, port, sum(ok), timeout=60)
        connect_s = time.monotonic() - t0

        time.sleep(2.0)
        procs = [*pids, sup.pid, redis_pid(redis), *(g.pid for g in gens)]
        c0, w0 = [cpu_seconds(p) for p in procs], time.monotonic()
        time.sleep(cfg.workers_scale_window)
        c1, w1 = [cpu_seconds(p) for p in procs], time.monotonic()
        pct = [(b - a) / (w1 - w0) * 100 for a, b in zip(c0, c1, strict=True)]
        rss = [rss_bytes(p) / 1e6 for p in (*pids, sup.pid, redis_pid(redis))]

        latencies: list[float] = []
        firsts: list[float] = []
        delivered: list[int] = []
        busy = [0.0] * len(procs)  # CPU seconds of each process while broadcasts were in flight
        for i in range(cfg.scale_broadcasts):
            for gen, want in zip(gens, ok, strict=True):
                gen.request("expect", "armed", total=want, idle=2.0, timeout=30)
            b0 = [cpu_seconds(p) for p in procs]
            sent = publish(port, token, i)
            got = [gen.wait_event("received", 60) for gen in gens]
            b1 = [cpu_seconds(p) for p in procs]
            busy = [t + b - a for t, a, b in zip(busy, b0, b1, strict=True)]
            last = max(float(r["last"]) for r in got)
            latencies.append((last - sent) * 1000)
            first = min((float(r["first"]) for r in got if int(r["count"])), default=sent)
            firsts.append((first - sent) * 1000)
            delivered.append(sum(int(r["count"]) for r in got))
            time.sleep(0.5)
        # Share of a core each process was busy from publish to last delivery, over all
        # broadcasts together (/proc counts in 10 ms ticks: one broadcast is too short).
        share = [c * 1000 / max(1.0, sum(latencies)) for c in busy]
        end = held(pids, port)
        rss_after = sum(rss_bytes(p) for p in (*pids, sup.pid)) / 1e6
        restarted = [started(pid) != s for pid, s in zip(pids, starts, strict=True)]
        loops = [event_loop(pid) for pid in pids]
    return {
        "workers": [
            {"pid": pid, "clients": count[i], "clients_end": end[i],
             "heartbeat_cpu_pct": pct[i], "rss_mb": rss[i], "event_loop": loop,
             "restarted": restarted[i], "busy_in_broadcasts": share[i]}
            for i, (pid, loop) in enumerate(zip(pids, loops, strict=True))
        ],
        "supervisor_pid": sup.pid,
        "redis_pid": procs[n + 1],
        "loadgen_pids": procs[n + 2 :],
        "clients": sum(count),
        "clients_asked": clients,
        "connect_failed": failed,
        "connect_s": connect_s,
        "interval_s": cfg.scale_interval,
        "window_s": w1 - w0,
        "supervisor_cpu_pct": pct[n],
        "supervisor_rss_mb": rss[n],
        "workers_rss_mb": sum(rss[:n]),
        "rss_total_mb": sum(rss[: n + 1]),
        "rss_total_after_broadcasts_mb": rss_after,
        "redis_cpu_pct": pct[n + 1],
        "redis_rss_mb": rss[n + 1],
        "loadgens": parts,
        "loadgen_cpu_pct": pct[n + 2 :],
        "loadgen_busy_in_broadcasts": share[n + 2 :],
        "redis_busy_in_broadcasts": share[n + 1],
        "broadcast_latency_ms": latencies,
        "broadcast_latency_median_ms": statistics.median(latencies) if latencies else 0.0,
        "broadcast_first_ms": firsts,  # publish → the first delivery anywhere
        "delivered": delivered,
    }


def redis_pid(redis: RedisProcess) -> int:
    assert redis.proc is not None
    return redis.proc.pid


def wait_held(pids: list[int], port: int, want: int, timeout: float,
              stall: float = 5.0) -> list[int]:
    """Clients held per worker once they add up to `want`, or stop growing for `stall` s."""
    deadline = time.monotonic() + timeout
    best, best_at = -1, time.monotonic()
    while True:
        count = held(pids, port)
        total = sum(count)
        if total >= want or time.monotonic() > deadline:
            return count
        if total > best:
            best, best_at = total, time.monotonic()
        elif time.monotonic() - best_at > stall:
            return count
        time.sleep(0.2)


def verdicts(s: dict[str, Any]) -> list[str]:
    """Issue 17's three targets, each beside its number."""
    cpu = max(w["heartbeat_cpu_pct"] for w in s["workers"])
    ok = all(d == s["clients"] for d in s["delivered"])
    return [
        f"each worker's heartbeat < {TARGET_CPU_PCT:g}% of a core: max {cpu:.2f}% "
        f"{'HOLDS' if cpu < TARGET_CPU_PCT else 'MISSED'}",
        f"RSS < {TARGET_RSS_MB:g} MB in all: {s['rss_total_mb']:.0f} MB (workers "
        f"{s['workers_rss_mb']:.0f} + supervisor {s['supervisor_rss_mb']:.0f}) "
        f"{'HOLDS' if s['rss_total_mb'] < TARGET_RSS_MB else 'MISSED'}",
        f"broadcast → last delivery median < {TARGET_MEDIAN_MS:g} ms: "
        f"{s['broadcast_latency_median_ms']:.0f} ms "
        f"{'HOLDS' if ok and s['broadcast_latency_median_ms'] < TARGET_MEDIAN_MS else 'MISSED'}"
        + ("" if ok else " (not every client got every broadcast)"),
    ]


def render(s: dict[str, Any]) -> str:
    """The run as text: a per-worker table, the broadcasts, the targets."""
    lines = [
        f"workers scale: {s['clients']:,} idle clients over {len(s['workers'])} workers on one "
        f"Redis (I = {s['interval_s']:g}s; asked {s['clients_asked']:,}, connected in "
        f"{s['connect_s']:.0f}s, load generators {', '.join(f'{p:,}' for p in s['loadgens'])})",
        "",
        "| worker | clients held | heartbeat CPU, % of a core | RSS | loop | busy in broadcasts |",
        "|---|---|---|---|---|---|",
    ]
    for i, w in enumerate(s["workers"]):
        end = "" if w["clients_end"] == w["clients"] else f" ({w['clients_end']:,} at the end)"
        restart = " (restarted!)" if w["restarted"] else ""
        lines.append(f"| {i} (pid {w['pid']}){restart} | {w['clients']:,}{end} | "
                     f"{w['heartbeat_cpu_pct']:.2f} % | {w['rss_mb']:.0f} MB | "
                     f"{w['event_loop']} | {100 * w['busy_in_broadcasts']:.0f} % |")
    lines.append(f"| all workers | {s['clients']:,} | "
                 f"{sum(w['heartbeat_cpu_pct'] for w in s['workers']):.2f} % | "
                 f"{s['workers_rss_mb']:.0f} MB | | |")
    lines.append(f"| supervisor | | {s['supervisor_cpu_pct']:.2f} % | "
                 f"{s['supervisor_rss_mb']:.0f} MB | | |")
    lines.append(f"| in all | | | {s['rss_total_mb']:.0f} MB "
                 f"({s['rss_total_after_broadcasts_mb']:.0f} MB after the broadcasts) | | |")
    lines += [
        "",
        f"window {s['window_s']:.0f}s; redis-server {s['redis_cpu_pct']:.2f} % of a core, "
        f"{s['redis_rss_mb']:.0f} MB; load generators "
        + ", ".join(f"{p:.2f} %" for p in s["loadgen_cpu_pct"]),
        "broadcasts, POST /event → last delivery: "
        + ", ".join(f"{x:.0f}" for x in s["broadcast_latency_ms"])
        + f" ms (median {s['broadcast_latency_median_ms']:.0f} ms); → first delivery: "
        + ", ".join(f"{x:.0f}" for x in s["broadcast_first_ms"]) + " ms",
        "delivered " + ", ".join(f"{d:,}" for d in s["delivered"])
        + "; busy from publish to last delivery, share of a core: load generators "
        + ", ".join(f"{100 * b:.0f} %" for b in s["loadgen_busy_in_broadcasts"])
        + f", redis-server {100 * s['redis_busy_in_broadcasts']:.0f} %",
        "",
        *verdicts(s),
    ]
    return "\n".join(lines)
