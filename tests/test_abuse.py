"""200 misbehaving connections alongside 50 well-behaved clients on one server (SPEC §6, §10).

The misbehaving ones, 40 of each kind: message floods, ping floods, oversize
messages, clients that never read while a broadcast runs, and TCP connections
that never send a request. Every well-behaved client must receive every
published message, in order, exactly once; every misbehaving one must be closed
with its documented code (1008, 1009, 1013) or dropped at the handshake.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.aio import eventually
from tests.conftest import LogCapture, StartTether
from tests.hostile import Raw, dropped, encode, open_tcp

KIND = 40  # misbehaving connections of each kind (5 kinds: 200)
GOOD = 50
MESSAGES = 80


class Good:
    """A well-behaved client: reads all the time, remembers every seq."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seqs: list[int] = []
        self.other: list[Any] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                data = orjson.loads(msg.data)
                if data.get("type") == "tick":
                    self.seqs.append(data["seq"])
                elif data.get("type") != "connected":
                    self.other.append(data)


@pytest.mark.slow
async def test_misbehaving_connections_are_closed_and_never_cost_the_good_ones_a_message(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(
        heartbeat_interval_ms=0,  # a stalled reader must be closed as slow, not stale
        message_rate=20, ping_rate=5, max_message=8192, handshake_timeout_ms=1000,
        backpressure_high=16_384, backpressure_low=4_096, max_buffer=131_072,
        close_timeout_ms=1000,
    )
    port = t.port
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        good = [Good(await session.ws_connect(f"ws://127.0.0.1:{port}/ws", autoping=True))
                for _ in range(GOOD)]

        async def raw(**kw: Any) -> tuple[Raw, str]:
            ws = await Raw.connect(port, **kw)
            hello = await ws.recv_json()
            return ws, hello["sessionId"]

        msg_flood = [await raw() for _ in range(KIND)]
        ping_flood = [await raw() for _ in range(KIND)]
        oversize = [await raw() for _ in range(KIND)]
        # The stalled readers also take topic `bulk`: enough bytes to pass the kernel's
        # socket buffers (a few MB on loopback) and WS_MAX_BUFFER behind them.
        stalled = [await raw(path="/ws?topics=bulk", limit=1024, rcvbuf=4096)
                   for _ in range(KIND)]
        started = time.monotonic()
        silent = [await open_tcp(port) for _ in range(KIND)]
        assert len(t.hub.registry) == GOOD + 4 * KIND

        # Everything at once: the floods and the oversize messages go out while
        # the broadcast runs.
        for ws, _ in msg_flood:
            ws.writer.write(b"".join(encode(0x1, b'{"type":"ping"}') for _ in range(300)))
        for ws, _ in ping_flood:
            ws.writer.write(encode(0x9, b"p" * 16) * 300)
        for ws, _ in oversize:
            ws.send(0x1, b'{"type":"ping","pad":"' + b"z" * 9000 + b'"}')

        async def broadcast() -> None:
            for i in range(MESSAGES):
                await t.publish({"type": "tick", "priority": "high", "payload": "x" * 6000,
                                 "i": i})
                await asyncio.sleep(0.01)

        async def bulk() -> None:
            for _ in range(1500):
                if t.hub.stats.slow_closed >= KIND:
                    return
                await t.publish({"type": "bulk", "topic": "bulk", "priority": "high",
                                 "payload": "b" * 6000})
                await asyncio.sleep(0)

        async def code_of(ws: Raw) -> int | None:
            return (await ws.close_code(15))[0]

        results = await asyncio.gather(
            broadcast(),
            bulk(),
            asyncio.gather(*(code_of(ws) for ws, _ in msg_flood)),
            asyncio.gather(*(code_of(ws) for ws, _ in ping_flood)),
            asyncio.gather(*(code_of(ws) for ws, _ in oversize)),
            asyncio.gather(*(dropped(reader, 10) for reader, _ in silent)),
        )
        silent_elapsed = time.monotonic() - started
        _, _, flood_codes, ping_codes, oversize_codes, silent_dropped = results
        assert flood_codes == [1008] * KIND, flood_codes
        assert ping_codes == [1008] * KIND, ping_codes
        assert oversize_codes == [1009] * KIND, oversize_codes
        assert all(silent_dropped) and silent_elapsed < 10, silent_elapsed

        # Every well-behaved client got every message, in order, exactly once.
        # Not asserted here: the exact checks below say what is missing.
        await eventually(lambda: all(len(g.seqs) >= MESSAGES for g in good), 15, interval=0.05)
        for g in good:
            assert g.seqs == list(range(1, MESSAGES + 1)), g.seqs[:5]
            assert g.other == [], g.other[:3]
            assert not g.ws.closed

        # The readers that never read were closed as too slow (1013), as the server saw it.
        stalled_ids = {sid for _, sid in stalled}

        def gone() -> dict[str, int]:
            return {r["data"]["sessionId"]: r["data"]["code"]
                    for r in log_capture.find("WebSocket client disconnected")}

        await eventually(lambda: stalled_ids <= gone().keys(), 10, interval=0.05)  # checked next
        assert {gone().get(sid) for sid in stalled_ids} == {1013}
        assert t.hub.stats.slow_closed == KIND
        assert t.hub.stats.abuse_closed == 2 * KIND
        assert len(log_capture.find("Closing abusive client")) == 2 * KIND  # once each

        # Nothing leaked: exactly the good clients are left, and nothing went wrong.
        assert len(t.hub.registry) == GOOD
        assert not [r for r in log_capture.records() if r["level"] == "error"]
        for g in good:
            await g.ws.close()
            await g.task
    for ws, _ in [*msg_flood, *ping_flood, *oversize, *stalled]:
        ws.close()
    for _, writer in silent:
        writer.close()
