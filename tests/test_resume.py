"""Resume (SPEC §7): no message lost across a reconnect, over real sockets and as a property."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.aio import eventually, run
from tests.conftest import LogCapture, StartTether
from tests.support import RecordingPeer
from tests.wsraw import RawWS
from tether.app import Tether
from tether.backplane.memory import MemoryBackplane
from tether.config import Settings
from tether.hub import Hub, parse_since
from tether.registry import Connection

GAP = 500  # messages published while the client is away


class Receiver:
    """What one client got: per topic, the seqs in arrival order, and resyncs."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.resyncs: list[dict[str, Any]] = []

    def take(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "resync":
            self.resyncs.append(msg)
        elif "seq" in msg:
            self.seqs.setdefault(msg["topic"], []).append(msg["seq"])

    def since(self) -> str:
        return ",".join(f"{t}:{s[-1]}" for t, s in self.seqs.items() if s)


def raw_drain(ws: RawWS, into: Receiver, timeout: float = 0.3) -> None:
    """Read every data frame until the socket is quiet or closed."""
    ws.sock.settimeout(timeout)
    try:
        while True:
            frame = ws.recv()
            if frame.opcode == 1:
                into.take(orjson.loads(frame.payload))
            elif frame.opcode == 8:
                return
    except (TimeoutError, OSError, ConnectionError):
        return


async def publish_gap(t: Tether) -> None:
    for i in range(GAP):
        await t.publish({"type": "gap", "topic": "a" if i % 2 else "b", "payload": {"i": i}})
        if i % 5 == 0:
            await t.publish({"type": "other", "topic": "c"})


async def reconnect_and_collect(t: Tether, got: Receiver, expect: int) -> None:
    url = f"ws://127.0.0.1:{t.port}/ws?topics=a,b&since={got.since()}"
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        assert (await ws.receive_json())["type"] == "connected"
        total = sum(len(v) for v in got.seqs.values())
        while total < expect:
            got.take(await ws.receive_json(timeout=5))
            total = sum(len(v) for v in got.seqs.values())
        await t.publish({"type": "live", "topic": "a"})  # then the live stream continues
        got.take(await ws.receive_json(timeout=5))


def assert_complete(got: Receiver, t: Tether) -> None:
    assert got.resyncs == []
    for topic in ("a", "b"):
        last = t.hub.backplane.history.last_seq(topic)  # type: ignore[attr-defined]
        assert got.seqs[topic] == list(range(1, last + 1)), topic  # each once, in order
    assert "c" not in got.seqs


class OtherTopicClient:
    """A client of topic c only, reading all along (so it answers every ping)."""

    async def start(self, t: Tether) -> OtherTopicClient:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(f"ws://127.0.0.1:{t.port}/ws?topics=c")
        await self.ws.receive_json()
        self.topics: set[str] = set()
        self.count = 0
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.topics.add(orjson.loads(msg.data).get("topic"))
                self.count += 1

    async def check_and_close(self) -> None:
        await asyncio.sleep(0.2)
        assert self.topics == {"c"} and self.count == GAP // 5  # none of a's or b's
        assert not self.ws.closed
        await self.ws.close()
        await self.task
        await self.session.close()


async def run_gap_scenario(
    t: Tether, cut: Callable[[RawWS], None], wait_gone: Callable[[], bool]
) -> None:
    other = await OtherTopicClient().start(t)
    first = await asyncio.to_thread(RawWS, "127.0.0.1", t.port, "/ws?topics=a,b")
    got = Receiver()
    for i in range(10):
        await t.publish({"type": "before", "topic": "a" if i % 2 else "b"})
    await asyncio.to_thread(raw_drain, first, got)
    assert sum(len(v) for v in got.seqs.values()) == 10
    cut(first)
    assert await eventually(wait_gone, 3), "the first connection was not closed"
    await publish_gap(t)
    await reconnect_and_collect(t, got, 10 + GAP)
    assert_complete(got, t)
    await other.check_and_close()
    first.close()


async def test_resume_after_heartbeat_close(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(heartbeat_interval_ms=100, heartbeat_missed=2)
    # RawWS never answers pings: the heartbeat closes it as stale.
    await run_gap_scenario(t, lambda ws: None,
                           lambda: bool(log_capture.find("Closing stale connection")))


async def test_resume_after_network_drop(start_tether: StartTether,
                                         log_capture: LogCapture) -> None:
    t = await start_tether(heartbeat_interval_ms=0)

    def reset(ws: RawWS) -> None:  # RST: no close frame, no FIN
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.sock.close()

    await run_gap_scenario(t, reset,
                           lambda: bool(log_capture.find("WebSocket client disconnected")))


async def test_resume_after_slow_consumer_close(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(heartbeat_interval_ms=0, backpressure_high=8_192,
                           backpressure_low=2_048, max_buffer=131_072, close_timeout_ms=200)
    other = await OtherTopicClient().start(t)
    slow = await asyncio.to_thread(RawWS, "127.0.0.1", t.port, "/ws?topics=a,b", rcvbuf=4096)
    got = Receiver()
    n = 0
    while not log_capture.find("Closing slow client"):
        # high priority: never skipped, so the buffer grows until the 1013 close
        await t.publish({"type": "big", "topic": "a" if n % 2 else "b", "priority": "high",
                         "payload": "p" * 2000})
        n += 1
        await asyncio.sleep(0)
        assert n < 5000
    await publish_gap(t)
    await asyncio.to_thread(raw_drain, slow, got, 1.0)  # what reached it before the close
    def gone() -> list[dict[str, Any]]:
        return [x for x in log_capture.find("WebSocket client disconnected")
                if x["data"]["code"] == 1013]

    assert await eventually(lambda: bool(gone()), 2), "slow client not closed with 1013"
    assert sum(len(v) for v in got.seqs.values()) < n + GAP
    await reconnect_and_collect(t, got, n + GAP)
    assert_complete(got, t)
    await other.check_and_close()
    slow.close()


async def test_gap_larger_than_history_yields_resync(start_tether: StartTether) -> None:
    t = await start_tether(history_size=50, heartbeat_interval_ms=0)
    for _ in range(200):
        await t.publish({"type": "x", "topic": "a"})
    url = f"ws://127.0.0.1:{t.port}/ws?since=a:10"
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.receive_json(timeout=5)
        assert await ws.receive_json(timeout=5) == {"type": "resync", "topic": "a", "seq": 200}
        await t.publish({"type": "x", "topic": "a"})
        assert (await ws.receive_json(timeout=5))["seq"] == 201  # then live, no silent hole
        # Within the history: a resume message replays exactly the missing ones.
        await ws.send_json({"type": "resume", "since": {"a": 195}})
        got = [(await ws.receive_json(timeout=5))["seq"] for _ in range(6)]
        assert got == [196, 197, 198, 199, 200, 201]
    assert t.hub.stats.resyncs == 1 and t.hub.stats.resumes == 2


# ---------------------------------------------------------------- property-based


TOPICS = ("a", "b")
ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(TOPICS)),
        st.tuples(st.just("drop"), st.integers(0, 1)),
        st.tuples(st.just("reconnect"), st.integers(0, 1)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, history=st.integers(0, 6))
def test_any_interleaving_delivers_at_most_once_and_in_order(
    ops: list[tuple[str, Any]], history: int
) -> None:
    run(_interleaving(ops, history))


async def _interleaving(ops: list[tuple[str, Any]], history: int) -> None:
    backplane = MemoryBackplane(history)
    hub = Hub(Settings(heartbeat_interval_ms=0, history_size=history), backplane)
    await backplane.start(hub.deliver)
    wants = [{"a", "b"}, {"b"}]
    peers: list[list[RecordingPeer]] = [[], []]
    conns: list[Connection | None] = [None, None]
    received: list[Receiver] = [Receiver(), Receiver()]

    def collect(i: int) -> None:
        hub.flush()
        for msg in peers[i][-1].messages():
            if msg["type"] != "connected":
                received[i].take(msg)
        peers[i][-1].frames.clear()

    async def connect(i: int) -> None:
        peer = RecordingPeer()
        peers[i].append(peer)
        conn = hub.open(peer, "test", sorted(wants[i]))
        since = parse_since(received[i].since())
        since.update({t: 0 for t in wants[i] if t not in since})
        await hub.resume(conn, since)
        conns[i] = conn
        collect(i)

    for i in (0, 1):
        await connect(i)
    for op, arg in ops:
        if op == "publish":
            await hub.publish({"type": "m", "topic": arg})
        elif op == "drop" and conns[arg] is not None:
            collect(arg)
            hub.detach(conns[arg], 1006, "")  # type: ignore[arg-type]
            conns[arg] = None
        elif op == "reconnect" and conns[arg] is None:
            await connect(arg)
        for i in (0, 1):
            if conns[i] is not None:
                collect(i)
    for i in (0, 1):
        if conns[i] is None:
            await connect(i)
    for i, got in enumerate(received):
        resynced = {r["topic"]: r["seq"] for r in got.resyncs}
        for topic in TOPICS:
            seqs = got.seqs.get(topic, [])
            if topic not in wants[i]:
                assert seqs == []
                continue
            assert seqs == sorted(set(seqs)), "a duplicate or out of order"
            last = backplane.history.last_seq(topic)
            if topic not in resynced:
                assert seqs == list(range(1, last + 1)), "a silent hole"
            else:
                # After a resync at s, everything after s arrives, exactly once.
                after = [x for x in seqs if x > resynced[topic]]
                assert after == list(range(resynced[topic] + 1, last + 1))
                # A resync only when the history had really lost something.
                assert history < last
