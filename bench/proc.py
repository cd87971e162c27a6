"""Process plumbing shared by the suite, the servers and the load generator.

Every benchmark process talks in JSON lines: commands on stdin, events on stdout.
CPU and memory are read from /proc, so they are the kernel's numbers for the
whole process, whatever library it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile() -> int:
    """Lift this process's soft open-file limit to the hard limit; the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid`, from /proc/PID/statm."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def emit(event: str, **data: Any) -> None:
    """One JSON event line on stdout, flushed (the suite reads it through a pipe)."""
    sys.stdout.write(json.dumps({"ev": event, **data}) + "\n")
    sys.stdout.flush()


class Child:
    """A benchmark subprocess: JSON commands in, JSON lines out, read by a thread."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []  # every JSON line, for post-mortem reading
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                line["_t"] = time.time()
                self.log.append(line)
                self.lines.put(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            if len(self.stderr) < 200:
                self.stderr.append(raw.decode(errors="replace").rstrip())

    def send(self, cmd: str, **data: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **data}) + "\n").encode())
        self.proc.stdin.flush()

    def wait_event(self, event: str, timeout: float) -> dict[str, Any]:
        """The next line whose `ev` is `event` (other lines stay in `log`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.get("ev") == event:
                return line
        tail = "\n".join(self.stderr[-20:])
        raise RuntimeError(f"{self.name}: no {event!r} within {timeout:.0f}s\n{tail}")

    def request(self, cmd: str, reply: str, timeout: float = 60.0, **data: Any) -> dict[str, Any]:
        self.send(cmd, **data)
        return self.wait_event(reply, timeout)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGCONT (in case it was stopped), SIGTERM, then SIGKILL: this PID only."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()
