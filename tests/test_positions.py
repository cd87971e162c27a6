"""Positions that cannot be confused across lives of the history, and no publish lost to shutdown.

Issue 15: a restarted in-memory server numbers each topic from 1 again, so a
client's `since=t:100` must not be answered from the new numbering; and a
publish answered 202 must reach the clients connected at that moment.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

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

