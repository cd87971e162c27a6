"""Plain `aiohttp`: `WebSocketResponse(heartbeat=I)` and a send loop over the clients."""

from __future__ import annotations

import time

from aiohttp import web

from bench.proc import emit
from bench.servers.common import command_loop, message, parse_args, run


async def main() -> None:
    args = parse_args()
    clients: set[web.WebSocketResponse] = set()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=args.interval)
        await ws.prepare(request)
        clients.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            clients.discard(ws)
            emit("closed", wall=time.time())
        return ws

    async def send(i: int) -> None:
        data = message(i)
        for ws in list(clients):
            if not ws.closed:
                await ws.send_str(data)

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    emit("ready", port=port, server="aiohttp")

    await command_loop(send, lambda: len(clients))


if __name__ == "__main__":
    run(main, use_uvloop=parse_args().uvloop)
