"""Test helpers shared by every test module, one per job (`tests/aio.py` has the async ones).

A tether server process and its log (`ServerProcess`), waiting for a condition
(`wait_until`) or a listening port (`wait_listening`), HTTP to a server
(`HttpClient`, `post_event`), and a hub peer that records what it is sent
(`RecordingPeer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import orjson
from multidict import CIMultiDict

from tests.wsraw import frames_in

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
        assert self.proc is not None
        try:
            wait_listening(self.port, self.proc, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.text()}") from None

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
        """The `count`-th log line with `message`, once logged (fails if the server exits)."""
        def logged() -> bool:
            if len(self.find(message)) >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited ({self.proc.returncode}) before {message!r}:\n{self.text()}"
                )
            return False

        if not wait_until(logged, timeout, interval=0.02):
            raise AssertionError(f"no {message!r} within {timeout}s:\n{self.text()[-4000:]}")
        return self.find(message)[count - 1]

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


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, *,
               interval: float = 0.01) -> bool:
    """Whether `predicate` holds within `timeout` seconds, polled each `interval`.

    Returns as soon as it holds; after the timeout, its last answer. Use it as
    `assert wait_until(...), "what did not happen"`; `tests.aio.eventually` is
    the same for async tests (and async predicates).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float,
                   interval: float = 0.02) -> None:
    """Until something accepts on 127.0.0.1:`port`; fails at once if `proc` exits first."""
    def accepts() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before listening")
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", port), timeout=0.5):
            return True
        return False

    if not wait_until(accepts, timeout, interval=interval):
        raise AssertionError(f"port {port} not listening within {timeout}s")


class Reply(NamedTuple):
    """A server's answer to an HTTP request: status, JSON body, headers (any case)."""

    status: int
    body: Any
    headers: Mapping[str, str]


class HttpClient:
    """Blocking HTTP/1.1 to a server on one keep-alive connection.

    The connection is opened again after a reply that closes it (`Connection:
    close`), so a refused request does not end the client.
    """

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.timeout = timeout
        self.conn = HTTPConnection(self.host, self.port, timeout=timeout)

    def post_event(self, event: bytes | Any, headers: Mapping[str, str] | None = None) -> Reply:
        """POST /event: bytes as they are, anything else as JSON; the reply must be JSON."""
        data = event if isinstance(event, bytes) else orjson.dumps(event)
        return self.request("POST", "/event", data,
                            {"Content-Type": "application/json", **(headers or {})})

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).body

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        self.conn.request(method, path, body=body, headers=dict(headers or {}))
        r = self.conn.getresponse()
        data = r.read()
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = HTTPConnection(self.host, self.port, timeout=self.timeout)
        return Reply(r.status, json.loads(data), CIMultiDict(r.getheaders()))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def post_event(base_url: str, event: bytes | Any, *, headers: Mapping[str, str] | None = None,
               timeout: float = 5.0) -> Reply:
    """One POST /event on a connection of its own (`HttpClient.post_event`)."""
    with HttpClient(base_url, timeout) as http:
        return http.post_event(event, headers)


def publish(base_url: str, event: Any) -> dict[str, Any]:
    """`post_event` that must be accepted (202): the reply, with the event's topic and seq."""
    reply = post_event(base_url, event)
    assert reply.status == 202, reply
    body: dict[str, Any] = reply.body
    return body


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
        """The JSON of every frame written to it."""
        return [orjson.loads(f.payload) for f in frames_in(b"".join(self.frames))]
