"""A client process that floods tether with one kind of frame, for as long as it is told.

`python -m tests.flooder PORT KIND SECONDS [CONNECTIONS]`: CONNECTIONS raw WebSockets
(default 2) each write KIND frames (`pong`, `ping`, `text`) as fast as the socket
takes them; when the server closes one, it reconnects 100 ms later and floods again, until
SECONDS have passed. It prints one JSON line: how many connections it made, the
close code each got (None: the connection ended with no close frame read, which
happens when the server's reset reaches the flooder while it is still writing),
and the frames written.
It runs in its own process so that its CPU is not the test's.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

import orjson

from tests.hostile import Raw, encode

FRAMES = {
    "pong": encode(0xA, b"12345678"),  # an unsolicited heartbeat-sized pong
    "ping": encode(0x9, b"p" * 16),
    "text": encode(0x1, b'{"type":"ping"}'),
}


async def one(port: int, kind: str, until: float, tally: Counter[str], sent: list[int]) -> None:
    loop = asyncio.get_running_loop()
    burst = FRAMES[kind] * 200
    while loop.time() < until:
        try:
            ws = await Raw.connect(port)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        closing = asyncio.create_task(ws.close_code(max(0.1, until - loop.time() + 2)))
        try:
            while not closing.done():  # at least one burst, even when time is up
                ws.writer.write(burst)
                sent[0] += 200
                try:
                    await asyncio.wait_for(ws.writer.drain(), 0.5)
                except (ConnectionError, TimeoutError):
                    break  # the server stopped reading us: wait for its close frame
                if loop.time() >= until:
                    break
            code, _ = await closing
        except ConnectionError:
            code = None
        except TimeoutError:
            code = "no close within 2 s"
        tally[str(code)] += 1  # None: dropped with no close frame
        ws.close()
        # A new flooding connection ten times a second per slot: a flood of
        # frames, not of handshakes (those are WS_MAX_PER_ADDRESS's business).
        await asyncio.sleep(0.1)


async def main(port: int, kind: str, seconds: float, connections: int) -> None:
    until = asyncio.get_running_loop().time() + seconds
    tally: Counter[str] = Counter()
    sent = [0]
    await asyncio.gather(*(one(port, kind, until, tally, sent) for _ in range(connections)))
    print(orjson.dumps({"kind": kind, "closes": dict(tally), "frames": sent[0]}).decode())


if __name__ == "__main__":
    port, kind, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    asyncio.run(main(port, kind, seconds, count))
