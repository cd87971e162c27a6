"""The benchmark code runs and produces numbers (issue 8); timings are not asserted.

`python -m bench --quick` drives a real tether server process with the load
generator, and `tether bench` runs against a tether server process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import StartTether
from tests.support import ROOT, ServerProcess

pytest.importorskip("picows", reason="the bench extra is not installed: pip install -e '.[bench]'")


@pytest.mark.slow  # its load generator and server take both cores for ~13 s
def test_quick_suite_measures_tether(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--servers", "tether", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| A memory per idle connection |" in proc.stdout
    report = json.loads(out.read_text())
    got = report["results"]["tether"]
    assert got["connections"] == [500.0]
    for key in ("A_bytes_per_conn", "B_cpu_ms_per_round_10k", "C_cpu_s", "C_deliveries_per_s"):
        assert len(got[key]) == 1 and math.isfinite(got[key][0]), key
    assert got["C_deliveries"] == got["C_expected"] == [200.0 * 200]
    assert got["D_closed"] == got["D_clients"] == [20.0]
    assert "scale" not in report


def test_tether_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    from tether.cli import main

    env = {"WS_HEARTBEAT_INTERVAL": "200", "LOG_LEVEL": "info"}
    with ServerProcess(env=env) as server:
        status = main(["bench", "--url", server.url, "--connections", "20", "--messages", "10",
                       "--rtt-wait", "5"])
    out = capsys.readouterr().out
    assert status == 0
    assert "20 clients" in out
    assert "200/200" in out  # every burst delivery arrived
    for row in ("heartbeat RTT ms (server)", "app ping→pong RTT ms", "publish→last delivery ms",
                "deliveries per second"):
        assert row in out


async def test_run_bench_in_process(start_tether: StartTether) -> None:
    from tether.benchtool import percentiles, render, run_bench, summary

    t = await start_tether(heartbeat_interval_ms=100)
    result = await run_bench(f"http://127.0.0.1:{t.port}/ws", 5, 3, rtt_wait=2.0)
    data = summary(result)
    assert data["connections"] == 5 and data["failed"] == 0
    assert data["deliveries"] == 15
    assert set(data["heartbeat_rtt_ms"]) == {"p50", "p90", "p99", "max"}
    assert len(result.publish_latency_ms) == 3
    assert render(result).row_count == 6
    assert percentiles([]) == {}
    assert percentiles([3.0, 1.0, 2.0])["p50"] == 2.0


def test_tether_runs_on_both_loops() -> None:
    from bench.measure import server
    from bench.workers_scale import event_loop

    with server("tether", 1.0, 2) as plain, server("tether-uvloop", 1.0, 2) as fast:
        loops = [next(x["loop"] for x in s.log if x.get("ev") == "ready") for s in (plain, fast)]
        mapped = [event_loop(plain.pid), event_loop(fast.pid)]
    assert loops[0].startswith("asyncio.")
    assert loops[1].startswith("uvloop.")
    assert mapped == ["asyncio", "uvloop"]  # how the workers scale run tells a worker's loop
    assert event_loop(fast.pid) == "?"  # stopped


def test_workers_scale_run(tmp_path: Path) -> None:
    """The two-worker scale run in small: redis-server, `tether serve --workers 2`, 40 clients."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--workers-scale-only", "--workers-scale-clients", "40",
         "--workers-scale-window", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| worker | clients held |" in proc.stdout
    assert "broadcast → last delivery median < 250 ms" in proc.stdout
    report = json.loads(out.read_text())
    assert "results" not in report and "scale" not in report  # this run only
    s = report["workers_scale"]
    workers = s["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    # Both workers hold clients (the kernel spreads them), and together every one.
    assert all(w["clients"] > 0 for w in workers), workers
    assert s["clients"] == sum(w["clients"] for w in workers) == 40
    assert [w["clients_end"] for w in workers] == [w["clients"] for w in workers]
    assert not any(w["restarted"] for w in workers)
    assert {w["event_loop"] for w in workers} <= {"asyncio", "uvloop"}  # read while they ran
    assert all(w["rss_mb"] > 10 and math.isfinite(w["heartbeat_cpu_pct"]) for w in workers)
    assert s["rss_total_mb"] == pytest.approx(s["workers_rss_mb"] + s["supervisor_rss_mb"])
    assert s["delivered"] == [40] * 5  # every broadcast reached every client over both workers
    assert all(0 < ms < 5_000 for ms in s["broadcast_latency_ms"])
    # Every process the run started is gone: workers, supervisor, redis-server, load generators.
    pids = [*(w["pid"] for w in workers), s["supervisor_pid"], s["redis_pid"], *s["loadgen_pids"]]
    assert len(pids) == 6
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
