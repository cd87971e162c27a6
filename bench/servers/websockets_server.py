"""Plain `websockets`: built-in keepalive (`ping_interval`) and `broadcast()`."""

from __future__ import annotations

import time

from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench.proc import emit
from bench.servers.common import command_loop, message, parse_args, run


async def main() -> None:
    args = parse_args()
    clients: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)
            emit("closed", wall=time.time())

    async def send(i: int) -> None:
        broadcast(clients, message(i))

    async with serve(
        handler, "127.0.0.1", args.port, ping_interval=args.interval, ping_timeout=args.interval,
        compression=None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        emit("ready", port=port, server="websockets")

        await command_loop(send, lambda: len(clients))


if __name__ == "__main__":
    run(main, use_uvloop=parse_args().uvloop)
