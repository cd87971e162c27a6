"""`python -m bench --profile`: where tether's server CPU goes during B and C (py-spy).

py-spy samples the tether server process from outside (no change to it) while
the load generator drives the B (idle heartbeat) and C (fan-out) workloads. Raw
stacks go to `results/profile-{B,C}.raw.txt`; the summary (self time and
inclusive time per function, line numbers folded) is printed and written to
`results/profile-{B,C}.txt`.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.measure import Config, connect, loadgen, port_of, server, wait_count

RESULTS = Path(__file__).resolve().parent / "results"
_LINE = re.compile(r":\d+\)$")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    return found


def record(pid: int, out: Path, duration: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [_py_spy(), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--output", str(out), "--duration", str(duration), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def summarize(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")[2:]]  # drop process, thread
        if not frames:
            continue
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"{raw.name}: {total} samples of CPU-busy stacks", "", "self time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top + 15)]
    return "\n".join(out)


def profile(cfg: Config) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw_b, raw_c = RESULTS / "profile-B.raw.txt", RESULTS / "profile-C.raw.txt"
    print(f"B: {cfg.idle} idle tether clients, I = {cfg.interval:g}s", flush=True)
    with server("tether", cfg.interval, cfg.missed, cfg.tether_uvloop) as srv, \
            loadgen(port_of(srv)) as gen:
        connect(gen, cfg.idle)
        wait_count(srv, cfg.idle, timeout=60)
        time.sleep(2 * cfg.interval)
        spy = record(srv.pid, raw_b, max(5, round(cfg.rounds * cfg.interval * 2)))
        spy.wait(120)
    print(f"C: {cfg.c_clients} clients × {cfg.c_messages} messages", flush=True)
    with server("tether", 30.0, cfg.missed, cfg.tether_uvloop) as srv, \
            loadgen(port_of(srv)) as gen:
        connect(gen, cfg.c_clients)
        n = wait_count(srv, cfg.c_clients)
        gen.request("expect", "armed", total=n * cfg.c_messages, idle=3.0, timeout=600)
        spy = record(srv.pid, raw_c, 600)
        time.sleep(1.0)  # py-spy attached
        srv.request("broadcast", "published", timeout=600, count=cfg.c_messages)
        gen.wait_event("received", 600)
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        spy.wait(60)
    for raw, name in ((raw_b, "B"), (raw_c, "C")):
        if not raw.exists():
            print(f"{name}: py-spy wrote nothing")
            continue
        text = summarize(raw)
        (RESULTS / f"profile-{name}.txt").write_text(text + "\n")
        print(f"\n== {name}\n{text}")
    return 0
