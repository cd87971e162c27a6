"""The operator views over real sockets: disconnects counted by close code in `/health`."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.aio import eventually
from tests.conftest import LogCapture, StartTether
from tests.hostile import Raw
from tests.wsraw import RawWS
from tether import metrics


async def get_json(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return await r.json()


def logged_codes(log_capture: LogCapture) -> list[int]:
    lines = log_capture.find("WebSocket client disconnected")
    return sorted(line["data"]["code"] for line in lines)


async def test_health_counts_disconnects_by_the_logged_close_code(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(heartbeat_interval_ms=200, heartbeat_missed=2, admin_token="op")
    url = f"ws://127.0.0.1:{t.port}/ws"
    health = f"{t.url}/health"
    assert (await get_json(health, "op"))["disconnects"] == {}

    async with aiohttp.ClientSession() as s:
        for code in (1000, 1000, 4000):  # the client's own close frame
            ws = await s.ws_connect(url)
            await ws.receive_json()
            await ws.close(code=code)
        keeper = await s.ws_connect(url)  # stays, reading (so it answers pings): not counted
        await keeper.receive_json()
        reading = asyncio.ensure_future(keeper.receive())

        # No close frame at all: the socket just goes (1006).
        dropped = await asyncio.to_thread(RawWS, "127.0.0.1", t.port)
        await asyncio.to_thread(dropped.recv_data)
        dropped.close()
        # Invalid UTF-8: the server fails the connection (1007, RFC 6455 §8.1).
        bad = await asyncio.to_thread(RawWS, "127.0.0.1", t.port)
        await asyncio.to_thread(bad.recv_data)
        bad.send_frame(0x1, b"\xff\xfe")
        # Never answers a ping: closed as stale, `1000 "Heartbeat timeout"`.
        silent = await asyncio.to_thread(RawWS, "127.0.0.1", t.port)
        await asyncio.to_thread(silent.recv_data)

        assert await eventually(lambda: len(logged_codes(log_capture)) == 6, 5), logged_codes(
            log_capture)
        counted = (await get_json(health, "op"))["disconnects"]
        assert counted == {"1000": 3, "1006": 1, "1007": 1, "4000": 1}
        # The same numbers as the log lines an operator would grep.
        assert sorted(int(c) for c, n in counted.items() for _ in range(n)) == logged_codes(
            log_capture)
        assert t.hub.heartbeat is not None and t.hub.heartbeat.stale_closed == 1
        bad.close()
        silent.close()

        # Only the admin sees them: the minimal /health is unchanged.
        assert "disconnects" not in await get_json(health)
        assert not reading.done()
        await keeper.close()
        await reading


async def test_metrics_count_disconnects_by_code(start_tether: StartTether) -> None:
    t = await start_tether(heartbeat_interval_ms=0)
    ws = await Raw.connect(t.port)
    await ws.recv_json()
    ws.send(0x8, (4000).to_bytes(2, "big"))
    await ws.close_code()
    ws.close()
    assert await eventually(lambda: len(t.hub.registry) == 0)
    text = metrics.render(t.hub).decode()
    assert 'tether_disconnects_total{code="4000"} 1.0' in text
