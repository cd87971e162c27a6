"""An echo application built only from tether's public API, for the Autobahn cases.

A test fixture, not a product flag: `python tests/autobahn_echo.py PORT` runs a
`Tether` whose `on_message` handler sends every text and binary message back
with `send`. Limits are raised so the suite's 16 MiB messages and ping bursts
are within them; everything else is tether's default behaviour (its own pings
and pongs, its close handling, its pre-encoded frames).
"""

from __future__ import annotations

import asyncio
import sys

from tether import Settings, Tether

MAX_MESSAGE = 16 * 1024 * 1024


def settings(port: int) -> Settings:
    return Settings(
        port=port,
        log_level="warn",
        max_message=MAX_MESSAGE,
        max_buffer=4 * MAX_MESSAGE,  # a 16 MiB echo must not count as a slow client
        message_rate=1_000_000,
        ping_rate=100_000,  # the 2.* cases send pings in bursts
        frame_rate=10_000_000,  # the 9.* cases send messages in 64 KiB of tiny fragments
        # The heartbeat's first ping comes at a random point of the interval; the
        # 6.4.* cases expect no frame but theirs while they wait, so it must not
        # fall inside the suite (its own ping/pong handling is still exercised
        # by the cases' pings).
        heartbeat_interval_ms=3_600_000,
    )


async def main(port: int) -> int:
    tether = Tether(settings(port), greet=False)

    @tether.on_message
    def echo(conn: object, data: str | bytes) -> None:
        tether.send(conn, data)  # type: ignore[arg-type]

    return await tether.run()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]))))
