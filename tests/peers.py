"""A separate client process holding N healthy WebSocket connections.

`python -m tests.peers URL N` prints one line per connection with its sessionId,
then `READY`; every connection keeps reading, so aiohttp answers each ping.
Tests stop it with SIGSTOP to make all N dead peers at once."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp


async def hold(session: aiohttp.ClientSession, url: str, ready: asyncio.Queue[str]) -> None:
    async with session.ws_connect(url, autoping=True, heartbeat=None) as ws:
        first = await ws.receive_json()
        await ready.put(first["sessionId"])
        async for _ in ws:
            pass


async def main(url: str, n: int) -> None:
    ready: asyncio.Queue[str] = asyncio.Queue()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        tasks = [asyncio.create_task(hold(session, url, ready)) for _ in range(n)]
        for _ in range(n):
            print(json.dumps({"sessionId": await ready.get()}), flush=True)
        print("READY", flush=True)
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
