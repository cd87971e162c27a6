"""EVENT_LOOP: `tether serve` on uvloop or asyncio's own loop, and the suite on the one asked for.

`make test` runs the whole suite twice, with EVENT_LOOP=asyncio and
EVENT_LOOP=uvloop; these tests prove that each run is on the loop it names:
in-process tests (pytest-asyncio, and `tests.aio.run` for the others) and the
servers tests start as processes, which say their loop in `Server ready`.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest
import uvloop

from tests.aio import LOOP, run
from tests.conftest import LogCapture, StartTether
from tests.redis_server import RedisServer
from tests.support import ROOT, ServerProcess
from tether import config, loops
from tether.errors import ConfigError

OTHER = "asyncio" if LOOP == "uvloop" else "uvloop"
# `tether serve` where uvloop is not installed (Windows, PyPy): its import fails.
WITHOUT_UVLOOP = ("import sys; sys.modules['uvloop'] = None\n"
                  "from tether.cli import main\n"
                  "sys.exit(main(['serve']))\n")


def test_event_loop_setting_parses_and_names_the_variable() -> None:
    assert config.load({}).event_loop == "auto"
    assert config.load({"EVENT_LOOP": " UVLoop "}).event_loop == "uvloop"
    assert config.load({"EVENT_LOOP": "uvloop"}, {"EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    assert loops.resolve("auto") == "uvloop"  # installed here: a dependency on CPython/Linux
    with pytest.raises(ConfigError) as err:
        config.load({"EVENT_LOOP": "trio"})
    assert str(err.value) == "EVENT_LOOP must be one of auto, uvloop, asyncio, got 'trio'"


async def test_async_tests_run_on_the_loop_asked_for() -> None:
    loop = asyncio.get_running_loop()
    assert loops.name_of(loop) == LOOP
    assert isinstance(loop, uvloop.Loop) == (LOOP == "uvloop"), type(loop)


def test_tests_without_async_run_on_it_too() -> None:
    async def which() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert isinstance(run(which()), uvloop.Loop) == (LOOP == "uvloop")
    assert isinstance(loops.run(which(), "asyncio"), asyncio.SelectorEventLoop)
    assert isinstance(loops.run(which(), "uvloop"), uvloop.Loop)


async def test_server_ready_names_the_loop_it_runs_on(start_tether: StartTether,
                                                      log_capture: LogCapture) -> None:
    await start_tether()
    assert [r["data"]["loop"] for r in log_capture.find("Server ready")] == [LOOP]


def loop_of(server: ServerProcess) -> str:
    """The loop a server process said it runs on; it is stopped, and must stop cleanly."""
    server.start()
    try:
        loop: str = server.find("Server ready")[0]["data"]["loop"]
    finally:
        assert server.stop() == 0, server.text()  # SIGINT, as handled on that loop
    return loop


def test_server_processes_follow_the_switch_and_the_setting_chooses() -> None:
    assert loop_of(ServerProcess()) == LOOP  # inherits EVENT_LOOP, as every server a test starts
    assert loop_of(ServerProcess(args=["--event-loop", OTHER])) == OTHER  # the flag wins
    assert loop_of(ServerProcess(env={"EVENT_LOOP": "auto"})) == "uvloop"


def test_without_uvloop_auto_is_asyncio_and_uvloop_is_a_config_error() -> None:
    without = ServerProcess(env={"EVENT_LOOP": "auto"}, script=WITHOUT_UVLOOP)
    assert loop_of(without) == "asyncio"
    done = subprocess.run([sys.executable, "-c", WITHOUT_UVLOOP], cwd=ROOT, timeout=30,
                          env={**os.environ, "EVENT_LOOP": "uvloop"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == ("tether: configuration error: EVENT_LOOP is uvloop, which cannot be "
                           "imported here (pip install uvloop; it needs CPython, not Windows), "
                           "or set auto or asyncio\n")


@pytest.mark.redis
def test_each_worker_runs_on_the_chosen_loop(redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url, "LOG_LEVEL": "info"}
    server = ServerProcess(env=env, args=["--workers", "2", "--event-loop", OTHER]).start()
    try:
        server.wait_for("Workers ready")
        ready = server.find("Server ready")
    finally:
        assert server.stop() == 0
    assert [r["data"]["loop"] for r in ready] == [OTHER, OTHER]


def test_no_test_runs_a_loop_of_its_own_choosing() -> None:
    """`asyncio.run` in a test would ignore EVENT_LOOP: tests use `tests.aio.run`."""
    bare = re.compile(r"\basyncio\.run\(|\buvloop\.run\(|\bnew_event_loop\(")
    found = [f"{path.name}:{n}" for path in sorted((ROOT / "tests").rglob("test_*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if bare.search(line) and path.name != "test_loops.py"]
    assert found == []
