"""The processes of the chaos test (`bench/chaos.py`): redis-server, tether nodes, clients.

Each is started on 127.0.0.1 and stopped or killed by its own PID only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.proc import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisControl(Protocol):
    """A redis-server the harness may kill and start again on the same port."""

    @property
    def url(self) -> str: ...

    def kill(self) -> None: ...

    def start(self) -> object: ...


class RedisProcess:
    """redis-server on a fixed port of 127.0.0.1, no persistence: a restart loses every key."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
        with open(self.dir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--save", "", "--appendonly", "no"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL to this redis-server's PID only."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Node:
    """One `tether serve` process on a fixed port; stopped or killed by its PID only."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = {**os.environ, **env, "PORT": str(self.port)}
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "tether", "serve"], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    async def start(self, timeout: float = 20.0) -> None:
        self.proc = self._spawn()
        self.lives += 1
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); "
                                       f"see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(self.url + "/health",
                                           timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.02)
        raise RuntimeError(f"{self.name} not ready within {timeout} s; see {self.log_path}")

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT (tether's clean shutdown) and wait; SIGKILL if it hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL (`kill -9`) to this node's PID only."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ProcessClient:
    """A ChaosClient in a process of its own (`python -m bench.chaos_client`), for SIGSTOP.

    Commands go to its stdin, its answers (JSON lines) come on its stdout, read by
    a thread; its stderr goes to a file of the workdir.
    """

    def __init__(self, name: str, urls: list[str], topics: list[str], seed: int,
                 workdir: Path) -> None:
        self.name = name
        self.topics = topics
        self.out = workdir / f"{name}.events"
        with open(workdir / f"{name}.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.chaos_client", "--name", name,
                 "--urls", ",".join(urls), "--topics", ",".join(topics), "--seed", str(seed),
                 "--out", str(self.out)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.stopped = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(raw))

    def send(self, cmd: str, **data: Any) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write((json.dumps({"cmd": cmd, **data}) + "\n").encode())
            self.proc.stdin.flush()

    def _wait(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=min(left, 0.5))
                if line.get("ev") == event:
                    return line
            if self.proc.poll() is not None and self.lines.empty():
                break
        raise RuntimeError(f"{self.name}: no {event!r} within {timeout:.0f} s")

    async def state(self) -> dict[str, Any]:
        self.send("state")
        return await asyncio.to_thread(self._wait, "state", 10.0)

    def suspend(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    async def finish(self) -> list[list[Any]]:
        """Tell it to quit; the events it recorded."""
        if self.stopped:
            self.resume()
        self.send("quit")
        await asyncio.to_thread(self._wait, "done", 30.0)
        await asyncio.to_thread(self.proc.wait, 10)
        return await asyncio.to_thread(self._read_events)

    def _read_events(self) -> list[list[Any]]:
        with open(self.out) as f:
            return [json.loads(line) for line in f]

    def kill(self) -> None:
        """SIGKILL to this client's PID only (if it still runs), and close its pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self.reader.join(5)  # its stdout ends with the process
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
