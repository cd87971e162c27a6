"""Fixtures: an in-process tether on a free 127.0.0.1 port, with settings per test, and Redis."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest

from tests.redis_server import RedisServer, running_redis
from tether import logs
from tether.app import Tether
from tether.config import Settings


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
