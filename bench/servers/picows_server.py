"""`picows` on uvloop: its own auto-ping, and a send loop over the transports."""

from __future__ import annotations

import time

from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)

from bench.proc import emit
from bench.servers.common import command_loop, message, parse_args, run

CLIENTS: set[WSTransport] = set()


class Listener(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        CLIENTS.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CLIENTS.discard(transport)
        emit("closed", wall=time.time())


async def main() -> None:
    args = parse_args()

    def factory(request: WSUpgradeRequest) -> WSListener:
        return Listener()

    server = await ws_create_server(
        factory, "127.0.0.1", args.port,
        enable_auto_ping=True,
        auto_ping_idle_timeout=args.interval,
        auto_ping_reply_timeout=args.interval,
        auto_ping_strategy=WSAutoPingStrategy.PING_PERIODICALLY,
    )
    port = server.sockets[0].getsockname()[1]
    emit("ready", port=port, server="picows")

    async def send(i: int) -> None:
        data = message(i).encode()
        for t in list(CLIENTS):
            t.send(WSMsgType.TEXT, data)

    await command_loop(send, lambda: len(CLIENTS))


if __name__ == "__main__":
    run(main, use_uvloop=True)
