"""One client of the chaos test (`bench/chaos.py`): the protocol a careful client follows.

Written with aiohttp's WebSocket client directly, not tether's Python client, so
that what is checked is the server's side of the contract (README, "HTTP and
WebSocket API"):

- it keeps, per topic, the last seq it has and the `epoch` of the `connected`
  under which it got it (a position);
- it reconnects with `?topics=..&since=topic:seq,..&epoch=E` for the positions of
  the newest epoch, sends a `resume` with its own `epoch` for positions of an
  older one (a connection dropped between two resyncs can leave both), and
  `subscribe`s a topic it has no position for, taking it from `subscribed`'s
  `seqs`;
- on `resync` it takes the new position.

It records everything it gets, per connection, for the checker
(`bench/chaos_check.py`): one event `[kind, conn, t, topic, seq, extra]` each, `t`
being `time.monotonic()` (CLOCK_MONOTONIC: comparable across processes). It
judges nothing itself.

The faults it can be put through: stop reading for a while (`pause_reading`:
its transport stops reading, so the server's buffer for it grows; it keeps
sending `{"type":"ping"}` so that the heartbeat does not take it for dead), a
TCP reset (`reset`), and holding its reconnects back (`hold`). Suspending it
with SIGSTOP needs a process of its own: `python -m bench.chaos_client` runs
one, driven by JSON lines on stdin (`bench/proc.py`), and writes its events to
`--out` when told to quit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import aiohttp

from bench.proc import emit

# How long a connection may stay silent before the client takes it for dead:
# the server pings every WS_HEARTBEAT_INTERVAL (300 ms in the chaos test).
SILENCE = 10.0
PING_EVERY = 0.1  # while not reading: proof of life without reading the pongs


def _stream(ws: aiohttp.ClientWebSocketResponse) -> Any:
    """The aiohttp connection under `ws` (aiohttp has no public way to pause or abort it)."""
    response = getattr(ws, "_response", None)
    return getattr(response, "connection", None)


class ChaosClient:
    """A careful client on `topics`, reconnecting to any of `urls` (base URLs of nodes)."""

    def __init__(self, name: str, urls: list[str], topics: list[str], seed: int,
                 rcvbuf: int = 4096) -> None:
        self.name = name
        self.urls = urls
        self.topics = list(topics)
        self.rng = random.Random(seed)
        self.rcvbuf = rcvbuf
        self.events: list[list[Any]] = []
        self.positions: dict[str, tuple[int, str]] = {}  # topic -> (seq, epoch)
        self.epoch: str | None = None  # the last `connected`'s
        self.session_id: str | None = None
        self.url: str | None = None  # the node of the open connection
        self.conn = 0
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.hold_until = 0.0
        self.counts: Counter[str] = Counter()
        self._reading = asyncio.Event()
        self._reading.set()
        self._pause_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._failed: str | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.ready = asyncio.Event()  # every topic has a position

    # ------------------------------------------------------------------ recording

    def _record(self, kind: str, topic: str | None = None, seq: int | None = None,
                extra: Any = None) -> None:
        self.events.append([kind, self.conn, time.monotonic(), topic, seq, extra])

    # ------------------------------------------------------------------ faults

    def pause_reading(self, seconds: float | None) -> None:
        """Stop reading the socket (for `seconds`, or until `resume_reading`)."""
        ws = self.ws
        stream = _stream(ws) if ws is not None else None
        if ws is None or stream is None or stream.protocol is None or not self._reading.is_set():
            return
        self._reading.clear()
        stream.protocol.pause_reading()
        self._record("pause", extra=seconds)
        self.counts["paused"] += 1
        self._pause_task = asyncio.create_task(self._paused(ws, stream.protocol, seconds))

    def resume_reading(self) -> None:
        if self._pause_task is not None:
            self._pause_task.cancel()

    async def _paused(self, ws: aiohttp.ClientWebSocketResponse, protocol: Any,
                      seconds: float | None) -> None:
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while deadline is None or time.monotonic() < deadline:
                if ws.closed:
                    break
                try:
                    await ws.send_str('{"type":"ping"}')
                except (aiohttp.ClientError, ConnectionError, RuntimeError):
                    break
                await asyncio.sleep(PING_EVERY)
        finally:
            self._record("unpause")
            protocol.resume_reading()
            self._reading.set()
            self._pause_task = None

    def reset(self) -> bool:
        """Abort the connection with a TCP RST (SO_LINGER 0, then close)."""
        ws = self.ws
        stream = _stream(ws) if ws is not None else None
        transport = stream.transport if stream is not None else None
        if ws is None or transport is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._record("reset")
        self.counts["reset"] += 1
        transport.abort()
        return True

    def hold(self, seconds: float) -> None:
        """Make no new connection for `seconds` from now (the current one stays)."""
        self.hold_until = time.monotonic() + seconds

    def stop(self) -> None:
        self._stop.set()
        self.resume_reading()
        if self.ws is not None:
            self._spawn(self.ws.close())

    def state(self) -> dict[str, Any]:
        return {"positions": {t: list(p) for t, p in self.positions.items()},
                "epoch": self.epoch, "url": self.url, "sessionId": self.session_id,
                "connected": self.ws is not None and not self.ws.closed,
                "reading": self._reading.is_set(), "counts": dict(self.counts)}

    # ------------------------------------------------------------------ the connection loop

    async def run(self) -> None:
        """Connect, read, reconnect, until `stop`."""
        def small_buffer(addr: Any) -> socket.socket:
            # A small receive buffer: a client that stops reading fills quickly.
            sock = socket.socket(addr[0], addr[1], addr[2])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            return sock

        connector = aiohttp.TCPConnector(socket_factory=small_buffer, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            failures = 0
            first = True
            while not self._stop.is_set():
                if not first:
                    ready = time.monotonic() + self.rng.uniform(0.05, 0.3) * min(8, 2**failures)
                    # `hold` may change meanwhile: looked at again every 50 ms.
                    while (wait := max(ready, self.hold_until) - time.monotonic()) > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), min(wait, 0.05))
                        if self._stop.is_set():
                            return
                first = False
                if await self._connect_once(session):
                    failures = 0
                else:
                    failures += 1

    def _claims(self) -> tuple[str | None, dict[str, int], dict[str, dict[str, int]]]:
        """The epoch and positions to send on the URL, and the other epochs' for `resume`."""
        groups: dict[str, dict[str, int]] = {}
        for topic, (seq, epoch) in self.positions.items():
            groups.setdefault(epoch, {})[topic] = seq
        if not groups:
            return None, {}, {}
        main = self.epoch if self.epoch in groups else max(groups, key=lambda e: len(groups[e]))
        return main, groups.pop(main), groups

    async def _connect_once(self, session: aiohttp.ClientSession) -> bool:
        # Any node; after a failure, another one (a node killed: its clients go elsewhere).
        choices = [u for u in self.urls if u != self._failed] or self.urls
        url = self.rng.choice(choices)
        epoch, since, others = self._claims()
        query = []
        if since:
            query.append("topics=" + ",".join(since))
            query.append("since=" + ",".join(f"{t}:{s}" for t, s in since.items()))
            query.append(f"epoch={epoch}")
        target = url.replace("http://", "ws://") + "/ws" + ("?" + "&".join(query) if query else "")
        try:
            ws = await session.ws_connect(
                target, autoping=True, heartbeat=None, max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.counts["connect_failed"] += 1
            self._failed = url
            return False
        self._failed = None
        self.conn += 1
        self.ws, self.url = ws, url
        self.session_id = None
        self._record("open", extra={"url": url, "epoch": epoch, "since": since})
        if since:
            self.counts["resumes"] += 1
        code: int | None = None
        why = ""
        try:
            code, why = await self._serve(ws, others)
        except (aiohttp.ClientError, ConnectionError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            why = f"silent for {SILENCE} s"
        finally:
            self.resume_reading()
            self.ws = None
            self._record("close", extra={"code": code if code is not None else ws.close_code,
                                         "why": why})
            self.counts[f"close {code if code is not None else ws.close_code}"] += 1
            if not ws.closed:
                await ws.close()
        return True

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse,
                     others: dict[str, dict[str, int]]) -> tuple[int | None, str]:
        while True:
            if not self._reading.is_set():
                await self._reading.wait()
            msg = await ws.receive(timeout=SILENCE)
            if msg.type is aiohttp.WSMsgType.TEXT:
                self._take(ws, json.loads(msg.data), others)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code, "closed"
            elif msg.type is aiohttp.WSMsgType.ERROR:
                return ws.close_code, repr(msg.data)
            else:
                self._record("other", extra=str(msg.type))

    def _take(self, ws: aiohttp.ClientWebSocketResponse, msg: dict[str, Any],
              others: dict[str, dict[str, int]]) -> None:
        kind = msg.get("type")
        seq = msg.get("seq")
        topic = msg.get("topic")
        if kind == "connected":
            self.epoch = epoch = str(msg.get("epoch"))
            self.session_id = msg.get("sessionId")
            self._record("connected", extra=epoch)
            # Positions of an older epoch: each with its own epoch, in a `resume`.
            for old, since in others.items():
                self._record("claim", extra={"epoch": old, "since": since})
                self._spawn(self._send(ws, {"type": "resume", "since": since, "epoch": old}))
            missing = [t for t in self.topics if t not in self.positions]
            if missing:
                self._record("subscribe", extra=missing)
                self._spawn(self._send(ws, {"type": "subscribe", "topics": missing}))
            elif not self.ready.is_set():
                self.ready.set()
        elif kind == "subscribed":
            for t, s in (msg.get("seqs") or {}).items():
                self._record("subscribed", t, s)
                if t not in self.positions:
                    self.positions[t] = (s, self.epoch or "")
            if all(t in self.positions for t in self.topics):
                self.ready.set()
        elif kind == "resync" and isinstance(topic, str) and isinstance(seq, int):
            self._record("resync", topic, seq)
            self.counts["resyncs"] += 1
            self.positions[topic] = (seq, self.epoch or "")
        elif kind == "pong" or kind == "unsubscribed":
            pass
        elif isinstance(seq, int) and isinstance(topic, str):
            payload = msg.get("payload")
            ident = payload.get("id") if isinstance(payload, dict) else None
            self._record("msg", topic, seq, ident)
            self.counts["messages"] += 1
            last = self.positions.get(topic)
            if last is None or seq > last[0] or last[1] != self.epoch:
                self.positions[topic] = (seq, self.epoch or "")
        else:
            self._record("other", topic, seq, msg)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, obj: dict[str, Any]) -> None:
        # A failure means the connection is going: the next one asks again.
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
            await ws.send_str(json.dumps(obj))

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# ---------------------------------------------------------------------- a process of its own

def _write(path: str, events: list[list[Any]]) -> None:
    with open(path, "w") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")


async def _child(args: argparse.Namespace) -> None:
    client = ChaosClient(args.name, args.urls.split(","), args.topics.split(","), args.seed,
                         args.rcvbuf)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    runner = asyncio.create_task(client.run())
    emit("started")
    while True:
        raw = await reader.readline()
        if not raw:
            break
        cmd = json.loads(raw)
        name = cmd.get("cmd")
        if name == "hold":
            client.hold(float(cmd["seconds"]))
        elif name == "pause":
            client.pause_reading(cmd.get("seconds"))
        elif name == "resume":
            client.resume_reading()
        elif name == "reset":
            client.reset()
        elif name == "state":
            emit("state", **client.state())
        elif name == "quit":
            break
    client.stop()
    await asyncio.wait_for(runner, 10)
    await asyncio.to_thread(_write, args.out, client.events)
    emit("done", events=len(client.events), **client.state())


def main() -> int:
    parser = argparse.ArgumentParser(description="one chaos-test client in its own process")
    parser.add_argument("--name", required=True)
    parser.add_argument("--urls", required=True, help="comma list of http://host:port")
    parser.add_argument("--topics", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rcvbuf", type=int, default=4096)
    parser.add_argument("--out", required=True, help="file for the recorded events")
    asyncio.run(_child(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
