"""`tether watch` and `tether publish` as the user runs them: subprocesses against real servers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import OUTPUT, ROOT, ServerProcess, free_port, wait_until

# The CLI reads these as defaults; the tests say what they mean explicitly.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PUBLISH_TOKEN", "TETHER_URL")}


def tether(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], env=CLEAN_ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class WatchProcess:
    """`tether watch` in a subprocess; its stdout lines read from a file as they come."""

    def __init__(self, *args: str) -> None:
        OUTPUT.mkdir(exist_ok=True)
        self.path = OUTPUT / f"watch-{os.getpid()}-{time.monotonic_ns()}.out"
        self._out = open(self.path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "watch", *args], env=CLEAN_ENV, cwd=ROOT,
            stdout=self._out, stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[str]:
        return Path(self.path).read_text(errors="replace").splitlines()

    def events(self, word: str) -> list[str]:
        """Lines whose event (the word after the timestamp) is `word`."""
        return [line for line in self.lines() if line.split(" ", 2)[1:2] == [word]]

    def wait_for(self, word: str, count: int = 1, timeout: float = 10.0) -> str:
        if not wait_until(lambda: len(self.events(word)) >= count or self.proc.poll() is not None,
                          timeout):
            raise AssertionError(f"no {count}x {word!r} in {timeout}s:\n" + "\n".join(self.lines()))
        found = self.events(word)
        assert len(found) >= count, "\n".join(self.lines())
        return found[count - 1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return int(self.proc.returncode)


def post(server: ServerProcess, event: str, *args: str) -> subprocess.CompletedProcess[str]:
    return tether("publish", "--url", server.url, *args, event)


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerProcess]:
    server = ServerProcess(env={"WS_MAX_MESSAGE": "1024"}).start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------- tether watch


def test_watch_prints_messages_and_rtt_reconnects_after_restart_and_resumes() -> None:
    server = ServerProcess().start()
    watch = WatchProcess(server.url, "--topics", "a", "--ping-interval", "0.2",
                         "--backoff", "0.2", "--count", "3")
    try:
        watch.wait_for("connected")
        assert post(server, '{"type":"one"}', "--topic", "a").returncode == 0
        first = json.loads(watch.wait_for("message").split(" ", 2)[2])
        assert first == {"type": "one", "topic": "a", "seq": 1}
        rtt = watch.wait_for("rtt")
        assert " ms, up " in rtt

        port = server.port
        assert server.stop() == 0
        down = watch.wait_for("disconnected")
        assert "1001" in down and "after" in down
        watch.wait_for("reconnecting")
        server = ServerProcess(env={"PORT": str(port)}).start()
        watch.wait_for("connected", count=2)
        # The restarted server is another epoch of the history: every position watch
        # held (topic a, and the broadcast topic it was told at connect) gets a resync.
        watch.wait_for("resync", count=2)
        resyncs = "\n".join(watch.events("resync"))
        assert "topic=a seq=0" in resyncs and "topic=* seq=0" in resyncs
        assert post(server, '{"type":"two"}', "--topic", "a").returncode == 0
        assert post(server, '{"type":"three"}', "--topic", "b").returncode == 0  # not watched
        assert post(server, '{"type":"four"}').returncode == 0  # topic *: everyone
        assert watch.proc.wait(10) == 0  # --count 3 reached
        messages = [json.loads(line.split(" ", 2)[2]) for line in watch.events("message")]
        assert [(m["type"], m["seq"]) for m in messages] == [("one", 1), ("two", 1), ("four", 1)]
        summary = watch.lines()[-1]
        counts = re.search(r"stopped: 3 messages, 2 resyncs, (\d+) attempts, 2 connected, "
                           r"(\d+) failed, 1 disconnects, longest connection", summary)
        assert counts, summary  # attempts while the server was down failed: counted as such
        assert int(counts[1]) == int(counts[2]) + 2 == len(watch.events("connecting"))
        # Every line is timestamped (a tunnel probe's log).
        assert all(line[:4].isdigit() and line[10] == "T" for line in watch.lines())
    finally:
        watch.stop()
        server.stop()


def test_watch_exits_cleanly_on_ctrl_c(small_server: ServerProcess) -> None:
    watch = WatchProcess(small_server.url.replace("http", "ws") + "/ws")
    try:
        watch.wait_for("connected")
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(10) == 0
        assert watch.lines()[-1].split(" ", 1)[1].startswith("stopped: 0 messages")
        assert "Traceback" not in "\n".join(watch.lines())
    finally:
        watch.stop()


def test_watch_rejects_a_url_that_is_not_websocket() -> None:
    result = tether("watch", "ftp://127.0.0.1:1/")
    assert result.returncode == 2
    assert "tether watch:" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- tether publish


def test_publish_success_prints_the_reply(small_server: ServerProcess) -> None:
    result = post(small_server, '{"type":"note","payload":{"x":1}}', "--topic", "t",
                  "--priority", "high")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"accepted": True, "topic": "t", "seq": 1}


def test_publish_bad_event_is_400(small_server: ServerProcess) -> None:
    result = post(small_server, '{"payload":1}')  # no "type"
    assert result.returncode == 1
    assert "refused with HTTP 400" in result.stderr and "type" in result.stderr
    assert result.stdout == ""


def test_publish_body_over_max_message_is_413(small_server: ServerProcess) -> None:
    big = json.dumps({"type": "big", "payload": "x" * 2000})
    result = post(small_server, big)
    assert result.returncode == 1
    assert "refused with HTTP 413" in result.stderr and "WS_MAX_MESSAGE" in result.stderr


def test_publish_without_or_with_a_wrong_token_is_401() -> None:
    with ServerProcess(env={"PUBLISH_TOKEN": "s3cret"}) as server:
        missing = post(server, '{"type":"x"}')
        wrong = post(server, '{"type":"x"}', "--token", "guess")
        right = post(server, '{"type":"x"}', "--token", "s3cret")
    for result in (missing, wrong):
        assert result.returncode == 1
        assert "refused with HTTP 401" in result.stderr and "token" in result.stderr
    assert right.returncode == 0 and json.loads(right.stdout)["seq"] == 1


def test_publish_to_a_port_with_nothing_listening_fails_clearly() -> None:
    port = free_port()
    result = tether("publish", "--url", f"http://127.0.0.1:{port}", '{"type":"x"}')
    assert result.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_publish_rejects_invalid_json_before_sending() -> None:
    result = tether("publish", "--url", "http://127.0.0.1:1", "{not json")
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr
