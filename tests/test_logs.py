"""logs.py without a server: the repeat limiter on a manual clock, libraries' records as JSON."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from tests.aio import run
from tether import logs
from tether.clock import ManualClock
from tether.logs import RepeatLimiter, Suppressed

ERROR = logging.ERROR


def test_a_key_writes_its_burst_then_counts_and_reports_once_the_window_is_over() -> None:
    clock = ManualClock()
    limiter = RepeatLimiter(burst=3, window=10.0, clock=clock.now)
    assert [limiter.admit("asyncio", "boom", ERROR) for _ in range(3)] == [(True, [])] * 3
    assert [limiter.admit("asyncio", "boom", ERROR)[0] for _ in range(1000)] == [False] * 1000
    clock.advance(9.999)
    assert limiter.admit("asyncio", "boom", ERROR) == (False, [])  # same window
    assert limiter.due() == []
    clock.advance(0.001)  # the window is over: reported with the next record, whatever it is
    assert limiter.due() == [Suppressed("asyncio", "boom", ERROR, 1001)]
    assert limiter.due() == []  # once
    assert limiter.admit("asyncio", "boom", ERROR) == (True, [])  # a new window, a new burst


def test_the_count_comes_before_the_first_line_of_the_next_window() -> None:
    clock = ManualClock()
    limiter = RepeatLimiter(burst=1, window=1.0, clock=clock.now)
    assert limiter.admit("a", "x", ERROR) == (True, [])
    assert limiter.admit("a", "x", ERROR) == (False, [])
    clock.advance(5)
    assert limiter.admit("a", "x", logging.WARNING) == (True, [Suppressed("a", "x", ERROR, 1)])
    assert limiter.admit("a", "x", ERROR) == (False, [])
    clock.advance(1)
    assert limiter.admit("b", "other", ERROR) == (True, [Suppressed("a", "x", ERROR, 1)])


def test_keys_are_independent_and_drain_reports_every_pending_count() -> None:
    clock = ManualClock()
    limiter = RepeatLimiter(burst=2, window=10.0, clock=clock.now)
    for _ in range(5):
        limiter.admit("aiohttp.server", "Error handling request from %s", ERROR)
        limiter.admit("asyncio", "socket.accept() out of system resource", ERROR)
    assert limiter.admit("asyncio", "another", ERROR)[0]
    assert limiter.admit("aiohttp.web", "Error handling request from %s", ERROR)[0]
    assert sorted(limiter.drain(), key=lambda s: s.logger) == [
        Suppressed("aiohttp.server", "Error handling request from %s", ERROR, 3),
        Suppressed("asyncio", "socket.accept() out of system resource", ERROR, 3)]
    assert limiter.drain() == []


def test_tracked_keys_are_bounded() -> None:
    clock = ManualClock()
    limiter = RepeatLimiter(burst=1, window=1.0, clock=clock.now, max_keys=10)
    for i in range(10):
        limiter.admit("x", str(i), ERROR)
    assert limiter.admit("x", "new", ERROR) == (True, [])  # let through, untracked
    assert limiter.admit("x", "new", ERROR) == (True, [])
    assert limiter.admit("x", "0", ERROR) == (False, [])  # tracked ones still limited
    clock.advance(1)
    limiter.admit("x", "fresh", ERROR)  # ended windows are forgotten to make room
    assert limiter.admit("x", "fresh", ERROR) == (False, [])


# ---- the handler: libraries' records, levels, repeats


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    logs.setup("debug", io.StringIO())


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_libraries_records_are_json_lines_with_the_error_on_one_line() -> None:
    stream = io.StringIO()
    logs.setup("info", stream)
    try:
        raise OSError(24, "Too many open files")
    except OSError as exc:
        # What asyncio's default exception handler writes: several lines and a traceback.
        logging.getLogger("asyncio").error(
            "socket.accept() out of system resource\nsocket: <TransportSocket fd=6>",
            exc_info=exc)
    try:
        raise ValueError("bad\nrequest line")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "1.2.3.4")
    logging.getLogger("aiohttp.web").debug("filtered at info")
    logging.getLogger("aiohttp.access").info("127.0.0.1 GET /health 200")
    logging.getLogger("aiohttp.internal").warning("careful")
    text = stream.getvalue()
    assert "Traceback" not in text and len(text.splitlines()) == 4
    accept, request, access, internal = lines(stream)
    assert accept["module"] == "asyncio" and accept["level"] == "error"
    assert accept["message"] == "socket.accept() out of system resource"
    assert accept["data"] == {"detail": "socket: <TransportSocket fd=6>",
                              "error": "OSError: [Errno 24] Too many open files"}
    assert request["message"] == "Error handling request from 1.2.3.4"
    assert request["data"] == {"error": "ValueError: bad request line"}
    assert (access["module"], internal["module"], internal["level"]) == (
        "aiohttp.access", "aiohttp.internal", "warn")


@pytest.mark.usefixtures("restore_logging")
def test_log_level_filters_libraries_too() -> None:
    stream = io.StringIO()
    logs.setup("error", stream)
    logging.getLogger("asyncio").warning("no")
    logging.getLogger("aiohttp.server").info("no")
    logging.getLogger("aiohttp.server").error("yes")
    assert [x["message"] for x in lines(stream)] == ["yes"]


@pytest.mark.usefixtures("restore_logging")
def test_a_flood_is_a_burst_and_one_count_while_tether_own_lines_all_pass() -> None:
    clock = ManualClock()
    stream = io.StringIO()
    logs.setup("info", stream, RepeatLimiter(burst=5, window=10.0, clock=clock.now))
    server = logging.getLogger("aiohttp.server")
    for i in range(100):
        server.error("Error handling request from %s", f"10.0.0.{i}")
    own = logs.get_logger("heartbeat")
    for _ in range(20):  # an interface: never left out
        own.warn("Closing stale connection", sessionId="s")
    clock.advance(10)
    own.info("Heartbeat stopped")
    got = lines(stream)
    assert [x["message"] for x in got[:5]] == [f"Error handling request from 10.0.0.{i}"
                                                for i in range(5)]
    assert [x["message"] for x in got[5:25]] == ["Closing stale connection"] * 20
    assert got[25] == {**got[25], "level": "error", "module": "logs",
                       "message": "Repeated log lines suppressed",
                       "data": {"module": "aiohttp.server",
                                "message": "Error handling request from %s",
                                "count": 95, "windowMs": 10000}}
    assert got[26]["message"] == "Heartbeat stopped" and len(got) == 27


@pytest.mark.usefixtures("restore_logging")
def test_counts_not_yet_reported_are_written_when_the_log_closes() -> None:
    stream = io.StringIO()
    logs.setup("error", stream)
    for _ in range(8):
        logs.get_logger("hub").error("Message handler failed")  # tether's errors are limited
    logs.setup("error", io.StringIO())  # closes the first handler
    got = lines(stream)
    assert len(got) == 6 and got[-1]["data"]["count"] == 3


@pytest.mark.usefixtures("restore_logging")
def test_the_event_loop_exception_handler_goes_through_the_json_log() -> None:
    stream = io.StringIO()
    logs.setup("error", stream)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(50):
            loop.call_exception_handler({"message": "Task exception was never retrieved",
                                         "exception": RuntimeError("lost"),
                                         "future": object()})

    run(main())
    got = lines(stream)
    assert len(got) == 5, got  # the future's repr differs each time: the key is the first line
    assert got[0]["data"]["error"] == "RuntimeError: lost"
    assert got[0]["data"]["detail"].startswith("future: <object object at")
