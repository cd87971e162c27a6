"""A real `redis-server` for the tests: started as a subprocess, stopped by its PID.

The server listens on a free TCP port of 127.0.0.1 (so that a test can stop it
and start it again on the same port, as an outage does) with persistence off:
a restart loses every key, like a Redis without AOF that crashes. With
`password`, it requires it (`requirepass`) and `url` carries it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support import ROOT, free_port, wait_until


class RedisServer:
    """One redis-server process; `url` is what REDIS_URL takes."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="tether-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.password is not None:
            return f"redis://:{self.password}@127.0.0.1:{self.port}"
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 5.0) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (apt-get install -y redis-server)"
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--unixsocket", str(self.dir / "redis.sock"), "--unixsocketperm", "700",
                 "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                 *(["--requirepass", self.password] if self.password is not None else [])],
                stdout=log, stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")
                raise AssertionError(f"redis-server exited ({proc.returncode}):\n{log}")
            return self.ping()

        if not wait_until(ready, timeout):
            raise AssertionError(f"redis-server not ready on port {self.port} within {timeout}s")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password is not None:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    if not s.recv(16).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to this server's PID only, and wait for it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL to this server's PID only (`kill -9`: no goodbye to its clients)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(password=password).start()
    try:
        yield server
    finally:
        server.close()


def serve_without_redis(
    extra_env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """`tether serve` pointed at a Redis port where nothing listens; runs to its exit."""
    env = {**os.environ, "PORT": "0", "LOG_LEVEL": "info",
           "REDIS_URL": f"redis://127.0.0.1:{free_port()}", **extra_env}
    return subprocess.run([sys.executable, "-m", "tether", "serve"], env=env, cwd=ROOT,
                          capture_output=True, timeout=timeout)
