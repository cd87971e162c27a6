"""`python -m bench`: A–D for every server, the scale checks, print the tables, write JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import measure, workers_scale
from bench.measure import KNOWN_SERVERS, SERVERS, TETHERS, Config
from bench.proc import raise_nofile

RESULTS = Path(__file__).resolve().parent / "results"

# (key, label, unit, scale, digits); the robust metrics first.
ROWS: tuple[tuple[str, str, str, float, int], ...] = (
    ("connections_end", "A/B idle clients still connected after B", "", 1, 0),
    ("A_bytes_per_conn", "A memory per idle connection", "KB", 1e-3, 1),
    ("B_cpu_ms_per_round_10k", "B server CPU per heartbeat round per 10k (I=1s)", "ms", 1, 0),
    ("C_cpu_s_per_2M", "C server CPU per 2,000,000 deliveries", "s", 1, 2),
    ("C_us_per_delivery", "C server CPU per delivery", "µs", 1, 2),
    ("C_deliveries_per_s", "C deliveries per second (noisy)", "k/s", 1e-3, 0),
    ("D_median_s", "D median close after SIGSTOP (I=1s, K=2)", "s", 1, 2),
    ("D_max_s", "D last close after SIGSTOP", "s", 1, 2),
    ("B_gc_ms_per_round_10k", "  of which cyclic GC (B)", "ms", 1, 0),
    ("B_loadgen_cpu_ms_per_round_10k", "load generator CPU per round per 10k (B)", "ms", 1, 0),
    ("C_loadgen_busy", "load generator busy during C (share of a core)", "%", 100, 0),
)


def versions(bun: bool = False) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("tether", "websockets", "aiohttp", "picows", "uvloop"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    if bun:
        out["bun"] = measure.bun_version() or "?"
    return out


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg": os.getloadavg()}


def summarize(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean)}


def fmt(v: float, scale: float, digits: int) -> str:
    return "n/a" if math.isnan(v) else f"{v * scale:,.{digits}f}"


def table(results: dict[str, dict[str, list[float]]], servers: Sequence[str]) -> str:
    """One markdown table: median (min–max) and ×ratio against websockets."""
    base = "websockets" if "websockets" in servers else None
    head = "| metric | " + " | ".join(servers) + " |"
    lines = [head, "|---|" + "---|" * len(servers)]
    for key, label, unit, scale, digits in ROWS:
        cells = []
        ref = summarize(results[base].get(key, []))["median"] if base else math.nan
        for name in servers:
            s = summarize(results[name].get(key, []))
            cell = f"{fmt(s['median'], scale, digits)} {unit}".rstrip()
            if s["min"] != s["max"]:
                cell += f" ({fmt(s['min'], scale, digits)}–{fmt(s['max'], scale, digits)})"
            if base and name != base and ref and not math.isnan(ref) and key[0] in "ABC" \
                    and "loadgen" not in key and "gc" not in key:
                cell += f" **{s['median'] / ref:.2f}×**"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # D against its bound, per server, from every run.
    cells = []
    for name in servers:
        closed, clients, inb, early = (
            int(sum(results[name].get(k, [])))
            for k in ("D_closed", "D_clients", "D_in_bound", "D_early")
        )
        cells.append(f"{inb}/{clients} in [K·I, (K+1)·I], {early} early, {closed} closed")
    lines.append("| D closed within bound (all runs) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[str, dict[str, list[float]]], cfg: Config) -> list[str]:
    """Issue 17's A–D targets for each tether in the run (both event loops)."""
    if "websockets" not in results:
        return []

    def median(name: str, key: str) -> float:
        return summarize(results[name].get(key, []))["median"]

    def ratio(name: str, key: str, base: str) -> float:
        b = median(base, key)
        return median(name, key) / b if b else math.nan

    out = []
    for name in (n for n in TETHERS if n in results):
        a = ratio(name, "A_bytes_per_conn", "websockets")
        out.append(f"{name} A: {a:.2f}× websockets (target ≤ 0.5×) "
                   f"{'HOLDS' if a <= 0.5 else 'MISSED'}")
        if "bun" in results:
            b = ratio(name, "B_cpu_ms_per_round_10k", "bun")
            out.append(f"{name} B: {b:.2f}× Bun's CPU per ping round (target ≤ 1.0×; Bun pings "
                       f"every 4 s at I = 1 s, so per round) {'HOLDS' if b <= 1.0 else 'MISSED'}")
        else:
            b = ratio(name, "B_cpu_ms_per_round_10k", "websockets")
            out.append(f"{name} B: {b:.2f}× websockets (the target is against Bun: "
                       "--servers ...,bun)")
        c = ratio(name, "C_us_per_delivery", "websockets")
        out.append(f"{name} C: {c:.2f}× websockets (target: no worse than before)")
        clients = int(sum(results[name].get("D_clients", [])))
        inb = int(sum(results[name].get("D_in_bound", [])))
        out.append(f"{name} D: {inb}/{clients} closed within [{cfg.missed}·I, "
                   f"{cfg.missed + 1}·I] {'HOLDS' if clients and inb == clients else 'MISSED'}")
    return out


def server_list(p: argparse.ArgumentParser, raw: str, option: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in raw.split(",") if s.strip())
    unknown = set(names) - set(KNOWN_SERVERS)
    if unknown:
        p.error(f"{option}: unknown servers: {', '.join(sorted(unknown))}")
    if "bun" in names and measure.bun_binary() is None:
        p.error(f"{option}: bun is not installed for the bench: npm install --prefix bench/bun")
    return names


def parse(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small and fast (< 60 s)")
    p.add_argument("--runs", type=int, help="runs per server (medians over runs; default 3)")
    p.add_argument("--servers", help=f"comma list from {','.join(KNOWN_SERVERS)} "
                   f"(default {','.join(SERVERS)}; bun: npm install --prefix bench/bun)")
    p.add_argument("--idle", type=int, help="idle connections for A and B (default 10000)")
    p.add_argument("--messages", type=int, help="messages in C (default 2000)")
    p.add_argument("--no-scale", action="store_true",
                   help="skip both scale checks (19k on one process, 38k over two workers)")
    p.add_argument("--scale-only", action="store_true", help="only the 19k scale check")
    p.add_argument("--no-workers-scale", action="store_true",
                   help="skip the scale run over two workers")
    p.add_argument("--workers-scale-only", action="store_true",
                   help="only the scale run over two workers (with --scale-only: both scale "
                        "checks, no A–D)")
    p.add_argument("--workers-scale-clients", type=int,
                   help="idle clients over the workers (default 38000)")
    p.add_argument("--workers-scale-window", type=float,
                   help="seconds of per-worker heartbeat CPU (default 60)")
    p.add_argument("--workers-scale-loadgens", type=int,
                   help="load generator processes, each from its own 127.0.0.x (default 2; "
                        "at least clients / 19,900)")
    p.add_argument("--scale-window", type=float, help="seconds of heartbeat CPU (default 60)")
    p.add_argument("--scale-servers", default="tether",
                   help="comma list of servers for the scale check, one after the other "
                        "(default tether)")
    p.add_argument("--tether-uvloop", action="store_true",
                   help="tether-uvloop in place of tether in the server lists, and in --profile "
                        "(the default list has both)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy profile of tether during B and C (no table)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = p.parse_args(argv)
    cfg = Config.make_quick() if args.quick else Config()
    if args.runs:
        cfg.runs = args.runs
    if args.servers:
        cfg.servers = server_list(p, args.servers, "--servers")
    cfg.scale_servers = server_list(p, args.scale_servers, "--scale-servers")
    if args.idle:
        cfg.idle = args.idle
    if args.messages:
        cfg.c_messages = args.messages
    if args.no_scale:
        cfg.scale = cfg.workers_scale = False
    if args.no_workers_scale:
        cfg.workers_scale = False
    if args.scale_window:
        cfg.scale_window = args.scale_window
    if args.workers_scale_clients:
        cfg.workers_scale_clients = args.workers_scale_clients
    if args.workers_scale_window is not None:
        cfg.workers_scale_window = args.workers_scale_window
    if args.workers_scale_loadgens:
        cfg.workers_scale_loadgens = args.workers_scale_loadgens
    if args.tether_uvloop:
        cfg.tether_uvloop = True
        cfg.servers = uvloop_for_tether(cfg.servers)
        cfg.scale_servers = uvloop_for_tether(cfg.scale_servers)
    return cfg, args


def uvloop_for_tether(names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` with tether-uvloop in place of tether (once)."""
    swapped = ("tether-uvloop" if n == "tether" else n for n in names)
    return tuple(dict.fromkeys(swapped))


def run(cfg: Config, out: Path | None, scale_only: bool = False,
        workers_scale_only: bool = False) -> dict[str, Any]:
    """Run the suite; the JSON report (also written to `out`)."""
    raise_nofile()
    started = time.monotonic()
    # --scale-only and --workers-scale-only each pick their run and skip A–D.
    only = scale_only or workers_scale_only
    scaling = scale_only if only else cfg.scale
    workers_scaling = workers_scale_only if only else cfg.workers_scale
    bun = ("bun" in cfg.servers and not only) or ("bun" in cfg.scale_servers and scaling)
    report: dict[str, Any] = {"machine": machine(), "versions": versions(bun),
                              "config": vars(cfg) | {"servers": list(cfg.servers),
                                                     "scale_servers": list(cfg.scale_servers)}}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in cfg.servers}
    if not only:
        for i in range(cfg.runs):
            for name in cfg.servers:
                print(f"run {i + 1}/{cfg.runs} {name}: A/B", end="", flush=True)
                got = measure.measure_ab(name, cfg)
                print(" C", end="", flush=True)
                got |= measure.measure_c(name, cfg)
                print(" D", end="", flush=True)
                got |= measure.measure_d(name, cfg)
                for key, value in got.items():
                    results[name].setdefault(key, []).append(float(value))
                print(f"  ({time.monotonic() - started:.0f}s)", flush=True)
        report["results"] = results
        report["summary"] = {n: {k: summarize(v) for k, v in r.items()}
                             for n, r in results.items()}
        report["table"] = table(results, cfg.servers)
        report["targets"] = targets(results, cfg)
    if scaling:
        by_server: dict[str, Any] = {}
        for name in cfg.scale_servers:
            print(f"scale check: {cfg.scale_clients} {name} clients, "
                  f"I = {cfg.scale_interval:g}s", flush=True)
            by_server[name] = measure.measure_scale(cfg, name)
        if "tether" in by_server:
            report["scale"] = by_server["tether"]  # the targets are tether's
        report["scale_by_server"] = by_server
    if workers_scaling:
        print(f"workers scale: {cfg.workers_scale_clients} tether clients over "
              f"{cfg.workers_scale_workers} workers on one Redis, I = {cfg.scale_interval:g}s",
              flush=True)
        report["workers_scale"] = workers_scale.measure_workers_scale(cfg)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["elapsed_s"] = time.monotonic() - started
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def print_report(report: dict[str, Any], out: Path | None) -> None:
    m, v = report["machine"], report["versions"]
    print()
    print(f"machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, "
          f"load {m['loadavg'][0]:.2f} → {m['loadavg_end'][0]:.2f}; "
          + ", ".join(f"{k} {x}" for k, x in v.items()))
    cfg = report["config"]
    if "table" in report:
        print(f"medians of {cfg['runs']} run(s); A/B {cfg['idle']} idle clients, "
              f"C {cfg['c_clients']} × {cfg['c_messages']}, D {cfg['d_clients']} clients; "
              "bold: ratio to websockets in the same run")
        print()
        print(report["table"])
        print()
        for line in report["targets"]:
            print(line)
    by_server = report.get("scale_by_server")
    if by_server is None and "scale" in report:  # a report from before scale_by_server
        by_server = {"tether": report["scale"]}
    for name, s in (by_server or {}).items():
        print(scale_line(name, s, cfg["scale_interval"]))
    if by_server and len(by_server) > 1:
        print()
        print(scale_table(by_server, cfg["scale_interval"]))
    if "workers_scale" in report:
        print()
        print(workers_scale.render(report["workers_scale"]))
        print()
    print(f"elapsed {report['elapsed_s']:.0f}s" + (f"; JSON: {out}" if out else ""))


def scale_line(name: str, s: dict[str, Any], interval: float) -> str:
    """One server's scale result; tether's line carries the issue's targets."""
    tether = name in TETHERS
    period = float(s.get("ping_period_s", interval))
    pings = "" if period == interval else f", pings every {period:g}s"
    python = name != "bun"  # Bun reports no GC time (JavaScriptCore's GC is not timed)
    gc = f" (cyclic GC {s.get('gc_cpu_pct', math.nan):.2f}%)" if python else ""
    return (f"scale: {s['clients']} idle {name} clients (I = {interval:g}s{pings}): "
            f"heartbeat CPU {s['heartbeat_cpu_pct']:.2f}% of a core over {s['window_s']:.0f}s"
            f"{gc}{' (target < 5%)' if tether else ''}; one broadcast → last delivery median "
            f"{s['broadcast_latency_median_ms']:.1f} ms{' (target < 100 ms)' if tether else ''}, "
            f"delivered {s['delivered']}; RSS {s['rss_mb']:.0f} MB")


def scale_table(by_server: dict[str, dict[str, Any]], interval: float) -> str:
    """The scale results side by side (same load generators for every server)."""
    names = list(by_server)
    rows: list[tuple[str, Any]] = [
        ("idle clients", lambda s: f"{s['clients']:,}"),
        ("ping period", lambda s: f"{float(s.get('ping_period_s', interval)):g} s"),
        ("heartbeat CPU, % of a core", lambda s: f"{s['heartbeat_cpu_pct']:.2f} %"),
        ("broadcast → last delivery, median",
         lambda s: f"{s['broadcast_latency_median_ms']:.1f} ms"),
        ("delivered per broadcast", lambda s: ", ".join(f"{d:,}" for d in s["delivered"])),
        ("server RSS", lambda s: f"{s['rss_mb']:.0f} MB"),
    ]
    lines = ["| scale | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(by_server[n]) for n in names) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse(argv)
    if args.profile:
        from bench.profile import profile

        return profile(cfg)
    report = run(cfg, args.out, args.scale_only, args.workers_scale_only)
    print_report(report, args.out)
    return 0
