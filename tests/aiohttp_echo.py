"""A bare aiohttp echo server: the baseline the Autobahn cases are measured against.

Run as `python tests/aiohttp_echo.py PORT`; prints `ready PORT` once listening.
Only aiohttp's defaults plus what an echo server for the suite needs (no size cap
below 16 MiB, no compression, aiohttp answering pings itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from aiohttp import WSMsgType, web

MAX_MESSAGE = 16 * 1024 * 1024 + 1  # aiohttp refuses a message of exactly max_msg_size


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"ready {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1])))
