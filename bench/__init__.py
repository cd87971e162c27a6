"""tether's benchmark suite: tether and its Python peers, measured side by side (issue 8).

`python -m bench` starts each server (tether, websockets, aiohttp, picows) as its
own process, drives it with one load-generator process, and prints one table of
memory per connection (A), heartbeat CPU (B), fan-out CPU and rate (C) and
dead-peer detection time (D), plus the 19,000-connection scale check.
"""
