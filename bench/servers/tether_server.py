"""tether, as `tether serve` builds it, plus the suite's stdin commands."""

from __future__ import annotations

import asyncio
import os
from dataclasses import fields

from bench.proc import emit
from bench.servers.common import PAD, command_loop, parse_args, run
from tether import Settings, Tether, logs

_FIELDS = {f.name for f in fields(Settings)}


async def main() -> None:
    args = parse_args()
    # warn: the stale-connection line (D) is logged, per-connect info lines are not.
    logs.setup("warn")
    # The suite opens more clients than the default connection limits (19,000 at
    # scale, all from 127.0.0.1).
    limits = {"max_connections": 100_000, "max_per_address": 0}
    extra = {k: v for k, v in limits.items() if k in _FIELDS}
    if os.environ.get("TETHER_BENCH_AUTH"):
        # Access control on (issue 14): the load generator's clients hold no token
        # and read the broadcast as anonymous readers of a public topic; the
        # permission checks happen at subscribe, so fan-out must cost the same.
        extra |= {"auth_secret": "bench-secret-" + "x" * 32, "public_topics": ("*",)}
    settings = Settings(
        **extra,
        port=args.port,
        log_level="warn",
        heartbeat_interval_ms=round(args.interval * 1000),
        heartbeat_missed=args.missed,
    )
    t = Tether(settings)
    await t.start()
    loop = type(asyncio.get_running_loop())
    emit("ready", port=t.port, server="tether", loop=f"{loop.__module__}.{loop.__name__}")

    async def broadcast(i: int) -> None:
        await t.publish({"type": "tick", "payload": {"i": i, "pad": PAD}})

    # SIGTERM from the suite ends the process; so does stdin closing.
    await command_loop(broadcast, lambda: len(t.hub.registry))


if __name__ == "__main__":
    run(main, use_uvloop=parse_args().uvloop)
