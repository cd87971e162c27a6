"""RFC 6455 conformance: the Autobahn|Testsuite cases (run by `kosoku`) against tether.

The server under test is `tests/autobahn_echo.py`, an echo application built only
from tether's public API, so the cases exercise tether's own frame writing, its
ping/pong handling (`Hub.client_ping`) and its close handling. A bare aiohttp echo
server (`tests/aiohttp_echo.py`) is measured in the same run: a case may fail for
tether only if it fails the same way for aiohttp (the parser is aiohttp's), and
none does.
Compression cases (12.*, 13.*) are excluded: tether turns permessage-deflate off.
Reports: test-output/autobahn/{tether,aiohttp}/index.html.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support import OUTPUT, ROOT, free_port, wait_listening

KOSOKU = Path(sys.executable).parent / "kosoku"
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
REPORTS = OUTPUT / "autobahn"


def run_suite(name: str, script: str) -> tuple[dict[str, dict[str, Any]], int, str]:
    """Start `script` on a free port, run the cases against it, stop it by its PID.

    Returns the per-case results from the report's index.json, the echo server's
    exit status, and what it wrote to stdout/stderr.
    """
    port = free_port()
    outdir = REPORTS / name
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    log_path = outdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / script), str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_listening(port, proc, timeout=15.0, interval=0.05)
            run = subprocess.run(
                [str(KOSOKU), f"ws://127.0.0.1:{port}/ws", "-x", "12.*", "-x", "13.*",
                 "-p", "1", "-o", str(outdir)],
                capture_output=True, timeout=180, cwd=outdir, check=False,
            )
            (outdir / "kosoku.out").write_bytes(run.stdout + run.stderr)
            assert run.returncode in (0, 1), run.stderr.decode(errors="replace")[-2000:]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    index = json.loads((outdir / "index.json").read_text())
    (results,) = index.values()  # one agent per report
    return results, proc.returncode, log_path.read_text(errors="replace")


def _reason(name: str, case: str, result: dict[str, Any]) -> str:
    detail = json.loads((REPORTS / name / result["reportfile"]).read_text())
    return f"{detail.get('description', '')}: {detail.get('result', '')}"


def _counts(results: dict[str, dict[str, Any]]) -> str:
    c = Counter(r["behavior"] for r in results.values())
    return (f"OK {c['OK']} / NON-STRICT {c['NON-STRICT']} / INFORMATIONAL {c['INFORMATIONAL']}"
            f" / FAILED {len(results) - c['OK'] - c['NON-STRICT'] - c['INFORMATIONAL']}"
            f" (of {len(results)})")


@pytest.mark.slow
def test_autobahn_cases_pass_or_fail_only_as_bare_aiohttp_does() -> None:
    assert KOSOKU.exists(), "kosoku is in the dev extra: pip install -e '.[dev]'"
    tether, tether_exit, tether_log = run_suite("tether", "autobahn_echo.py")
    aiohttp, _, _ = run_suite("aiohttp", "aiohttp_echo.py")

    assert len(tether) > 250 and tether.keys() == aiohttp.keys()
    failed = {k: r for k, r in tether.items() if r["behavior"] not in PASSING}
    baseline = {k: r for k, r in aiohttp.items() if r["behavior"] not in PASSING}
    both = sorted(failed.keys() & baseline.keys())
    lines = [f"tether:  {_counts(tether)}", f"aiohttp: {_counts(aiohttp)}"]
    lines += [f"fails for both: {case}: {_reason('tether', case, failed[case])}" for case in both]
    summary = "\n".join(lines)
    (REPORTS / "summary.txt").write_text(summary + "\n")
    print("\n" + summary)

    only_tether = {
        k: (r["behavior"], r["behaviorClose"], _reason("tether", k, r))
        for k, r in failed.items()
        if k not in baseline
        or (r["behavior"], r["behaviorClose"])
        != (baseline[k]["behavior"], baseline[k]["behaviorClose"])
    }
    assert not only_tether, f"cases tether fails and bare aiohttp does not:\n{only_tether}"
    # tether answers a close code no endpoint may send (7.9.*: 1004-1006, 1015-2999,
    # 5000+) with 1002 itself, so it fails no case, not even 7.9.5 (code 1006),
    # which aiohttp's parser accepts.
    assert not failed, {k: _reason("tether", k, r) for k, r in failed.items()}
    # The echo application ran clean: no error logged, and SIGINT shut it down with 0.
    assert '"level":"error"' not in tether_log.replace(" ", ""), tether_log[-3000:]
    assert tether_exit == 0, tether_log[-3000:]
