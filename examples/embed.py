"""Run tether inside your own asyncio program, with a shutdown handler of your own.

    .venv/bin/python examples/embed.py      # serves http://localhost:4011 (PORT=... to change)
    .venv/bin/tether watch ws://localhost:4011/ws --topics ticks     # in another terminal

It publishes a price to `ticks` every second. Ctrl+C (SIGINT) or SIGTERM stops it: the
handler `prices` runs first, stops the prices and tells the clients, still connected, that
the feed ends; then tether closes them (1001) and the program exits 0.
"""

import asyncio
import os
import sys

from tether import Settings, Tether, logs


class Prices:
    """Your application's own work: a price a second, published to `ticks`."""

    def __init__(self, t: Tether) -> None:
        self.t = t
        self.sent = 0
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1)
            price = {"n": self.sent + 1, "eur": 1.08}
            await self.t.publish({"type": "price", "topic": "ticks", "payload": price})
            self.sent += 1

    async def stop(self) -> None:
        """The shutdown handler: no more prices, and the clients are told so."""
        self.task.cancel()
        await asyncio.wait([self.task])
        await self.t.publish({"type": "end", "topic": "ticks", "payload": {"prices": self.sent}})
        print(f"prices stopped after {self.sent}", flush=True)


async def main() -> int:
    logs.setup("info", form="auto")  # tether's log lines: text on a terminal, JSON otherwise
    t = Tether(Settings(port=int(os.environ.get("PORT", 4011)), heartbeat_interval_ms=20_000))
    prices = Prices(t)
    t.on_shutdown("prices", prices.stop, 60)  # before the heartbeat stops (55) and clients go (50)
    try:
        return await t.run()  # serves until SIGINT or SIGTERM, then runs the shutdown handlers
    except OSError as exc:  # the port is taken
        print(f"cannot listen: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
