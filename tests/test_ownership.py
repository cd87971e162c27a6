"""After the upgrade the socket is tether's: aiohttp lets go, and an idle client holds no task.

stream.py hands the upgraded socket to a transport of tether's own, so aiohttp's
request, `WebSocketResponse` and handler task are freed; a client's task runs
only while it has messages to be handled. These tests count the objects that
would remain (gc, asyncio.all_tasks, /proc/self/fd), over real sockets, and
check that the hand-over loses no byte the client sends.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket

import orjson
from aiohttp import web

from tests.aio import eventually
from tests.conftest import LogCapture, StartTether
from tests.hostile import Raw
from tests.redis_server import RedisServer
from tests.support import open_fds
from tests.wsraw import encode, read_frame_async
from tether.app import Tether
from tether.stream import ClientStream

CLIENTS = 40


def _aiohttp_objects() -> int:
    gc.collect()
    return sum(isinstance(o, web.BaseRequest | web.WebSocketResponse) for o in gc.get_objects())


async def _settled(t: Tether, clients: int) -> None:
    assert await eventually(lambda: len(t.hub.registry) == clients)
    for _ in range(5):  # aiohttp's handlers return on the next passes of the loop
        await asyncio.sleep(0.01)


async def test_an_idle_client_keeps_no_aiohttp_object_and_no_task(
        start_tether: StartTether) -> None:
    t = await start_tether()
    await _settled(t, 0)
    objects, tasks = _aiohttp_objects(), len(asyncio.all_tasks())
    clients = [await Raw.connect(t.port, "/ws?topics=news") for _ in range(CLIENTS)]
    for c in clients:
        assert (await c.recv_json())["type"] == "connected"
    await _settled(t, CLIENTS)
    assert _aiohttp_objects() <= objects, "aiohttp's request or WebSocketResponse is kept"
    assert len(asyncio.all_tasks()) <= tasks, "an idle client holds a task"

    # The connections work: a broadcast reaches each, and each one's message is
    # answered by a task that ends once it is handled.
    await t.publish({"type": "tick", "topic": "news", "payload": 1})
    for c in clients:
        assert (await c.recv_json())["type"] == "tick"
    for i, c in enumerate(clients):
        c.send_json({"type": "subscribe", "topics": [f"t{i}"]})
    for c in clients:
        reply = await c.recv_json()
        assert reply["type"] == "subscribed", reply
    await _settled(t, CLIENTS)
    assert len(asyncio.all_tasks()) <= tasks, "a task outlived the message it handled"
    for c in clients:
        c.close()
    await _settled(t, 0)


async def test_a_frame_sent_the_moment_the_101_arrives_is_read(start_tether: StartTether) -> None:
    """The hand-over window: the client writes at once; nothing is read by aiohttp or lost."""
    t = await start_tether()
    first = encode(0x1, orjson.dumps({"type": "subscribe", "topics": ["early"]}))
    for _ in range(100):
        c = await Raw.connect(t.port)
        c.writer.write(first)  # at once, on reading the 101
        types = [(await c.recv_json())["type"], (await c.recv_json())["type"]]
        assert types == ["connected", "subscribed"], types
        c.close()
    await _settled(t, 0)


async def test_no_descriptor_is_left_behind(start_tether: StartTether) -> None:
    """Each hand-over duplicates the socket: every client that leaves, however, frees both."""
    t = await start_tether()
    await _settled(t, 0)
    before = open_fds(os.getpid())
    for round_ in range(5):
        clients = [await Raw.connect(t.port) for _ in range(CLIENTS)]
        for i, c in enumerate(clients):
            if (i + round_) % 3 == 0:
                c.writer.transport.abort()  # reset, maybe before the greeting was read
            elif (i + round_) % 3 == 1:
                c.writer.write(encode(0x8, b"\x03\xe8"))  # a close handshake
            else:
                c.writer.close()  # FIN without a close frame
        await _settled(t, 0)
        for c in clients:  # the handshakes' sockets: closed by the server, now by the client
            await asyncio.wait_for(c.reader.read(), 5)
            c.writer.close()
    assert await eventually(lambda: open_fds(os.getpid()) <= before), \
        f"{open_fds(os.getpid()) - before} descriptors leaked"


async def test_a_resume_in_the_upgrade_comes_before_any_live_message(
        start_tether: StartTether) -> None:
    """`?since=` is answered first: no live message slips out ahead of the replay or resync.

    The resume runs in the client's task, which starts a loop pass after the socket
    became tether's; publishes never stop meanwhile (found by the chaos test).
    """
    t = await start_tether(history_size=10_000)
    stop = asyncio.Event()

    async def publishing() -> None:
        i = 0
        while not stop.is_set() and i < 8_000:  # bounded: seq 2 stays in the history
            i += 1
            await t.publish({"type": "tick", "topic": "t", "payload": i})
            await asyncio.sleep(0)

    publisher = asyncio.create_task(publishing())
    try:
        await eventually(lambda: (t.hub.backplane.position("t") or 0) > 5)
        for i in range(60):
            stale = i % 2 == 0  # a position from another life of the history: resync first
            query = "?topics=t&since=t:1" + ("&epoch=elsewhere" if stale else "")
            c = await Raw.connect(t.port, "/ws" + query)
            assert (await c.recv_json())["type"] == "connected"
            first = await c.recv_json()
            if stale:
                assert first["type"] == "resync", first
                last = int(first["seq"])
            else:
                assert first.get("seq") == 2, first  # the replay, from the seq after since
                last = 2
            for _ in range(5):
                msg = await c.recv_json()
                assert msg["type"] == "tick" and msg["seq"] == last + 1, (last, msg)
                last += 1
            c.close()
    finally:
        stop.set()
        await publisher


async def test_a_failure_in_handling_a_message_closes_that_client_with_1011(
        start_tether: StartTether, log_capture: LogCapture) -> None:
    """A bug in tether's own handling (injected here) costs the one client, logged once."""
    t = await start_tether()

    async def broken(conn: object, data: str) -> None:
        raise RuntimeError("injected")

    victim, bystander = await Raw.connect(t.port), await Raw.connect(t.port)
    for c in (victim, bystander):
        assert (await c.recv_json())["type"] == "connected"
    text, t.hub.text = t.hub.text, broken  # type: ignore[method-assign]
    victim.send_json({"type": "ping"})
    code, _ = await victim.close_code()
    assert code == 1011
    assert await eventually(lambda: len(t.hub.registry) == 1)
    t.hub.text = text  # type: ignore[method-assign]
    bystander.send_json({"type": "subscribe", "topics": ["x"]})
    assert (await bystander.recv_json())["type"] == "subscribed"
    failed = log_capture.find("WebSocket handler failed")
    assert len(failed) == 1, failed
    gone = log_capture.find("WebSocket client disconnected")
    assert [r["data"]["code"] for r in gone] == [1011], gone
    victim.close()
    bystander.close()


async def test_an_upgrade_that_races_the_shutdown_gets_1001(start_tether: StartTether) -> None:
    """Between aiohttp's 101 and the socket becoming tether's, shutdown may begin: 1001."""
    t = await start_tether()
    t.hub.shutting_down = True  # as Tether.stop sets it, before closing every client
    ours, theirs = socket.socketpair()
    stream = ClientStream(t.hub, 1024, lambda peer: t.hub.open(peer, "test"))
    await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    frame = await asyncio.wait_for(read_frame_async(reader.readexactly), 5)
    assert frame.close_code == 1001
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the socket closed
    assert len(t.hub.registry) == 0
    writer.close()
    t.hub.shutting_down = False


async def test_a_message_sent_during_the_resume_is_answered(
        start_tether: StartTether, private_redis: RedisServer) -> None:
    """A `?since=` resume over Redis waits for the network; what the client sends meanwhile
    is handled once it is done, not left until the client sends something else."""
    t = await start_tether(redis_url=private_redis.url)
    await t.publish({"type": "tick", "topic": "own.r", "payload": 1})
    subscribe = {"type": "subscribe", "topics": ["own.other"]}
    for _ in range(3):
        private_redis.proc.send_signal(signal.SIGSTOP)  # the resume's history read waits
        try:
            c = await Raw.connect(t.port, "/ws?topics=own.r&since=own.r:0")
            assert (await c.recv_json())["type"] == "connected"
            c.send_json(subscribe)  # arrives while the resume is under way
            await asyncio.sleep(0.2)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
        seen = [(await c.recv_json())["type"] for _ in range(2)]
        assert sorted(seen) == ["subscribed", "tick"], seen
        c.close()
