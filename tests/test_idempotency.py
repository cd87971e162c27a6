"""Publishing that a retry cannot double (issue 12, item 7): the `Idempotency-Key`.

Over real sockets: a repeated key is answered with the original seq and delivered
once; through Redis across a `kill -9` and restart; through a proxy that loses the
reply of the very call that published (the outcome unknown, so a 503); and the
clients (`tether publish`, `Client.publish`) that retry with one key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.aio import eventually, post_event, serve_event_route
from tests.conftest import LogCapture, StartTether
from tests.hostile import open_tcp
from tests.redis_server import running_redis
from tests.support import ROOT, Reply, ServerProcess
from tests.test_redis_cluster import Client, nodes, watching
from tether.client import Client as TetherClient
from tether.clock import ManualClock
from tether.errors import PublishError, Refusal
from tether.idempotency import MAX_KEY_LENGTH, KeyMemory, Seen, check_key
from tether.server import UNAVAILABLE
from tether.tools import retry_delay

HEADER = "Idempotency-Key"


def new_key() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# ---------------------------------------------------------------------------- pure parts


def test_check_key_takes_1_to_200_printable_ascii_characters() -> None:
    for good in ("a", "~" * MAX_KEY_LENGTH, "order 7/retry:1", str(uuid.uuid4())):
        assert check_key(good) == good
    for bad in ("", "k" * (MAX_KEY_LENGTH + 1), "é", "tab\there", "nul\0", "del\x7f"):
        with pytest.raises(PublishError) as err:
            check_key(bad)
        assert err.value.refusal is Refusal.INVALID and HEADER in err.value.message


def test_key_memory_expires_by_the_clock_and_is_bounded_in_count() -> None:
    clock = ManualClock()
    memory = KeyMemory(window=10.0, max_keys=3)
    memory.put("a", Seen("t", 1, "f"), clock.now())
    memory.put("a", Seen("t", 9, "g"), clock.now())  # a key keeps its first publish
    assert memory.get("a", clock.now()) == Seen("t", 1, "f")
    clock.advance(9.999)
    assert memory.get("a", clock.now()) is not None
    clock.advance(0.001)
    assert memory.get("a", clock.now()) is None and len(memory) == 0
    for i, key in enumerate("bcde"):
        memory.put(key, Seen("t", i, "f"), clock.now())
    assert len(memory) == 3 and memory.evicted == 1
    assert memory.get("b", clock.now()) is None  # the oldest went first
    assert [memory.get(k, clock.now()) is not None for k in "cde"] == [True] * 3


def test_retry_delays_are_jittered_doubling_and_capped() -> None:
    assert [retry_delay(n, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert [retry_delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(40, rand=lambda: 1.0) == 8.0
    # Five attempts wait four times: at most 7.5 s in all, at least half of it.
    assert sum(retry_delay(n, rand=lambda: 1.0) for n in range(1, 5)) == 7.5


# ---------------------------------------------------------------------------- (a) one node


async def raw_post(port: int, key_line: bytes, body: bytes = b'{"type":"x"}') -> int:
    """POST /event with header bytes as given (aiohttp's client would refuse some)."""
    head = (b"POST /event HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n"
            + key_line + b"\r\n")
    reader, writer = await open_tcp(port, head + body)
    try:
        status_line = await asyncio.wait_for(reader.readline(), 5)
        return int(status_line.split(b" ", 2)[1])
    finally:
        writer.close()


async def test_a_repeated_key_gets_the_same_seq_and_is_delivered_once(
    start_tether: StartTether, session: aiohttp.ClientSession,
) -> None:
    t = await start_tether()
    async with session.ws_connect(f"ws://127.0.0.1:{t.port}/ws?topics=a") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        key, event = new_key(), {"type": "order", "topic": "a", "payload": {"id": 7}}
        keyed = {HEADER: key}
        first = await post_event(t.url, event, headers=keyed, session=session)
        again = await post_event(t.url, event, headers=keyed, session=session)
        assert first[:2] == (202, {"accepted": True, "topic": "a", "seq": 1})
        assert again[:2] == (202, {"accepted": True, "topic": "a", "seq": 1, "duplicate": True})
        # The same key for another event: refused, nothing published.
        other = await post_event(t.url, {**event, "payload": {"id": 8}}, headers=keyed,
                                 session=session)
        assert other[0] == 422 and "different event" in other[1]["error"]
        assert (await post_event(t.url, event, session=session)).body["seq"] == 2  # no key: new
        # The Python API takes a key too.
        assert (await t.publish(event, key=key)).duplicate
        with pytest.raises(PublishError):
            await t.publish(event, key="")
        got = [await ws.receive_json(timeout=5) for _ in range(2)]
        assert [(m["type"], m["seq"]) for m in got] == [("order", 1), ("order", 2)]
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive_json(timeout=0.2)  # and nothing more
    health = t.hub.health()
    assert health["messages"]["duplicates"] == 2 and health["messages"]["published"] == 2
    assert health["backplane"]["duplicates"] == 2
    async with session.get(f"{t.url}/metrics") as r:
        assert "tether_publish_duplicates_total 2.0" in await r.text()


async def test_a_bad_key_is_a_400_and_publishes_nothing(
    start_tether: StartTether, session: aiohttp.ClientSession,
) -> None:
    t = await start_tether()
    for key in ("", "k" * (MAX_KEY_LENGTH + 1), "tab\there"):
        status, body, _ = await post_event(t.url, {"type": "x"}, headers={HEADER: key},
                                           session=session)
        assert status == 400 and HEADER in body["error"], (key, body)
    assert await raw_post(t.port, "Idempotency-Key: caf\u00e9\r\n".encode()) == 400
    assert await raw_post(t.port, b"Idempotency-Key: a\r\nIdempotency-Key: a\r\n") == 400
    assert await raw_post(t.port, b"Idempotency-Key: fine\r\n") == 202  # the helper is right
    assert t.hub.health()["messages"]["published"] == 1


# ---------------------------------------------------------------------------- (b) Redis, kill -9


async def test_a_key_retried_across_a_redis_kill_9_is_delivered_once_on_every_node(
    session: aiohttp.ClientSession,
) -> None:
    with running_redis() as redis, nodes(redis.url, 2) as (a, b):
        clients = [await Client(session, node, "topics=o").connect() for node in (a, b)]
        await watching(session, [a, b], 2)
        k1, e1 = new_key(), {"type": "n", "topic": "o", "i": 1}
        assert (await post_event(a.url, e1, headers={HEADER: k1}, session=session))[:2] == (
            202, {"accepted": True, "topic": "o", "seq": 1})
        assert await eventually(lambda: all(len(c.messages("o")) == 1 for c in clients), 5), \
            "delivery"

        await asyncio.to_thread(redis.kill)  # kill -9: Redis and every key in it are gone
        for node in (a, b):
            assert await eventually(lambda n=node: bool(n.find("Redis connection lost")), 10), \
                "noticed"
        # Both nodes delivered k1: they answer its repeat from memory, even now.
        dup = {"accepted": True, "topic": "o", "seq": 1, "duplicate": True}
        for node in (a, b):
            again = await post_event(node.url, e1, headers={HEADER: k1}, session=session)
            assert again[:2] == (202, dup)
        # A new publish cannot be made: 503, and the body says what to do, not where Redis is.
        k2, e2 = new_key(), {"type": "n", "topic": "o", "i": 2}
        status, body, headers = await post_event(a.url, e2, headers={HEADER: k2}, session=session)
        assert (status, body, headers.get("Retry-After")) == (503, UNAVAILABLE, "1")
        assert str(redis.port) not in json.dumps(body)
        failed = a.find("Publish failed, backplane unavailable")[-1]
        assert failed["level"] == "warn" and failed["data"]["outcome"] == "not published"

        await asyncio.to_thread(redis.start)  # same port, same dir; empty (no persistence)
        answers: list[Reply] = []

        async def published() -> bool:  # retry, same key
            answers.append(await post_event(a.url, e2, headers={HEADER: k2}, session=session))
            if answers[-1].status == 202:
                return True
            assert answers[-1][:2] == (503, UNAVAILABLE)
            return False

        assert await eventually(published, 15, interval=0.1), "Redis not back within 15 s"
        assert answers[-1].body == {"accepted": True, "topic": "o", "seq": 1}  # renumbered
        for node in (b, a):
            # b's link may still be reconnecting (a's came back first): 503, which a
            # client retries with the same key, as the contract says; then a duplicate.
            async def answered(node: ServerProcess = node) -> Reply:
                while True:
                    reply = await post_event(node.url, e2, headers={HEADER: k2}, session=session)
                    if reply.status != 503:
                        return reply
                    assert reply.body == UNAVAILABLE
                    await asyncio.sleep(0.1)

            again = await asyncio.wait_for(answered(), 15)
            assert again[:2] == (202, {"accepted": True, "topic": "o", "seq": 1, "duplicate": True})
            again = await post_event(node.url, e1, headers={HEADER: k1}, session=session)
            assert again[:2] == (202, dup)
        marker = {"type": "marker", "topic": "o"}
        assert (await post_event(b.url, marker, session=session)).status == 202
        assert await eventually(lambda: all(any(m["type"] == "marker" for m in c.messages("o"))
                                            for c in clients), 10), "marker"
        for c in clients:
            got = [m.get("i") for m in c.messages("o") if m["type"] == "n"]
            assert sorted(got) == [1, 2], f"node {c.node.port}: {got}"
            assert c.closed_by_server is None
        for c in clients:
            await c.close()


# ---------------------------------------------------------------------------- (c) reply lost


class LosingProxy:
    """A TCP proxy to Redis that, once armed, lets the next script call run but loses its reply.

    The request (EVALSHA/EVAL) reaches Redis, which runs it; the reply is dropped
    and the client's connection reset (RST): the caller cannot know whether its
    publish happened. A NOSCRIPT reply (not run) passes through untouched.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.armed = False
        self.lost = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> LosingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._pipe(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pipe(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        script_sent = False

        async def upstream() -> None:
            nonlocal script_sent
            while data := await creader.read(65536):
                upper = data.upper()
                if self.armed and (b"\r\nEVALSHA\r\n" in upper or b"\r\nEVAL\r\n" in upper):
                    script_sent = True
                uwriter.write(data)
                await uwriter.drain()
            uwriter.close()

        async def downstream() -> None:
            nonlocal script_sent
            while data := await ureader.read(65536):
                if script_sent and self.armed:
                    script_sent = False
                    if not data.startswith(b"-NOSCRIPT"):  # it ran: lose the answer
                        self.armed = False
                        self.lost += 1
                        sock = cwriter.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        cwriter.transport.abort()  # RST: "Connection reset by peer"
                        uwriter.close()
                        return
                cwriter.write(data)
                await cwriter.drain()
            cwriter.close()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())
        for w in (cwriter, uwriter):
            w.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_a_publish_whose_reply_was_lost_is_a_503_and_its_retry_a_duplicate(
    start_tether: StartTether, session: aiohttp.ClientSession, log_capture: LogCapture,
) -> None:
    with running_redis() as redis:
        proxy = await LosingProxy(redis.port).start()
        try:
            # Node A reaches Redis through the proxy and has no subscribers of topic u, so
            # only Redis can tell it the key was used; node B has the client.
            a = await start_tether(redis_url=proxy.url)
            b = await start_tether(redis_url=redis.url)
            async with session.ws_connect(f"ws://127.0.0.1:{b.port}/ws?topics=u") as ws:
                assert (await ws.receive_json(timeout=5))["type"] == "connected"
                assert await eventually(lambda: b.backplane.state()["pending"] == 0
                                        and b.backplane.state()["watched"] == 2, 2, interval=0.02)
                warm = await post_event(a.url, {"type": "warm", "topic": "u"},
                                        headers={HEADER: new_key()}, session=session)
                assert warm[:2] == (202, {"accepted": True, "topic": "u", "seq": 1})
                assert (await ws.receive_json(timeout=5))["type"] == "warm"

                proxy.armed = True
                key, event = new_key(), {"type": "order", "topic": "u", "i": 1}
                keyed = {HEADER: key}
                status, body, _ = await post_event(a.url, event, headers=keyed, session=session)
                assert (status, body, proxy.lost) == (503, UNAVAILABLE, 1)
                failed = log_capture.find("Publish failed, backplane unavailable")[-1]
                assert failed["data"]["outcome"] == "unknown" and failed["data"]["key"] is True
                # ... and yet it was published: B's client gets it.
                delivered = await ws.receive_json(timeout=5)
                assert (delivered["type"], delivered["seq"]) == ("order", 2)

                # Answered by Redis:
                retried = await post_event(a.url, event, headers=keyed, session=session)
                assert retried[:2] == (202, {"accepted": True, "topic": "u", "seq": 2,
                                             "duplicate": True})
                again = await post_event(b.url, event, headers=keyed, session=session)
                assert again.body["duplicate"] is True

                # Without a key, the lost reply is still a 503 and the library does not send
                # the script again behind our back: published once, not twice.
                proxy.armed = True
                for kind, status in (("keyless", 503), ("marker", 202)):
                    event = {"type": kind, "topic": "u"}
                    assert (await post_event(a.url, event, session=session)).status == status
                got = [await ws.receive_json(timeout=5) for _ in range(2)]
                assert [(m["type"], m["seq"]) for m in got] == [("keyless", 3), ("marker", 4)]
                with pytest.raises(asyncio.TimeoutError):
                    await ws.receive_json(timeout=0.2)
        finally:
            for t in (locals().get("a"), locals().get("b")):
                if t is not None:
                    await t.stop()
            await proxy.close()


# ---------------------------------------------------------------------------- (d) the clients


class FlakyEvent:
    """A stand-in for `POST /event`: answers from a script (503, drop, 202...), records keys."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = script
        self.keys: list[str | None] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.keys.append(request.headers.get(HEADER))
        await request.read()
        step = self.script[min(len(self.keys), len(self.script)) - 1]
        if step == "drop":  # the connection dies before an answer
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        status = int(step)
        if status == 503:
            return web.json_response(UNAVAILABLE, status=503)
        if status == 202:
            return web.json_response({"accepted": True, "topic": "*", "seq": 1}, status=202)
        return web.json_response({"error": "bad", "status": status}, status=status)

    async def __aenter__(self) -> FlakyEvent:
        self.runner, self.url = await serve_event_route(self.handle)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def tether_publish(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PUBLISH_TOKEN", "TETHER_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether", "publish", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_key(keys: list[str | None], count: int) -> str:
    assert len(keys) == count and len(set(keys)) == 1, keys
    key = keys[0]
    assert key is not None
    return key


async def test_tether_publish_retries_a_503_with_the_same_key() -> None:
    async with FlakyEvent([503, "drop", 202]) as server:
        code, out, err = await tether_publish("--url", server.url, '{"type":"x"}')
    assert code == 0, err
    assert json.loads(out) == {"accepted": True, "topic": "*", "seq": 1}
    key = one_key(server.keys, 3)
    assert str(uuid.UUID(key)) == key  # made once, a UUID
    assert "attempt 1 of 5 failed (HTTP 503" in err and "attempt 2 of 5 failed" in err
    assert err.count(f"with Idempotency-Key {key}") == 2


async def test_tether_publish_sends_the_given_key_and_gives_up_with_it() -> None:
    async with FlakyEvent([503]) as server:
        code, _, err = await tether_publish("--url", server.url, "--key", "order 7",
                                            "--attempts", "2", '{"type":"x"}')
    assert code == 1
    assert server.keys == ["order 7", "order 7"]
    assert "refused with HTTP 503" in err and "--key 'order 7'" in err


async def test_tether_publish_does_not_retry_a_refusal() -> None:
    async with FlakyEvent([400]) as server:
        code, _, err = await tether_publish("--url", server.url, '{"type":"x"}')
    assert code == 1 and len(server.keys) == 1 and "refused with HTTP 400" in err


async def test_client_publish_retries_with_one_key_and_logs_each_retry(
    log_capture: LogCapture,
) -> None:
    async with FlakyEvent([503, 503, 202]) as server:
        client = TetherClient(server.url.replace("http", "ws") + "/ws")
        reply = await client.publish({"type": "x"})
        assert reply["seq"] == 1
        key = one_key(server.keys, 3)
        retries = log_capture.find("Publish failed, retrying with the same key")
        assert [r["data"]["attempt"] for r in retries] == [1, 2]
        assert all(r["data"]["key"] == key and r["level"] == "warn" for r in retries)

        server.keys.clear()
        server.script = [503]
        with pytest.raises(PublishError) as err:
            await client.publish({"type": "x"}, key="mine", attempts=2)
        assert err.value.status == 503 and server.keys == ["mine", "mine"]
