"""Runs the browser client's unit tests (tests/js, Node's built-in test runner) under pytest."""

from __future__ import annotations

import shutil
import subprocess

from tests.support import ROOT


def test_tether_js_unit_tests_pass() -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed for tests/js (Debian package nodejs)"
    result = subprocess.run(
        [node, "--test", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "# fail 0" in report, report
    passed = [line for line in report.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[-1].split()[-1]) >= 20, report
