"""`POST /event` as a bad network and an attacker send it (issue 12): bodies in pieces,
slowly or never, of the wrong type or from the wrong origin, with numbers JSON cannot carry.

Every test talks to a real tether over real sockets on 127.0.0.1. Bodies are written
by hand (`post_in_pieces`) because loopback clients send a small body in one segment,
which is how the cut-body bug stayed hidden.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.aio import LOOP, eventually
from tests.conftest import LogCapture, StartTether
from tests.hostile import Raw, dropped
from tests.support import ServerProcess, free_port

JSON = "application/json"


def head(port: int, length: int | None, content_type: str | None = JSON,
         extra: dict[str, str] | None = None) -> bytes:
    lines = ["POST /event HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader,
                        timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 response: status, headers (lower-case names), JSON body."""
    async with asyncio.timeout(timeout):
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines if x)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ")[1]), headers, orjson.loads(body) if body else None


async def post_in_pieces(port: int, body: bytes, piece: int, pause: float = 0.001,
                         content_type: str | None = JSON) -> tuple[int, Any]:
    """Headers, then the body `piece` bytes at a time with `pause` seconds between writes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # TCP_NODELAY is on
    try:
        writer.write(head(port, len(body), content_type))
        await writer.drain()
        for start in range(0, len(body), piece):
            await asyncio.sleep(pause)
            writer.write(body[start:start + piece])
            await writer.drain()
        status, _, reply = await read_response(reader)
        return status, reply
    finally:
        writer.close()


def event_of(size: int, tag: str) -> bytes:
    """A valid event of exactly `size` bytes."""
    base = orjson.dumps({"type": "sized", "payload": {"tag": tag, "fill": ""}})
    fill = "x" * (size - len(base))
    return orjson.dumps({"type": "sized", "payload": {"tag": tag, "fill": fill}})


async def delivered(ws: Raw, posted: list[bytes]) -> None:
    """`ws` gets each posted event once, in order, as posted, with seq 1, 2, ...; nothing more."""
    for seq, body in enumerate(posted, 1):
        assert await ws.recv_json() == {**orjson.loads(body), "topic": "*", "seq": seq}
    with pytest.raises(TimeoutError):
        await ws.recv_data(timeout=0.2)


# ------------------------------------------------------------------ bodies in pieces


SIZES = [75, 1_000, 30_000, 65_536]  # 65536 = WS_MAX_MESSAGE: the largest allowed


async def test_bodies_in_pieces_are_read_whole_and_delivered_once(
    start_tether: StartTether,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    posted = []
    for size in SIZES:
        body = event_of(size, f"halves-{size}")  # two writes 1 ms apart
        assert await post_in_pieces(t.port, body, piece=len(body) // 2 + 1) == (
            202, {"accepted": True, "topic": "*", "seq": len(posted) + 1})
        posted.append(body)
        body = event_of(size, f"segments-{size}")  # TCP segments of an Ethernet MSS
        status, reply = await post_in_pieces(t.port, body, piece=1460, pause=0.0005)
        assert status == 202 and reply["seq"] == len(posted) + 1
        posted.append(body)
    await delivered(ws, posted)
    ws.close()


async def test_aiohttp_streamed_bodies_are_read_whole(start_tether: StartTether) -> None:
    """aiohttp's client sends an async generator chunked, chunks as they are yielded."""
    t = await start_tether(heartbeat_interval_ms=0, max_message=30_000)
    ws = await Raw.connect(t.port)
    await ws.recv_json()

    async def stream(body: bytes, piece: int) -> AsyncIterator[bytes]:
        for start in range(0, len(body), piece):
            yield body[start:start + piece]
            await asyncio.sleep(0.001)

    posted = []
    async with aiohttp.ClientSession() as s:
        for size, piece in ((40, 7), (1_000, 100), (30_000, 1460), (30_000, 30_000)):
            body = event_of(size, f"stream-{size}-{piece}")
            async with s.post(f"{t.url}/event", data=stream(body, piece),
                              headers={"Content-Type": JSON}) as r:
                assert (r.status, (await r.json())["seq"]) == (202, len(posted) + 1)
            posted.append(body)
        # Chunked has no Content-Length: a body over the limit is counted as it comes.
        async with s.post(f"{t.url}/event", data=stream(event_of(30_001, "big"), 1460),
                          headers={"Content-Type": JSON}) as r:
            assert r.status == 413 and "WS_MAX_MESSAGE" in (await r.json())["error"]
    await delivered(ws, posted)
    ws.close()


async def test_an_endless_chunked_body_is_refused_after_the_limit(
    start_tether: StartTether,
) -> None:
    t = await start_tether(max_message=4096)
    reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
    writer.write(head(t.port, None, extra={"Transfer-Encoding": "chunked"}))
    chunk = b"x" * 1000
    for _ in range(5):  # 5000 bytes of a body that has no end
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        await asyncio.sleep(0.001)
    status, _, reply = await read_response(reader)
    assert status == 413 and reply == {
        "error": "body larger than WS_MAX_MESSAGE (4096 bytes)", "status": 413}
    writer.close()


# ------------------------------------------------------------------ bodies that never come


async def test_a_body_trickled_past_the_deadline_gets_408_and_the_socket_closed(
    start_tether: StartTether, log_capture: LogCapture,
) -> None:
    t = await start_tether(handshake_timeout_ms=500, heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    body = event_of(75, "slow")
    reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
    writer.write(head(t.port, len(body)))
    started = time.monotonic()

    async def trickle() -> None:  # one byte every 50 ms: 3.75 s for the whole body
        for byte in body:
            await asyncio.sleep(0.05)
            if writer.is_closing():
                return
            writer.write(bytes([byte]))

    task = asyncio.create_task(trickle())
    status, headers, reply = await read_response(reader)
    answered = time.monotonic() - started
    assert status == 408 and reply["status"] == 408
    assert "WS_HANDSHAKE_TIMEOUT" in reply["error"]
    assert headers["connection"].lower() == "close"
    assert 0.45 <= answered < 1.5, answered
    assert await dropped(reader, 1.0)  # closed at once, not kept alive or lingering
    task.cancel()
    writer.close()
    with pytest.raises(TimeoutError):
        await ws.recv_data(timeout=0.2)  # nothing published
    ws.close()
    assert not [r for r in log_capture.records() if r["level"] == "error"]


@pytest.mark.parametrize(("content_type", "token", "status"), [
    (JSON, "wrong", 401), ("text/plain", None, 415)])
async def test_a_request_refused_before_its_body_is_closed_by_the_deadline(
    start_tether: StartTether, content_type: str, token: str | None, status: int,
) -> None:
    """A refused request's unread body is read and dropped for WS_HANDSHAKE_TIMEOUT at most."""
    t = await start_tether(handshake_timeout_ms=500, publish_token="s3cret")
    reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
    extra = {"Authorization": f"Bearer {token or 's3cret'}"}
    writer.write(head(t.port, 100, content_type, extra))  # and no body
    started = time.monotonic()
    assert (await read_response(reader))[0] == status
    assert await dropped(reader, 2.0)
    assert time.monotonic() - started < 1.5
    writer.close()


async def test_a_client_leaving_mid_body_leaves_no_trace(
    start_tether: StartTether, log_capture: LogCapture, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    for sent in (b"", b'{"type":"cut', b'{"type":"cut", "payload": "'):
        _, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(head(t.port, 100) + sent)
        await writer.drain()
        await asyncio.sleep(0.05)  # the handler is waiting for the rest of the body
        writer.transport.abort()  # a reset, as a dropped link gives
        await asyncio.sleep(0.05)
    assert (await post_in_pieces(t.port, b'{"type":"after"}', piece=100)) == (
        202, {"accepted": True, "topic": "*", "seq": 1})
    assert not [r for r in log_capture.records() if r["level"] in ("warn", "error")]
    # aiohttp's records before they went to tether's log: they reached pytest's root handler.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ConnectionResetError" not in out + err


def accept_queue(port: int) -> int:
    """Connections the kernel holds for the server to accept (its listening socket's Recv-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines())


async def test_a_thousand_body_less_posts_are_dropped_by_the_deadline_and_health_answers() -> None:
    deadline = 1.0
    server = ServerProcess(env={"WS_HANDSHAKE_TIMEOUT": str(int(deadline * 1000)),
                                "WS_HEARTBEAT_INTERVAL": "0", "LOG_LEVEL": "info"})
    server.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        health: list[tuple[float, int, float]] = []  # (asked at, status, seconds to answer)
        stop = asyncio.Event()

        async def poll_health() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    asked = time.monotonic()
                    async with s.get(f"{server.url}/health",
                                     timeout=aiohttp.ClientTimeout(total=5)) as r:
                        health.append((asked, r.status, time.monotonic() - asked))
                    await asyncio.sleep(0.05)

        async def hang() -> tuple[asyncio.StreamReader, float]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writers.append(writer)
            writer.write(head(server.port, 100))  # and no body, ever
            return reader, time.monotonic()

        async def outcome(reader: asyncio.StreamReader, sent: float) -> tuple[float, int | None]:
            status: int | None = None
            try:
                async with asyncio.timeout(deadline + 4):
                    status = (await read_response(reader, deadline + 4))[0]
                    while await reader.read(4096):
                        pass
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # dropped without an answer: allowed
            return time.monotonic() - sent, status

        poller = asyncio.create_task(poll_health())
        hanging: list[tuple[asyncio.StreamReader, float]] = []
        for _ in range(10):  # 100 at a time: the listen backlog is 128
            hanging += await asyncio.gather(*(hang() for _ in range(100)))
            # The next hundred once the server has taken these: past the backlog the kernel
            # drops a handshake's last ACK, and its retransmission (1 s) would be counted
            # here as the server's lateness.
            assert await eventually(lambda: accept_queue(server.port) == 0), "not accepted"
        first = hanging[0][1]
        results = await asyncio.gather(*(outcome(r, sent) for r, sent in hanging))
        last = time.monotonic()
        stop.set()
        await poller
        took = sorted(r[0] for r in results)
        assert len(results) == 1000
        assert took[-1] < deadline + 2.0, took[-10:]  # every one closed by the deadline + slack
        assert took[0] > deadline * 0.9, took[:10]
        assert {r[1] for r in results} <= {408, None}
        assert sum(r[1] == 408 for r in results) >= 990
        during = [h for h in health if first <= h[0] <= last]
        assert len(during) >= 10 and all(status == 200 for _, status, _ in health), health
        assert max(lag for _, _, lag in health) < 1.0, health
    finally:
        for w in writers:
            w.close()
        assert server.stop() == 0


# ------------------------------------------------------------------ content type and origin


@pytest.mark.parametrize(("content_type", "status"), [
    (JSON, 202),
    ("application/json; charset=utf-8", 202),
    ("Application/JSON; charset=UTF-8", 202),
    (None, 415),
    ("text/plain", 415),  # what a cross-site form or fetch can send with no preflight
    ("text/plain; charset=utf-8", 415),
    ("application/x-www-form-urlencoded", 415),
    ("multipart/form-data; boundary=x", 415),
    ("application/jsonx", 415),
    ("application/json; charset=iso-8859-1", 415),
])
async def test_post_event_needs_a_json_content_type(
    start_tether: StartTether, content_type: str | None, status: int,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    body = b'{"type":"typed"}'
    got, reply = await post_in_pieces(t.port, body, piece=len(body), content_type=content_type)
    assert got == status and reply["status" if status != 202 else "seq"] == (
        status if status != 202 else 1)
    if status == 415:
        assert reply["error"] and set(reply) == {"error", "status"}
        with pytest.raises(TimeoutError):
            await ws.recv_data(timeout=0.1)
    else:
        await delivered(ws, [body])
    ws.close()


CROSS_SITE = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}


@pytest.mark.parametrize(("origin", "allowed", "status"), [
    ("https://evil.example", (), 403),
    ("null", (), 403),
    ("http://localhost.evil.example", (), 403),
    ("http://localhost:3000", ("https://app.example",), 403),  # a list replaces localhost
    ("http://localhost:3000", (), 202),
    ("https://app.example", ("https://app.example",), 202),
    ("SAME", (), 202),
    (None, (), 202),  # curl and scripts send no Origin
])
async def test_post_event_applies_the_websocket_origin_rule(
    start_tether: StartTether, origin: str | None, allowed: tuple[str, ...], status: int,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0, allowed_origins=allowed)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    headers = {"Content-Type": JSON}
    if origin is not None:
        headers |= {"Origin": f"http://127.0.0.1:{t.port}" if origin == "SAME" else origin,
                    **CROSS_SITE}
    body = b'{"type":"from-a-page"}'
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{t.url}/event", data=body, headers=headers) as r:
            assert r.status == status
            reply = await r.json()
        if status == 403:
            assert reply == {"error": "origin not allowed", "status": 403}
            # The simple request a page can send without a preflight is refused too.
            async with s.post(f"{t.url}/event", data=body,
                              headers={**headers, "Content-Type": "text/plain"}) as r:
                assert r.status in (403, 415)
    if status == 202:
        await delivered(ws, [body])
    else:
        with pytest.raises(TimeoutError):
            await ws.recv_data(timeout=0.1)
    ws.close()


# ------------------------------------------------------------------ what the body says


@pytest.mark.parametrize(("body", "status", "error"), [
    (b'{"type":"n","payload":12345678901234567890123}', 400, "integer out of range"),
    (b'{"type":"n","payload":[1.5,-9223372036854775809]}', 400, "integer out of range"),
    (b'{"type":"n","payload":18446744073709551616}', 400, "integer out of range"),
    (b'{"type":"n","payload":{"id":"12345678901234567890123","max":18446744073709551615,'
     b'"min":-9223372036854775808,"f":[1.5,-0.25]}}', 202, None),
    (b'{"type":"x","topic":"a "}', 400, "whitespace"),
    (b'{"type":"x","topic":" "}', 400, "whitespace"),
    (b'{"type":"Connected"}', 400, "reserved"),
    (b'{"type":"PONG"}', 400, "reserved"),
])
async def test_events_are_carried_exactly_or_refused(
    start_tether: StartTether, body: bytes, status: int, error: str | None,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    got, reply = await post_in_pieces(t.port, body, piece=len(body))
    assert got == status, reply
    if error is not None:
        assert error in reply["error"] and reply["status"] == status
        with pytest.raises(TimeoutError):
            await ws.recv_data(timeout=0.1)
    else:
        frame = await ws.recv_data()
        assert frame.payload == body[:-1] + b',"topic":"*","seq":1}'  # byte for byte
    ws.close()


# ------------------------------------------------------------------ the log of a server process


def json_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the server's log, each of which must be a JSON object."""
    out = []
    for line in server.text().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n{server.text()[-3000:]}") from None
    return out


async def test_malformed_requests_write_a_few_json_lines_at_log_level_error() -> None:
    server = ServerProcess(env={"LOG_LEVEL": "error", "PORT": str(free_port())})
    server.start()
    try:
        bad = (f"POST /event HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
               f"Content-Type: {JSON}\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}")
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(bad.encode())
            assert (await asyncio.wait_for(reader.read(4096), 5)).startswith(b"HTTP/1.")
            writer.close()
        await asyncio.sleep(0.2)
        running = json_lines(server)
        assert 1 <= len(running) <= 5, running
        assert {x["module"] for x in running} == {"aiohttp.server"}
        assert "Traceback" not in server.text()
    finally:
        assert server.stop() == 0
    final = json_lines(server)  # at exit, the count of the lines left out
    assert final[-1]["message"] == "Repeated log lines suppressed"
    assert final[-1]["data"]["count"] == 100 - len(running)
    assert len(final) == len(running) + 1


async def test_clients_leaving_mid_body_leave_no_traceback_in_the_log() -> None:
    server = ServerProcess(env={"LOG_LEVEL": "debug"})
    server.start()
    try:
        for sent in (b"", b'{"type":"cut', b'{"type":"cut", "payload": "'):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head(server.port, 100) + sent)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
        await asyncio.sleep(0.1)
        assert (await post_in_pieces(server.port, b'{"type":"after"}', piece=4))[0] == 202
    finally:
        assert server.stop() == 0
    log = json_lines(server)
    assert "Traceback" not in server.text()
    assert not [x for x in log if x["level"] in ("warn", "error")], log


async def test_out_of_file_descriptors_the_log_stays_small_and_the_server_recovers() -> None:
    limit = 200
    script = ("import resource, sys; "
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
              "from tether.cli import main; sys.exit(main(['serve']))")
    server = ServerProcess(env={"LOG_LEVEL": "info", "WS_HANDSHAKE_TIMEOUT": "60000",
                                "WS_HEARTBEAT_INTERVAL": "0"}, script=script)
    server.start()
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    try:
        for _ in range(limit + 50):  # idle: the kernel accepts them, the server cannot
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            readers.append(reader)
            writers.append(writer)
        await asyncio.sleep(2.5)  # asyncio retries accept() on every loop pass meanwhile
        log = json_lines(server)
        assert len(log) < 100, len(log)
        if LOOP == "asyncio":
            assert any(x["message"] == "socket.accept() out of system resource" for x in log), log
        else:
            # libuv accepts and closes at once what it cannot hold (its reserve-fd trick):
            # nothing to log, and those clients learn it now rather than hang.
            assert await _dropped(readers) >= 40, log
        for w in writers:
            w.close()
        writers.clear()
        async with aiohttp.ClientSession() as s:
            for _ in range(60):  # asyncio accepts again after a 1 s pause
                try:
                    async with s.get(f"{server.url}/health",
                                     timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("no /health after the connections were closed")
    finally:
        for w in writers:
            w.close()
        assert server.stop() == 0
    log = json_lines(server)
    assert "Traceback" not in server.text() and len(log) < 120
    if LOOP == "asyncio":
        assert sum(x["data"]["count"] for x in log
                   if x["message"] == "Repeated log lines suppressed")


async def _dropped(readers: list[asyncio.StreamReader]) -> int:
    """How many of these connections the server has closed (EOF or reset)."""
    async def ended(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), 0.05) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    return sum(await asyncio.gather(*(ended(r) for r in readers)))
