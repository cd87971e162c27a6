"""Subscribe to `orders`, publish an order, and print every message that arrives.

    .venv/bin/tether serve &                            # or `make run` in another terminal
    .venv/bin/python examples/client.py [ws://localhost:4011/ws]

Ctrl+C stops it.
"""

import asyncio
import contextlib
import sys

from tether.client import Client

URL = sys.argv[1] if len(sys.argv) > 1 else "ws://localhost:4011/ws"


async def main() -> None:
    async with Client(URL, topics=["orders"]) as client:  # returns once connected and subscribed
        await client.publish({"type": "order", "payload": {"id": 7}}, topic="orders")
        async for msg in client:  # reconnects and resumes by itself
            if msg["type"] == "resync":  # the gap was older than the history
                print("refetch state of", msg["topic"], flush=True)
                continue
            print(msg["topic"], msg["seq"], msg.get("payload"), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
