"""Fixtures: an in-process tether on a free 127.0.0.1 port, with settings per test, and Redis.

Every test runs on the event loop EVENT_LOOP names (tests/aio.py: LOOP): async
tests through pytest-asyncio's loop factory hook, and every `tether serve` a
test starts through the environment it inherits. `make test` runs the suite on
both loops at once; their `slow` tests take turns (`one_slow_test_at_a_time`).
"""

from __future__ import annotations

import fcntl
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest

from tests.aio import LOOP
from tests.redis_server import RedisServer, running_redis
from tests.support import OUTPUT
from tether import logs, loops
from tether.app import Tether
from tether.config import Settings

os.environ["EVENT_LOOP"] = LOOP  # `auto` resolved: child servers run on the same loop


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, loops.LoopFactory]:
    """The one loop async tests run on (one factory: test ids stay as they are)."""
    return {LOOP: loops.factory(LOOP)}


def pytest_report_header(config: pytest.Config) -> str:
    return f"event loop: {LOOP} (EVENT_LOOP)"


@pytest.fixture(autouse=True)
def one_slow_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """A `slow` test waits until no other pytest of this checkout runs one.

    The slow tests load the machine (floods, chaos, Autobahn, the benchmark) and
    measure time; `make test` runs the suite on both loops at once, and two of them
    side by side on two cores would measure each other. A lock on a file, so it
    holds across processes and is let go if one dies.
    """
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    OUTPUT.mkdir(exist_ok=True)
    with open(OUTPUT / ".slow-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class LogCapture(io.StringIO):
    """The JSON log lines written while a test runs."""

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines() if line.strip()]

    def find(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["message"] == message]


@pytest.fixture
def log_capture() -> LogCapture:
    stream = LogCapture()
    logs.setup("debug", stream)
    return stream


StartTether = Callable[..., Awaitable[Tether]]


@pytest.fixture
async def start_tether(log_capture: LogCapture) -> AsyncIterator[StartTether]:
    """`await start_tether(heartbeat_interval_ms=200, ...)` → a started Tether on port 0."""
    started: list[Tether] = []

    async def start(**overrides: Any) -> Tether:
        fields = {"port": 0, "host": "127.0.0.1", "log_level": "debug", **overrides}
        t = Tether(Settings(**fields))
        await t.start()
        started.append(t)
        return t

    yield start
    for t in started:
        await t.stop("test-end")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for a module's tests: each test uses keys of its own."""
    with running_redis() as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone: it starts empty and may be stopped and started."""
    with running_redis() as server:
        yield server
