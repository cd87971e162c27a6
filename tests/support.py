"""Test helpers shared by every test module: a tether server process and log reading."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m tether serve` in a subprocess, its JSON log captured to a file.

    Started with PORT=0 unless a port is given; `port` is read from `Server ready`.
    Stopped by SIGINT to its own PID only.
    """

    def __init__(self, env: dict[str, str] | None = None, log_path: Path | None = None,
                 args: list[str] | None = None, script: str | None = None) -> None:
        self.env = {**os.environ, "PORT": "0", "LOG_LEVEL": "debug", **(env or {})}
        OUTPUT.mkdir(exist_ok=True)
        self.log_path = log_path or OUTPUT / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
        self.args = args or []
        self.script = script
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 15.0) -> ServerProcess:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._offset = self.log_path.stat().st_size
        cmd = [sys.executable, "-c", self.script] if self.script else [
            sys.executable, "-m", "tether", "serve", *self.args]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            if self.env["LOG_LEVEL"].lower() in ("warn", "error"):
                self._wait_listening(timeout)  # `Server ready` is an info line
                return self
            ready = self.wait_for("Server ready", timeout=timeout)
        except BaseException:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self._log_file.close()
            raise
        url = ready["data"]["url"]
        self.port = int(url.rsplit(":", 1)[1])
        return self

    def _wait_listening(self, timeout: float) -> None:
        """Wait until the port (given: PORT=0 cannot be learnt from the log) accepts."""
        self.port = int(self.env["PORT"])
        assert self.port, "a server logging only warn or error lines needs a fixed PORT"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.02)
        raise AssertionError(f"port {self.port} not listening within {timeout}s")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            for raw in f.read().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(raw))
        return out

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def find(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("message") == message]

    def wait_for(self, message: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(message)
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited ({self.proc.returncode}) before {message!r}:\n{self.text()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {message!r} within {timeout}s:\n{self.text()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT, wait; returns the exit status (kills only this PID if it hangs)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def server_process(**kwargs: Any) -> Iterator[ServerProcess]:
    server = ServerProcess(**kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class RecordingPeer:
    """The hub's Peer interface over a list: the property tests need no sockets."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def in_transport(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    async def close(self, code: int, reason: str, timeout: float, *, read: bool = True) -> None:
        pass

    def messages(self) -> list[dict[str, Any]]:
        out = []
        data = b"".join(self.frames)  # one write may carry several frames
        pos = 0
        while pos < len(data):
            n = data[pos + 1] & 0x7F
            head = 2
            if n == 126:
                n, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            out.append(orjson.loads(data[pos + head : pos + head + n]))
            pos += head + n
        return out
