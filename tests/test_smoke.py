from __future__ import annotations

import aiohttp

from tests.aio import post_event
from tests.conftest import StartTether
from tests.support import ServerProcess


async def test_connect_publish_receive(start_tether: StartTether) -> None:
    t = await start_tether()
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as ws:
        hello = await ws.receive_json()
        assert hello["type"] == "connected"
        assert (await post_event(t.url, {"type": "x"}, session=s)).status == 202
        assert (await ws.receive_json()) == {"type": "x", "topic": "*", "seq": 1}


def test_process_starts_and_stops() -> None:
    server = ServerProcess().start()
    assert server.port > 0
    assert server.stop() == 0
