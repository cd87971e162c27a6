"""What a client may send, bounded (SPEC §10, issue 12): topics, seqs, frames, connections.

Each limit is tried the way an attacker would: past the cap on every route, with
numbers no parser should take, and with floods of every frame kind while other
clients measure their own latency.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import tracemalloc
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from tests.aio import eventually, post_event
from tests.conftest import LogCapture, StartTether
from tests.hostile import Raw
from tests.redis_server import RedisServer
from tests.support import ROOT, ServerProcess
from tether.codes import valid_close_code
from tether.inbound import MAX_SEQ, parse_seq, parse_since

# ------------------------------------------------------------------ numbers (pure)


@pytest.mark.parametrize("raw", ["1_000", " 12", "+3", "-1", "١٢", "１２", "0x10", "1e3", "",
                                 "9223372036854775808", "18446744073709551615",
                                 "99999999999999999999999", "00000000000000000000001"])
def test_a_seq_is_strict_ascii_digits_within_range(raw: str) -> None:
    with pytest.raises(ValueError, match="whole number"):
        parse_seq("a", raw)


@pytest.mark.parametrize("value", [-1, 2**63, 1.0, True, None, [1]])
def test_a_seq_in_json_must_be_an_integer_within_range(value: Any) -> None:
    with pytest.raises(ValueError, match="whole number"):
        parse_seq("a", value)


def test_valid_seqs_and_since_forms() -> None:
    assert parse_seq("a", "0") == 0
    assert parse_seq("a", str(MAX_SEQ)) == MAX_SEQ
    assert parse_seq("a", MAX_SEQ) == MAX_SEQ
    assert parse_since("a:1, b:22") == {"a": 1, "b": 22}
    assert parse_since({"a": 3, "b": "4"}) == {"a": 3, "b": 4}
    with pytest.raises(ValueError, match="more than 3 topics"):
        parse_since(",".join(f"t{i}:1" for i in range(4)), limit=3)


def test_close_codes_a_peer_may_send() -> None:
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                 3000, 4000, 4999):
        assert valid_close_code(code), code
    for code in (0, 1, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535):
        assert not valid_close_code(code), code


# ------------------------------------------------------------------ topics per client


async def _errors(ws: Raw, marker: str) -> list[str]:
    """Error texts the client received before the pong answering ping `marker`."""
    ws.send_json({"type": "ping", "id": marker})
    errors = []
    while True:
        msg = await ws.recv_json()
        if msg["type"] == "error":
            errors.append(msg["error"])
        if msg.get("id") == marker:
            return errors


async def test_topic_cap_holds_on_every_route(start_tether: StartTether) -> None:
    t = await start_tether(max_topics=5, heartbeat_interval_ms=0)
    # ?topics= past the cap: refused at the handshake with the reason.
    refused = await Raw.connect(t.port, "/ws?topics=" + ",".join(f"t{i}" for i in range(6)))
    assert refused.status == 400
    refused.close()

    ws = await Raw.connect(t.port, "/ws?topics=a,b,c&since=d:0,e:0,f:0")
    assert ws.status == 101
    assert (await ws.recv_json())["type"] == "connected"
    errors = await _errors(ws, "q1")
    assert len(errors) == 1 and "topic limit" in errors[0] and "at most 5" in errors[0]
    (conn,) = t.hub.registry
    assert conn.topics == {"a", "b", "c"}  # the refused resume added nothing

    ws.send_json({"type": "subscribe", "topics": ["d", "e"]})
    assert (await ws.recv_json())["topics"] == ["a", "b", "c", "d", "e"]
    ws.send_json({"type": "subscribe", "topics": ["f"]})
    ws.send_json({"type": "resume", "since": {"g": 0}})
    errors = await _errors(ws, "q2")
    assert len(errors) == 2 and all("topic limit" in e for e in errors)
    # Topics already read do not count twice, and `*` is not a topic one adds.
    ws.send_json({"type": "subscribe", "topics": ["a", "*"]})
    assert (await ws.recv_json())["type"] == "subscribed"
    ws.send_json({"type": "resume", "since": {"a": 0, "b": 0}})
    assert await _errors(ws, "q3") == []
    assert conn.topics == {"a", "b", "c", "d", "e"}
    # The connection works on: a publish to a topic it reads arrives.
    await t.publish({"type": "x", "topic": "e"})
    assert (await ws.recv_json())["topic"] == "e"
    ws.close()


async def test_a_resume_flood_leaves_topics_and_memory_bounded(start_tether: StartTether) -> None:
    t = await start_tether(max_topics=100, message_rate=1000, heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for n in range(50):  # 50 resumes of 100 new topics each: 5,000 asked for
            ws.send_json({"type": "resume", "since": {f"r{n}-{i}": 0 for i in range(100)}})
        errors = await _errors(ws, "done")
        (conn,) = t.hub.registry
        assert len(conn.topics) == 100
        assert len(errors) == 49 and all("topic limit" in e for e in errors)
        assert len(t.hub.registry.topics()) == 100
        gc.collect()
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        # 100 topics' worth of state, not 5,000 (measured: about 60 KB; 5,000 topics
        # would be several MB).
        assert grown < 1_000_000, grown
        ws.close()
        assert await eventually(lambda: len(t.hub.registry) == 0)
        assert t.hub.registry.topics() == {}
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ since, with Redis


@pytest.mark.redis
@pytest.mark.parametrize("since", ["99999999999999999999999", "18446744073709551615", "1_000",
                                   "١٢", "-1", "9223372036854775808"])
async def test_a_bad_since_gets_a_clear_error_and_a_working_connection(
    private_redis: RedisServer, start_tether: StartTether, log_capture: LogCapture, since: str
) -> None:
    t = await start_tether(redis_url=private_redis.url, heartbeat_interval_ms=0)
    await t.publish({"type": "before", "topic": "a"})
    ws = await Raw.connect(t.port, f"/ws?topics=b&since=a:{quote(since)}")
    assert ws.status == 101
    assert (await ws.recv_json())["type"] == "connected"
    error = await ws.recv_json()
    assert error["type"] == "error" and error["error"].startswith("since: seq of 'a'"), error
    # The same through a `resume` message (JSON numbers too).
    numeric = since.isascii() and since.lstrip("-").isdigit()
    literal = since if numeric else orjson.dumps(since).decode()  # a JSON number when it is one
    ws.send(0x1, f'{{"type":"resume","since":{{"a":{literal}}}}}'.encode())
    error = await ws.recv_json()
    assert error["type"] == "error" and "seq of 'a'" in error["error"], error
    # The connection works: a valid resume of the same topic (it has seq 1) joins
    # the live stream, and the next message arrives.
    ws.send_json({"type": "resume", "since": {"a": 1}})
    ws.send_json({"type": "ping", "id": "resumed"})
    assert (await ws.recv_json())["id"] == "resumed"
    await t.publish({"type": "live", "topic": "a"})
    got = await ws.recv_json()
    assert (got["type"], got["seq"]) == ("live", 2)
    assert not log_capture.find("Resume without Redis, sending resync")
    assert not [r for r in log_capture.records() if r["level"] == "error"]
    ws.close()


# ------------------------------------------------------------------ floods


async def _latencies(base: str, ws_url: str, seconds: float) -> list[float]:
    """Publish → delivery on 5 good clients every 20 ms for `seconds`: each delivery's delay."""
    delays: list[float] = []
    async with aiohttp.ClientSession() as session:
        clients = [await session.ws_connect(ws_url) for _ in range(5)]
        for ws in clients:
            assert (await ws.receive_json())["type"] == "connected"
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        i = 0
        while loop.time() < until:
            sent = loop.time()
            reply = await post_event(base, {"type": "probe", "payload": i}, session=session)
            assert reply.status == 202, reply.body
            for ws in clients:
                msg = await ws.receive_json(timeout=5)
                assert msg["payload"] == i
                delays.append(loop.time() - sent)
            i += 1
            await asyncio.sleep(0.02)
        for ws in clients:
            await ws.close()
    return delays


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pong", "ping", "text"])
async def test_a_flood_is_closed_and_others_keep_their_latency(kind: str) -> None:
    # The frame rate out of the way: each flood is closed by its own rate, whatever
    # the machine's load makes one read bring (the frame rate has a test of its own).
    env = {"LOG_LEVEL": "info", "WS_HEARTBEAT_INTERVAL": "1000", "WS_CLOSE_TIMEOUT": "5000",
           "WS_FRAME_RATE": "10000000"}
    with ServerProcess(env=env) as server:
        quiet = await _latencies(server.url, server.ws_url, 1.0)  # the same, with no flood
        flooders = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.flooder", str(server.port), kind, "4", "3",
            cwd=ROOT, stdout=subprocess.PIPE,
        )
        try:
            await asyncio.sleep(0.3)  # the flood is under way
            loud = await _latencies(server.url, server.ws_url, 3.0)
            out, _ = await asyncio.wait_for(flooders.communicate(), 30)
        finally:
            if flooders.returncode is None:
                flooders.kill()
                await flooders.wait()
        report = orjson.loads(out)
        closes = report["closes"]
        # Every flooding connection was closed, most of them seeing 1008 (a flooder
        # still writing when the server resets the socket after the grace may
        # not read the close frame), and made a new one: the flood went on for
        # the whole measurement.
        assert set(closes) <= {"1008", "None"}, report
        assert closes["1008"] >= 3 and closes["1008"] >= 2 * closes.get("None", 0), report
        reasons = {r["data"]["reason"] for r in server.find("Closing abusive client")}
        own = f"{kind} flood" if kind != "text" else "message flood"
        assert reasons == {own}, reasons
        print(f"\n{kind} flood: {sum(closes.values())} flooding connections closed; others' "
              f"publish → delivery p99 {_p99(loud) * 1000:.1f} ms (quiet {_p99(quiet) * 1000:.1f})")
        assert _p99(loud) < 0.05, (f"p99 {_p99(loud) * 1000:.1f} ms under a {kind} flood "
                                   f"(quiet: {_p99(quiet) * 1000:.1f} ms)")
        assert not [line for line in server.lines() if line.get("level") == "error"]


async def test_tiny_fragments_are_a_frame_flood(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(frame_rate=200, heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    ws.send(0x1, b"{", fin=False)
    for _ in range(500):  # one small message in 500 one-byte continuation frames
        ws.send(0x0, b" ", fin=False)
    ws.send(0x0, b"}", fin=True)
    code, _ = await ws.close_code()
    assert code == 1008
    reasons = [r["data"]["reason"] for r in log_capture.find("Closing abusive client")]
    assert reasons == ["frame flood"]
    # A message in a few fragments is fine.
    ok = await Raw.connect(t.port)
    await ok.recv_json()
    ok.send(0x1, b'{"type":', fin=False)
    ok.send(0x0, b'"ping","id":', fin=False)
    ok.send(0x0, b'"frag"}', fin=True)
    assert (await ok.recv_json())["id"] == "frag"
    ok.close()
    ws.close()


# ------------------------------------------------------------------ frames RFC 6455 refuses


def _long_form(opcode: int, payload: bytes, wide: int) -> bytes:
    """A masked frame whose length uses the 16-bit (126) or 64-bit (127) form."""
    key = b"\x01\x02\x03\x04"
    head = bytes([0x80 | opcode, 0x80 | wide])
    head += len(payload).to_bytes(2 if wide == 126 else 8, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("opcode", [0x9, 0xA, 0x8])
@pytest.mark.parametrize("wide", [126, 127])
async def test_a_control_frame_with_a_long_length_form_is_1002(
    start_tether: StartTether, opcode: int, wide: int
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    payload = b"\x03\xe8" if opcode == 0x8 else b"12345678"
    ws.writer.write(_long_form(opcode, payload, wide))
    code, _ = await ws.close_code()
    assert code == 1002
    ws.close()


@pytest.mark.parametrize(("sent", "answer"), [
    (1000, 1000), (1001, 1000), (3000, 1000), (4999, 1000), (None, 1000),
    (5000, 1002), (65535, 1002), (1006, 1002), (1004, 1002), (2999, 1002), (999, 1002),
    (0, 1002),
])
async def test_a_close_code_no_endpoint_may_send_is_answered_1002(
    start_tether: StartTether, log_capture: LogCapture, sent: int | None, answer: int
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    ws.send(0x8, b"" if sent is None else sent.to_bytes(2, "big") + b"bye")
    code, _ = await ws.close_code()
    assert code == answer
    assert await ws.closed_by_server()
    # Logged when the socket is gone (at once after a clean close; after a short
    # grace when the client broke the protocol and does not close its side).
    assert await eventually(lambda: bool(log_capture.find("WebSocket client disconnected")))
    line = log_capture.find("WebSocket client disconnected")[-1]
    assert line["data"]["code"] == (1002 if answer == 1002 else (sent or 1005))
    assert len(t.hub.registry) == 0
    ws.close()


# ------------------------------------------------------------------ connections per address


async def test_one_address_cannot_take_every_slot(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(max_per_address=3, heartbeat_interval_ms=0)
    held = [await Raw.connect(t.port) for _ in range(3)]
    assert [ws.status for ws in held] == [101] * 3
    extra = await Raw.connect(t.port)
    assert extra.status == 429
    assert b"too many connections from this address" in await extra.reader.read(4096)
    extra.close()
    line = log_capture.find("Connection refused, address limit reached")[0]
    assert line["data"] == {"limit": 3, "remote": "127.0.0.1"}
    held[0].close()
    assert await eventually(lambda: len(t.hub.registry) == 2)
    again = await Raw.connect(t.port)
    assert again.status == 101
    for ws in (*held[1:], again):
        ws.close()

