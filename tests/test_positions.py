"""Positions that cannot be confused across lives of the history, and no publish lost to shutdown.

Issue 15: a restarted in-memory server numbers each topic from 1 again, so a
client's `since=t:100` must not be answered from the new numbering; and a
publish answered 202 must reach the clients connected at that moment.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.aio import post_event
from tests.conftest import StartTether
from tests.hostile import Raw
from tests.support import free_port
from tether import Settings
from tether.app import Tether


async def _events(ws: Raw, marker: str) -> list[dict[str, Any]]:
    """Every message before the pong answering ping `marker`."""
    ws.send_json({"type": "ping", "id": marker})
    out = []
    while True:
        msg = await ws.recv_json()
        if msg.get("id") == marker:
            return out
        out.append(msg)


async def test_connected_names_the_epoch_and_a_since_from_another_one_gets_resync(
    start_tether: StartTether,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    for i in range(5):
        await t.publish({"type": "x", "topic": "t", "payload": i})
    epoch = t.backplane.epoch
    assert len(epoch) >= 8

    same = await Raw.connect(t.port, f"/ws?since=t:3&epoch={epoch}")
    hello = await same.recv_json()
    assert (hello["type"], hello["epoch"]) == ("connected", epoch)
    assert [m["seq"] for m in await _events(same, "a")] == [4, 5]  # the same life: replayed

    legacy = await Raw.connect(t.port, "/ws?since=t:3")  # no epoch: taken as the current one
    await legacy.recv_json()
    assert [m["seq"] for m in await _events(legacy, "b")] == [4, 5]

    other = await Raw.connect(t.port, "/ws?since=t:3&epoch=an-older-life")
    await other.recv_json()
    got = await _events(other, "c")
    assert got == [{"type": "resync", "topic": "t", "seq": 5}]  # never 4, 5 of this life
    # The same through a `resume` message.
    other.send_json({"type": "resume", "since": {"t": 1}, "epoch": "an-older-life"})
    assert await _events(other, "d") == [{"type": "resync", "topic": "t", "seq": 5}]
    # And afterwards the live stream continues from the position it was told.
    await t.publish({"type": "x", "topic": "t"})
    for ws in (same, legacy, other):
        assert (await ws.recv_json())["seq"] == 6
        ws.close()


async def test_a_restarted_memory_server_gets_resync_not_its_new_numbering() -> None:
    port = free_port()
    first = Tether(Settings(port=port, heartbeat_interval_ms=0))
    await first.start()
    for i in range(100):
        await first.publish({"type": "x", "topic": "t", "payload": i})
    ws = await Raw.connect(port, "/ws?topics=t")
    old_epoch = (await ws.recv_json())["epoch"]
    await first.stop()
    ws.close()

    second = Tether(Settings(port=port, heartbeat_interval_ms=0))
    await second.start()
    try:
        for i in range(171):  # more than the client saw, accepted before it comes back
            await second.publish({"type": "x", "topic": "t", "payload": i})
        back = await Raw.connect(port, f"/ws?since=t:100&epoch={old_epoch}")
        hello = await back.recv_json()
        assert hello["epoch"] != old_epoch
        assert await _events(back, "z") == [{"type": "resync", "topic": "t", "seq": 171}]
        back.close()
    finally:
        await second.stop()


async def test_publishes_during_shutdown_are_refused_503_and_accepted_ones_all_arrive() -> None:
    t = Tether(Settings(port=0, heartbeat_interval_ms=0, close_timeout_ms=1000))
    await t.start()
    ws = await Raw.connect(t.port, "/ws?topics=t")
    await ws.recv_json()
    base = f"http://127.0.0.1:{t.port}"
    accepted: list[int] = []
    refused: list[dict[str, Any]] = []

    async def publisher() -> None:
        for i in range(400):
            try:
                reply = await post_event(base, {"type": "x", "topic": "t", "payload": i})
            except (TimeoutError, OSError):
                return  # the listener is gone
            except Exception as exc:  # aiohttp's errors once the server closed
                if "Server disconnected" in str(exc) or "Cannot connect" in str(exc):
                    return
                raise
            if reply.status == 202:
                accepted.append(reply.body["seq"])
            else:
                assert reply.status == 503, reply
                refused.append(reply.body)
            await asyncio.sleep(0)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0.05)
    await t.stop()
    await task
    code, frames = await ws.close_code()
    assert code == 1001
    received = [orjson.loads(f.payload)["seq"] for f in frames if f.opcode == 0x1]
    assert accepted and received[: len(accepted)] == accepted  # every 202, before the close
    assert refused and all(r["retry"] and "shutting down" in r["error"] for r in refused)
    ws.close()



async def _read_all(ws: Raw, until_type: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every message until one of type `until_type` (included)."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await ws.recv_json(max(0.1, deadline - loop.time()))
        out.append(msg)
        if msg.get("type") == until_type:
            return out


@pytest.mark.parametrize("history", [2000, 100])
async def test_a_paused_client_gets_all_1000_in_order_after_draining_or_a_resync(
    start_tether: StartTether, history: int
) -> None:
    t = await start_tether(heartbeat_interval_ms=0, history_size=history,
                           backpressure_high=16_384, backpressure_low=4_096,
                           max_buffer=64 * 1024 * 1024)
    ws = await Raw.connect(t.port, "/ws?topics=t", rcvbuf=4096, limit=1024)
    await ws.recv_json()
    (conn,) = t.hub.registry
    # The client reads nothing: big messages fill the socket buffers until it is paused...
    filled = 0
    while not conn.outbox.paused:
        await t.publish({"type": "n", "topic": "t", "payload": "f" * 60_000})
        await asyncio.sleep(0.001)
        filled += 1
        assert filled < 2000, "the client was never paused"
    # ...and stays paused while 1,000 normal messages are published.
    for i in range(1000):
        await t.publish({"type": "n", "topic": "t", "payload": i})
    assert conn.outbox.paused and conn.deferrals >= 1000
    await t.publish({"type": "end", "topic": "t"})
    last = filled + 1001
    if history >= last:  # everything still in the history: all of it, in order, once
        got = await _read_all(ws, "end")
        assert [m["seq"] for m in got] == list(range(1, last + 1))
    else:  # the history moved past what was held back: what it had, then a resync
        got = await _read_all(ws, "resync")
        ahead = [m["seq"] for m in got[:-1]]
        assert ahead == list(range(1, len(ahead) + 1))  # in order, no hole before it
        assert got[-1] == {"type": "resync", "topic": "t", "seq": last}
        await t.publish({"type": "after", "topic": "t"})
        assert (await ws.recv_json())["seq"] == last + 1  # and on from the told position
    ws.close()


async def test_subscribed_tells_each_topics_position_and_nothing_falls_between(
    start_tether: StartTether,
) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    for _ in range(7):
        await t.publish({"type": "x", "topic": "busy"})
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    ws.send_json({"type": "subscribe", "topics": ["busy", "empty"]})
    told = await ws.recv_json()
    assert told == {"type": "subscribed", "topics": ["busy", "empty"],
                    "seqs": {"busy": 7, "empty": 0}}
    # Publishes racing the subscription: the client gets each once, in order, from
    # the position it was told (here the two the loop publishes while it waits).
    await asyncio.gather(t.publish({"type": "x", "topic": "empty"}),
                         t.publish({"type": "x", "topic": "busy"}))
    got = [await ws.recv_json(), await ws.recv_json()]
    assert sorted((m["topic"], m["seq"]) for m in got) == [("busy", 8), ("empty", 1)]
    ws.close()


async def test_connected_tells_where_each_topic_it_reads_stands(start_tether: StartTether) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    for _ in range(3):
        await t.publish({"type": "x", "topic": "t"})
    await t.publish({"type": "x"})  # the broadcast topic
    ws = await Raw.connect(t.port, "/ws?topics=t,quiet")
    hello = await ws.recv_json()
    assert hello["seqs"] == {"t": 3, "quiet": 0, "*": 1}
    await t.publish({"type": "x", "topic": "quiet"})
    msg = await ws.recv_json()
    assert (msg["topic"], msg["seq"]) == ("quiet", 1)  # right after the told position
    ws.close()


async def test_held_back_messages_reach_a_paused_client_before_its_1001() -> None:
    """What a paused client had held back was accepted too: it goes out before the 1001.

    A memory history dies with the process, so a resume could never bring it back
    (found by the chaos test: a client paused while the server restarted).
    """
    t = Tether(Settings(port=0, heartbeat_interval_ms=0, close_timeout_ms=1000,
                        backpressure_high=16_384, backpressure_low=4_096,
                        max_buffer=64 * 1024 * 1024))
    await t.start()
    ws = await Raw.connect(t.port, "/ws?topics=t", rcvbuf=4096, limit=1024)
    await ws.recv_json()
    (conn,) = t.hub.registry
    filled = 0
    while not conn.outbox.paused:  # it reads nothing: big messages until it is paused
        await t.publish({"type": "n", "topic": "t", "payload": "f" * 60_000})
        await asyncio.sleep(0.001)
        filled += 1
        assert filled < 2000, "the client was never paused"
    for i in range(5):
        await t.publish({"type": "held", "topic": "t", "priority": "low", "payload": i})
    assert conn.outbox.paused and conn.deferrals >= 5
    stopping = asyncio.create_task(t.stop())
    code, frames = await ws.close_code(timeout=20)  # it reads again: everything, then the close
    await stopping
    assert code == 1001
    received = [orjson.loads(f.payload)["seq"] for f in frames if f.opcode == 0x1]
    assert received == list(range(1, filled + 6))  # the held-back five included, in order
    ws.close()
