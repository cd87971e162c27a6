"""Trustworthy in the open (SPEC §2, §10): Origin and token checks, abuse limits, bad input.

Every test runs a real tether on 127.0.0.1 and talks to it over real sockets:
aiohttp's client where a well-behaved client is enough, `tests.hostile.Raw`
where the client must misbehave (bad frames, floods, half handshakes).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.aio import eventually, post_event
from tests.conftest import LogCapture, StartTether
from tests.hostile import Raw, dropped, encode, open_tcp
from tests.support import ServerProcess
from tether.app import Tether
from tether.wire import FrameReader

BROWSER = {  # what a browser adds to a cross-site WebSocket handshake
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36",
    "Cookie": "session=victim-session-cookie",
    "Sec-Fetch-Mode": "websocket",
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Dest": "empty",
    "Pragma": "no-cache",
}


async def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (headers the client libraries refuse)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    raw = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return int(raw.split(b" ", 2)[1]), raw


# ------------------------------------------------------------------ Origin (CSWSH)


@pytest.mark.parametrize("origin", [
    "https://evil.example",
    "http://evil.example:4011",
    "null",  # sandboxed iframes and file: pages
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "https://evil.example/http://localhost",
])
async def test_cross_site_websocket_hijacking_is_refused_403_and_logged(
    start_tether: StartTether, log_capture: LogCapture, origin: str
) -> None:
    t = await start_tether()
    ws = await Raw.connect(t.port, headers={"Origin": origin, **BROWSER})
    assert ws.status == 403, ws.head
    body = await ws.reader.read(4096)
    assert b"origin not allowed" in ws.head + body
    ws.close()
    refused = log_capture.find("WebSocket origin refused")
    assert refused and refused[-1]["data"]["origin"] == origin
    assert refused[-1]["level"] == "warn"
    assert len(t.hub.registry) == 0 and t.hub.stats.connections_total == 0
    assert not log_capture.find("WebSocket client connected")


async def test_same_origin_localhost_and_non_browser_clients_are_allowed(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether()
    for origin in (f"http://127.0.0.1:{t.port}", "http://localhost:3000",
                   "http://127.0.0.1:8080", "http://[::1]:5173", None):
        headers = {**BROWSER, "Origin": origin} if origin else {}
        ws = await Raw.connect(t.port, headers=headers)
        assert ws.status == 101, (origin, ws.head)
        assert (await ws.recv_json())["type"] == "connected"
        ws.close()
    assert not log_capture.find("WebSocket origin refused")


async def test_allowed_origins_list_is_honoured(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(allowed_origins=("https://app.example", "http://10.0.0.5:8000"))
    cases = {
        "https://app.example": 101,
        "https://app.example/": 101,
        "http://10.0.0.5:8000": 101,
        f"http://127.0.0.1:{t.port}": 101,  # same origin is always allowed
        "http://app.example": 403,  # another scheme is another origin
        "https://app.example:444": 403,
        "https://evil.example": 403,
        "http://localhost:3000": 403,  # a list replaces the localhost default
    }
    for origin, status in cases.items():
        ws = await Raw.connect(t.port, headers={**BROWSER, "Origin": origin})
        assert ws.status == status, (origin, ws.head)
        ws.close()
    assert len(log_capture.find("WebSocket origin refused")) == 4


# ------------------------------------------------------------------ PUBLISH_TOKEN


@pytest.mark.parametrize("how", ["env", "flag"])
def test_non_loopback_host_needs_a_publish_token_at_start_up(how: str) -> None:
    env = {"PATH": os.environ["PATH"], "PORT": "0"}
    args = [sys.executable, "-m", "tether", "serve"]
    if how == "env":
        env["HOST"] = "0.0.0.0"
    else:
        args += ["--host", "0.0.0.0"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "PUBLISH_TOKEN" in lines[0], proc.stderr
    assert proc.stdout == ""


async def test_non_loopback_host_with_a_token_starts_and_enforces_it() -> None:
    server = ServerProcess(env={"HOST": "0.0.0.0", "PUBLISH_TOKEN": "tunnel-secret"})
    server.start()
    try:
        assert (await post_event(server.url, b'{"type":"x"}')).status == 401
        ok = {"Authorization": "Bearer tunnel-secret"}
        assert (await post_event(server.url, b'{"type":"x"}', headers=ok)).status == 202
    finally:
        assert server.stop() == 0


async def test_post_event_needs_the_exact_bearer_token(start_tether: StartTether) -> None:
    t = await start_tether(publish_token="s3cret-token")
    body = b'{"type":"x"}'
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as ws:
        await ws.receive_json()
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer s3cret-toke"},  # a prefix
            {"Authorization": "Bearer s3cret-token2"},
            {"Authorization": "bearer s3cret-token "},
            {"Authorization": "Basic czNjcmV0LXRva2Vu"},
            {"Authorization": "s3cret-token"},
        ):
            status, reply, _ = await post_event(t.url, body, headers=headers)
            assert status == 401 and reply["error"], headers
        # Bytes that are not UTF-8 in the header: still a plain 401, never a 500.
        head = (f"POST /event HTTP/1.1\r\nHost: 127.0.0.1:{t.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n").encode() + b"Authorization: Bearer \xff\xfe\x80\r\n\r\n"
        status, raw = await raw_http(t.port, head, body)
        assert status == 401, raw
        status, reply, _ = await post_event(t.url, body,
                                            headers={"Authorization": "Bearer s3cret-token"})
        assert status == 202 and reply["seq"] == 1  # nothing refused was published
        assert await ws.receive_json() == {"type": "x", "topic": "*", "seq": 1}


# ------------------------------------------------------------------ limits


async def test_message_size_limit_closes_1009_and_spares_others(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(max_message=1024)
    bystander = await Raw.connect(t.port)
    await bystander.recv_json()

    def ping_of(size: int) -> bytes:
        base = orjson.dumps({"type": "ping", "id": ""})
        return orjson.dumps({"type": "ping", "id": "x" * (size - len(base))})

    exact = await Raw.connect(t.port)
    await exact.recv_json()
    exact.send(0x1, ping_of(1024))  # WS_MAX_MESSAGE bytes is allowed
    assert (await exact.recv_json())["type"] == "pong"

    over = await Raw.connect(t.port)
    await over.recv_json()
    over.send(0x1, ping_of(1025))
    assert (await over.close_code())[0] == 1009

    fragmented = await Raw.connect(t.port)  # the limit is per message, not per frame
    await fragmented.recv_json()
    fragmented.send(0x1, b'{"type":"ping","id":"' + b"y" * 400, fin=False)
    fragmented.send(0x0, b"y" * 400, fin=False)
    fragmented.send(0x0, b"y" * 400 + b'"}')
    assert (await fragmented.close_code())[0] == 1009

    binary = await Raw.connect(t.port)
    await binary.recv_json()
    binary.send(0x2, os.urandom(5000))
    assert (await binary.close_code())[0] == 1009

    assert await eventually(lambda: len(t.hub.registry) == 2)
    await t.publish({"type": "still-here"})
    assert (await bystander.recv_json())["type"] == "still-here"
    assert (await exact.recv_json())["type"] == "still-here"
    exact.send_json({"type": "ping"})
    assert (await exact.recv_json())["type"] == "pong"
    def codes() -> list[int]:
        return [r["data"]["code"] for r in log_capture.find("WebSocket client disconnected")]

    # Each is logged once its close frame is delivered and the socket aborted.
    assert await eventually(lambda: codes().count(1009) == 3), codes()
    for ws in (bystander, exact, over, fragmented, binary):
        ws.close()


async def test_connection_cap_answers_503_at_upgrade_and_frees_a_slot_on_close(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(max_connections=3)
    clients = [await Raw.connect(t.port) for _ in range(3)]
    for ws in clients:
        assert ws.status == 101
        await ws.recv_json()
    refused = await Raw.connect(t.port)
    assert refused.status == 503, refused.head
    length = int(refused.head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert b"too many connections" in await refused.reader.readexactly(length)
    refused.close()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws")
        assert err.value.status == 503
    assert t.hub.stats.connections_refused == 2
    assert log_capture.find("Connection refused, limit reached")[0]["data"]["limit"] == 3
    # HTTP stays up for operators while WebSockets are full.
    async with aiohttp.ClientSession() as s, s.get(f"{t.url}/health") as r:
        assert r.status == 200 and (await r.json())["clients"] == 3
    clients[0].send(0x8, b"\x03\xe8")  # close 1000
    assert (await clients[0].close_code())[0] == 1000
    assert await eventually(lambda: len(t.hub.registry) == 2)
    again = await Raw.connect(t.port)
    assert again.status == 101 and (await again.recv_json())["type"] == "connected"
    for ws in [*clients, again]:
        ws.close()


async def test_message_flood_gets_an_error_then_1008(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(message_rate=5)
    calm = await Raw.connect(t.port)
    await calm.recv_json()
    flood = await Raw.connect(t.port)
    await flood.recv_json()
    for i in range(50):
        flood.send_json({"type": "ping", "id": i})
    code, seen = await flood.close_code()
    assert code == 1008
    replies = [orjson.loads(f.payload) for f in seen if f.opcode == 0x1]
    pongs = [m for m in replies if m["type"] == "pong"]
    errors = [m for m in replies if m["type"] == "error"]
    assert 5 <= len(pongs) <= 7  # the burst, plus what refilled meanwhile
    assert len(errors) == 1 and "rate" in errors[0]["error"]
    assert replies.index(errors[0]) == len(pongs)  # the error comes after the allowed ones
    abusive = log_capture.find("Closing abusive client")
    assert abusive and abusive[0]["data"]["reason"] == "message flood"
    # A client within its rate is never refused or closed.
    for i in range(8):
        calm.send_json({"type": "ping", "id": i})
        assert (await calm.recv_json())["id"] == i
        await asyncio.sleep(0.25)
    assert len(t.hub.registry) == 1
    calm.close()
    flood.close()


async def test_ping_flood_is_not_answered_then_1008_and_never_starves_others(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(ping_rate=5, heartbeat_interval_ms=0)
    healthy = await Raw.connect(t.port)
    await healthy.recv_json()
    healthy.send(0x9, b"mine")  # a client's own ping is answered (RFC 6455 §5.5.3)
    pong = await healthy.recv()
    assert (pong.opcode, pong.payload) == (0xA, b"mine")

    flooders = [await Raw.connect(t.port) for _ in range(20)]
    for ws in flooders:
        await ws.recv_json()
    stop = asyncio.Event()

    async def flood(ws: Raw) -> None:
        burst = encode(0x9, b"p" * 125) * 100
        while not stop.is_set() and not ws.writer.is_closing():
            ws.writer.write(burst)
            try:
                await ws.writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0)

    async def results(ws: Raw) -> tuple[int | None, int]:
        code, seen = await ws.close_code(10)
        return code, sum(1 for f in seen if f.opcode == 0xA)

    tasks = [asyncio.create_task(flood(ws)) for ws in flooders]
    outcome = asyncio.gather(*(results(ws) for ws in flooders))
    late = []
    for i in range(20):  # the healthy client gets every message on time meanwhile
        sent = time.monotonic()
        await t.publish({"type": "tick", "payload": i})
        msg = await healthy.recv_json(2)
        late.append(time.monotonic() - sent)
        assert msg["payload"] == i
        await asyncio.sleep(0.02)
    done = await outcome
    stop.set()
    await asyncio.gather(*tasks)
    assert all(code == 1008 for code, _ in done), done
    assert all(pongs <= 6 for _, pongs in done), done  # the burst of 5, extra pings unanswered
    assert max(late) < 0.5, late
    assert t.hub.stats.rate_limited >= 20 * 5
    reasons = {r["data"]["reason"] for r in log_capture.find("Closing abusive client")}
    assert reasons == {"ping flood"}
    healthy.send(0x9, b"again")
    assert (await healthy.recv()).payload == b"again"
    assert len(t.hub.registry) == 1
    healthy.close()
    for ws in flooders:
        ws.close()


async def test_handshake_timeout_drops_silent_and_partial_requests_not_idle_websockets(
    start_tether: StartTether,
) -> None:
    t = await start_tether(handshake_timeout_ms=300, heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    started = time.monotonic()
    silent = await open_tcp(t.port)
    partial = await open_tcp(t.port, b"GET /ws HTT")
    headers_only = await open_tcp(t.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    trickle_r, trickle_w = await open_tcp(t.port, b"G")

    async def trickle() -> None:  # slowloris: one byte every 100 ms keeps no one alive
        for byte in b"ET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
            await asyncio.sleep(0.1)
            if trickle_w.is_closing():
                return
            trickle_w.write(bytes([byte]))

    task = asyncio.create_task(trickle())
    results = await asyncio.gather(
        dropped(silent[0], 3), dropped(partial[0], 3), dropped(headers_only[0], 3),
        dropped(trickle_r, 3),
    )
    elapsed = time.monotonic() - started
    task.cancel()
    assert results == [True, True, True, True]
    assert 0.25 <= elapsed < 2.0, elapsed
    # An upgraded WebSocket idle for longer than the handshake timeout stays open.
    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    ws.send_json({"type": "ping", "id": "after-idle"})
    assert (await ws.recv_json())["id"] == "after-idle"
    assert len(t.hub.registry) == 1
    ws.close()
    for _, w in (silent, partial, headers_only, (trickle_r, trickle_w)):
        w.close()


# ------------------------------------------------------------------ bad input (SPEC §10)

MALFORMED = {
    "reserved bits": dict(opcode=0x1, payload=b'{"type":"ping"}', rsv=0b100),
    "reserved bit 3": dict(opcode=0x1, payload=b"{}", rsv=0b001),
    "unknown opcode": dict(opcode=0x3, payload=b"hi"),
    "unknown control opcode": dict(opcode=0xB, payload=b""),
    "unmasked client frame": dict(opcode=0x1, payload=b'{"type":"ping"}', mask=False),
    "fragmented ping": dict(opcode=0x9, payload=b"hi", fin=False),
    "ping over 125 bytes": dict(opcode=0x9, payload=b"x" * 126),
    "continuation first": dict(opcode=0x0, payload=b"hi"),
    "close with 1 byte": dict(opcode=0x8, payload=b"\x03"),
    "close code 999": dict(opcode=0x8, payload=b"\x03\xe7"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_frames_close_1002_and_spare_others(
    start_tether: StartTether, log_capture: LogCapture, name: str
) -> None:
    t = await start_tether()
    other = await Raw.connect(t.port)
    await other.recv_json()
    bad = await Raw.connect(t.port)
    await bad.recv_json()
    bad.send(**MALFORMED[name])  # type: ignore[arg-type]
    code, seen = await bad.close_code()
    assert code == 1002, (name, seen)
    assert not [f for f in seen if f.opcode == 0x1], "the bad frame must not be processed"
    bad.send(0x8, b"\x03\xea")  # the client completes the close handshake
    assert await bad.closed_by_server(2)
    assert await eventually(lambda: len(t.hub.registry) == 1)
    # Logged when the socket is gone: at the client's FIN, or a short grace after.
    assert await eventually(lambda: bool(log_capture.find("WebSocket client disconnected")))
    gone = log_capture.find("WebSocket client disconnected")
    assert [r["data"]["code"] for r in gone] == [1002]
    await t.publish({"type": "fine"})
    assert (await other.recv_json())["type"] == "fine"
    assert not [r for r in log_capture.records() if r["level"] == "error"]
    other.close()
    bad.close()


async def test_masked_frames_around_the_mask_check_still_work(start_tether: StartTether) -> None:
    t = await start_tether()
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    # Frames of every length encoding in one write, then one split byte by byte.
    batch = b"".join(encode(0x1, orjson.dumps({"type": "ping", "id": n, "pad": "z" * n}))
                     for n in (0, 100, 126, 60_000))
    ws.writer.write(batch)
    got = [(await ws.recv_json())["id"] for _ in range(4)]
    assert got == [0, 100, 126, 60_000]
    for byte in encode(0x1, b'{"type":"ping","id":"split"}'):
        ws.writer.write(bytes([byte]))
        await ws.writer.drain()
        await asyncio.sleep(0.001)
    assert (await ws.recv_json())["id"] == "split"
    # A valid frame, then an unmasked one in the same write: the connection is failed
    # at once (RFC 6455 §7.1.7) and the unmasked frame is never processed.
    ws.writer.write(encode(0x1, b'{"type":"ping","id":"before"}')
                    + encode(0x1, b'{"type":"ping","id":"after"}', mask=False))
    code, seen = await ws.close_code()
    assert "after" not in [orjson.loads(f.payload)["id"] for f in seen if f.opcode == 0x1]
    assert code == 1002
    assert await eventually(lambda: len(t.hub.registry) == 0)
    ws.close()


@pytest.mark.parametrize("fragmented", [False, True])
async def test_invalid_utf8_text_closes_1007(start_tether: StartTether, fragmented: bool) -> None:
    t = await start_tether()
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    if fragmented:
        ws.send(0x1, b'{"type":"ping","id":"\xce', fin=False)  # a valid prefix...
        ws.send(0x0, b'\xffabc"}')  # ...continued with a byte UTF-8 never has
    else:
        ws.send(0x1, b'{"type":"ping","id":"\xed\xa0\x80"}')  # an encoded surrogate
    assert (await ws.close_code())[0] == 1007
    assert await eventually(lambda: len(t.hub.registry) == 0)
    ws.close()


async def test_invalid_json_and_binary_get_an_error_and_the_connection_stays(
    start_tether: StartTether,
) -> None:
    t = await start_tether()
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    for text in ("{", "not json", '{"type":', "\u00e9\u4e2d", "[1,2", "1e99999", '"x'):
        ws.send(0x1, text.encode())
        reply = await ws.recv_json()
        assert reply["type"] == "error" and reply["error"], (text, reply)
    for payload in (b"", b"\x00\x01\x02", os.urandom(2000)):
        ws.send(0x2, payload)
        reply = await ws.recv_json()
        assert reply == {"type": "error", "error": "binary messages are not supported"}
    for value in ("[]", "42", "null", '{"type": 7}', '{"type":"nope"}'):
        ws.send(0x1, value.encode())
        assert (await ws.recv_json())["type"] == "error", value
    ws.send_json({"type": "subscribe", "topics": ["a"]})
    assert await ws.recv_json() == {"type": "subscribed", "topics": ["a"], "seqs": {"a": 0}}
    await t.publish({"type": "news", "topic": "a"})
    assert (await ws.recv_json())["type"] == "news"
    assert t.hub.stats.client_errors == 15
    assert len(t.hub.registry) == 1
    ws.close()


async def test_binary_goes_to_an_application_handler_when_there_is_one(
    start_tether: StartTether,
) -> None:
    t: Tether = await start_tether()
    t.on_message(lambda conn, data: t.send(conn, data[::-1]))
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    ws.send(0x2, b"\x01\x02\x03")
    f = await ws.recv_data()
    assert (f.opcode, f.payload) == (0x2, b"\x03\x02\x01")
    ws.close()


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
                      | st.integers(0, 300), min_size=1, max_size=6),
       unmasked_at=st.none() | st.integers(0, 5), cuts=st.lists(st.integers(1, 10**6)))
def test_the_frame_reader_reads_the_same_however_the_stream_is_cut(
    sizes: list[int], unmasked_at: int | None, cuts: list[int]
) -> None:
    stream = b""
    good = 0
    for i, n in enumerate(sizes):
        masked = i != unmasked_at
        if masked and (unmasked_at is None or i < unmasked_at):
            good += 1
        stream += encode(0x2, bytes([i]) * n, mask=masked)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    reader = FrameReader(100_000)
    events = []
    for start, end in itertools.pairwise(points):
        events += reader.feed(stream[start:end])
    # Every masked message before the first unmasked one, whole and in order; then 1002.
    assert events == [(0x2, bytes([i]) * n) for i, n in enumerate(sizes[:good])]
    if unmasked_at is None or unmasked_at >= len(sizes):
        assert reader.failure is None and reader.at_boundary
    else:
        assert reader.failure is not None and reader.failure[0] == 1002
