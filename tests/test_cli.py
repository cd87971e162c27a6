"""The `tether` command as a user meets it: --help, URLs, honest counts, a port that is taken.

Subprocesses against real servers; each "cannot listen" case binds the port
itself first (only 127.0.0.1, or an address of TEST-NET-1 that is on no machine).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support import ROOT, ServerProcess, free_port
from tests.test_watch_publish import CLEAN_ENV, WatchProcess, tether
from tether import config
from tether.app import Tether
from tether.cli import build_parser
from tether.config import Settings
from tether.errors import ListenError

NOT_HERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): an address of no machine, never routed


def flat(text: str) -> str:
    """argparse wraps help lines: one space between words."""
    return " ".join(text.split())


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds, listening."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield int(sock.getsockname()[1])


def serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # stdout and stderr in one stream, in order: the user's terminal.
    return subprocess.run([sys.executable, "-m", "tether", "serve", *args],
                          env={**CLEAN_ENV, "LOG_FORMAT": "json", **env}, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


def one_error_line(result: subprocess.CompletedProcess[str], message: str) -> str:
    """The run's only output line, which must be `message` at level error; its `error` data."""
    assert result.returncode == 2, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    line = json.loads(lines[0])
    assert (line["level"], line["message"]) == ("error", message), line
    error: str = line["data"]["error"]
    return error


# ---------------------------------------------------------------- --help


def test_serve_help_names_every_variable_and_its_default_from_settings() -> None:
    result = tether("serve", "--help")
    assert result.returncode == 0
    shown = flat(result.stdout)
    defaults = Settings()
    for option in config.OPTIONS:
        expected = config.default_text(option)
        assert f"(env {option.env}; default {expected})" in shown, option.env
        value = getattr(defaults, option.field)
        if value not in (None, ()):
            assert expected == str(value)
    assert "(env PORT; default 4011)" in shown and "(env HOST; default 127.0.0.1)" in shown
    assert "(env REDIS_URL; default unset)" in shown


def test_publish_and_bench_help_say_what_comes_from_the_environment() -> None:
    env = {**CLEAN_ENV, "PUBLISH_TOKEN": "do-not-show-me", "TETHER_URL": "http://secret.example"}
    for command in ("publish", "bench"):
        result = subprocess.run([sys.executable, "-m", "tether", command, "--help"], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
        shown = flat(result.stdout)
        assert "(env TETHER_URL; default http://localhost:4011)" in shown, command
        assert "(env PUBLISH_TOKEN; default unset)" in shown, command
        assert "do-not-show-me" not in shown and "secret.example" not in shown
    every = flat(tether("publish", "--help").stdout + tether("watch", "--help").stdout)
    assert every.count("--ca-file PATH PEM file of the CA") == 2
    assert "(env TETHER_TOKEN; default unset)" in every


def test_every_option_of_every_command_says_its_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and ("default" in action.help or "required" in action.help), (
                    name, action.option_strings)


# ---------------------------------------------------------------- publish's URL


def test_publish_takes_the_servers_ws_url_too() -> None:
    with ServerProcess() as server:
        for url in (server.ws_url, f"ws://127.0.0.1:{server.port}", f"{server.url}/",
                    f"{server.url}/event"):
            result = tether("publish", "--url", url, '{"type":"x"}')
            assert result.returncode == 0, (url, result.stderr)
        assert server.find("Publish refused") == []
    bad = tether("publish", "--url", "ftp://127.0.0.1:1/", '{"type":"x"}')
    assert bad.returncode == 2 and bad.stderr.startswith("tether publish: --url not an http(s)")


# ---------------------------------------------------------------- watch counts honestly


def test_watch_with_the_server_down_counts_attempts_and_failures() -> None:
    watch = WatchProcess(f"ws://127.0.0.1:{free_port()}/ws", "--backoff", "0.05")
    try:
        watch.wait_for("attempt", count=3)
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(10) == 0
    finally:
        watch.stop()
    attempts = len(watch.events("connecting"))
    failed = len([line for line in watch.events("attempt") if " failed: " in line])
    assert attempts >= 3 and failed >= 3
    summary = watch.lines()[-1].split(" ", 1)[1]
    assert summary == f"stopped: 0 messages, never connected: {attempts} attempts, {failed} failed"
    assert "reconnects" not in "\n".join(watch.lines())
    numbered = [line.split(" ", 1)[1] for line in watch.events("connecting")]
    assert numbered[:3] == ["connecting (attempt 1)", "connecting (attempt 2)",
                            "connecting (attempt 3)"]


# ---------------------------------------------------------------- a port or address that fails


def test_serve_on_a_busy_port_is_one_line_and_exit_2(busy_port: int) -> None:
    error = one_error_line(serve("--port", str(busy_port)), "Cannot listen")
    assert error == f"port {busy_port} is already in use (another server?)"


def test_serve_on_an_address_not_of_this_machine_is_one_line_and_exit_2() -> None:
    error = one_error_line(serve(HOST=NOT_HERE, PUBLISH_TOKEN="t", PORT="0"), "Cannot listen")
    assert error == f"HOST {NOT_HERE} is not an address of this machine"


def test_workers_on_a_busy_port_or_bad_address_is_one_line_and_exit_2(busy_port: int) -> None:
    # The parent finds it before any worker starts (REDIS_URL is never contacted).
    redis = {"REDIS_URL": "redis://127.0.0.1:1/0"}
    error = one_error_line(serve("--workers", "2", "--port", str(busy_port), **redis),
                           "Cannot listen")
    assert error == f"port {busy_port} is already in use (another server?)"
    error = one_error_line(serve("--workers", "2", HOST=NOT_HERE, PUBLISH_TOKEN="t", **redis),
                           "Cannot listen")
    assert error == f"HOST {NOT_HERE} is not an address of this machine"


async def test_tether_start_raises_a_clear_listen_error(busy_port: int) -> None:
    t = Tether(Settings(port=busy_port))
    with pytest.raises(ListenError) as err:
        await t.start()
    assert str(err.value) == (f"cannot listen on 127.0.0.1:{busy_port}: "
                              f"port {busy_port} is already in use (another server?)")
    assert isinstance(err.value, OSError)  # what `except OSError` around start() caught before
    assert isinstance(err.value.__cause__, OSError)
    await t.stop("test-end")  # nothing was left running; stopping is harmless

    unresolvable = Tether(Settings(host="no-such-host.invalid", publish_token="t", port=0))
    with pytest.raises(ListenError) as err:
        await unresolvable.start()
    assert err.value.reason.startswith(
        "HOST 'no-such-host.invalid' is not an IP address or a name that resolves")
