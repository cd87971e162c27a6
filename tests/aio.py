"""Async test helpers, one per job: the loop tests run on, wait for a condition, POST /event.

Their blocking twins live in `tests/support.py` (`wait_until`, `post_event`) and
answer the same way, for tests that run without an event loop. A forgotten
`await` fails the test: the coroutine never awaited is a warning, and pytest
runs with warnings as errors.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from tests.support import Reply
from tether import loops

Predicate = Callable[[], bool | Awaitable[bool]]
T = TypeVar("T")

# The loop every test runs on, `uvloop` or `asyncio`, chosen as `tether serve` chooses it:
# EVENT_LOOP (auto: uvloop where it imports). `make test` runs the suite once on each.
# conftest.py gives it to pytest-asyncio and exports it to every server a test starts.
LOOP = loops.resolve(loops.parse(os.environ.get("EVENT_LOOP", "auto")))


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop of this test run (LOOP), for a test that is not async."""
    return loops.run(main, LOOP)


async def eventually(predicate: Predicate, timeout: float = 5.0, *,
                     interval: float = 0.01) -> bool:
    """Whether `predicate` (plain or async) holds within `timeout` seconds, polled each `interval`.

    Returns as soon as it holds; after the timeout, its last answer. Use it as
    `assert await eventually(...), "what did not happen"`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await _holds(predicate):
            return True
        await asyncio.sleep(interval)
    return await _holds(predicate)


async def _holds(predicate: Predicate) -> bool:
    answer = predicate()
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


async def post_event(base_url: str, event: bytes | Any, *,
                     headers: Mapping[str, str] | None = None,
                     session: aiohttp.ClientSession | None = None) -> Reply:
    """POST `event` (bytes as they are, anything else as JSON) to `base_url`/event.

    Sent as `application/json` unless `headers` say otherwise; the reply must be
    JSON (aiohttp checks its Content-Type). Without a `session`, a new one.
    """
    data = event if isinstance(event, bytes) else orjson.dumps(event)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await post_event(base_url, data, headers=sent, session=own)
    async with session.post(f"{base_url}/event", data=data, headers=sent) as r:
        return Reply(r.status, await r.json(), r.headers)


async def serve_event_route(handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
                            ) -> tuple[web.AppRunner, str]:
    """A stand-in whose `POST /event` is `handle`, on a free 127.0.0.1 port: (runner, url)."""
    app = web.Application()
    app.router.add_post("/event", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
