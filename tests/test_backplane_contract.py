"""The backplane contract (SPEC §6–8): one suite, run against every implementation.

A `Cluster` adapts one implementation: the nodes that share its store (the memory
backplane has one node; Redis gets two processes' worth, in this process), a
wipe of the store (a numbering restart), `settle`, which waits until watch
changes are in effect, and `elapse`, which lets time pass for idempotency keys
(a manual clock; Redis expires its keys in real time). Every test below runs
unchanged against each.
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.aio import eventually
from tests.redis_server import RedisServer
from tether.backplane.base import Backplane
from tether.backplane.memory import MemoryBackplane
from tether.backplane.redis import RedisBackplane
from tether.clock import ManualClock
from tether.errors import PublishError, Refusal
from tether.idempotency import DEFAULT_WINDOW_MS
from tether.message import Message, Prepared, Priority, prepare


class Node:
    """One backplane and what it delivered."""

    def __init__(self, backplane: Backplane) -> None:
        self.backplane = backplane
        self.delivered: list[Message] = []

    def deliver(self, message: Message) -> None:
        self.delivered.append(message)

    def seqs(self, topic: str) -> list[int]:
        return [m.seq for m in self.delivered if m.topic == topic]

    async def wait_for(self, topic: str, count: int, timeout: float = 3.0) -> list[Message]:
        """The messages on `topic`, once `count` of them are delivered."""
        def on_topic() -> list[Message]:
            return [m for m in self.delivered if m.topic == topic]

        assert await eventually(lambda: len(on_topic()) >= count, timeout, interval=0.005), \
            f"{topic}: {len(self.seqs(topic))} of {count} delivered"
        return on_topic()


class Cluster(ABC):
    """The nodes of one implementation that share one store."""

    size = 1
    history_size = 0
    window_ms = DEFAULT_WINDOW_MS

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.clock = ManualClock()

    async def start(self, history_size: int = 100,
                    window_ms: int = DEFAULT_WINDOW_MS) -> list[Node]:
        self.history_size = history_size
        self.window_ms = window_ms
        self.nodes = []
        for _ in range(self.size):
            node = Node(self.make(history_size, window_ms))
            await node.backplane.start(node.deliver)
            self.nodes.append(node)
        return self.nodes

    @abstractmethod
    def make(self, history_size: int, window_ms: int) -> Backplane: ...

    async def elapse(self, seconds: float) -> None:
        """Let `seconds` pass for the idempotency window."""
        self.clock.advance(seconds)

    async def restart(self) -> list[Node]:
        """The store loses everything (a restart without persistence); new nodes."""
        await self.close()
        await self.wipe()
        return await self.start(self.history_size, self.window_ms)

    async def wipe(self) -> None:
        return None

    async def settle(self) -> None:
        """Until every node reads the topics it was told to watch."""
        return None

    async def close(self) -> None:
        for node in self.nodes:
            await node.backplane.stop()


class MemoryCluster(Cluster):
    def make(self, history_size: int, window_ms: int) -> Backplane:
        return MemoryBackplane(history_size, idempotency_window_ms=window_ms, clock=self.clock)


class RedisCluster(Cluster):
    size = 2

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"

    def make(self, history_size: int, window_ms: int) -> Backplane:
        return RedisBackplane(self.url, history_size, prefix=self.prefix,
                              idempotency_window_ms=window_ms, clock=self.clock)

    async def elapse(self, seconds: float) -> None:
        await super().elapse(seconds)
        await asyncio.sleep(seconds)  # Redis expires keys by its own clock

    async def wipe(self) -> None:
        client = aioredis.Redis.from_url(self.url)
        try:
            keys = [k async for k in client.scan_iter(match=self.prefix + "*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    async def settle(self) -> None:
        assert await eventually(
            lambda: not any(n.backplane.state()["pending"] for n in self.nodes), 3,
            interval=0.005), "watch not in effect within 3 s"


@pytest.fixture(params=["memory", "redis"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    c: Cluster
    if request.param == "memory":
        c = MemoryCluster()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        c = RedisCluster(server.url)
    yield c
    await c.close()
    await c.wipe()


async def publish(node: Node, topic: str, n: int = 1, **extra: object) -> list[Message]:
    out = []
    for i in range(n):
        event = {"type": "note", "topic": topic, "payload": {"i": i}, **extra}
        out.append(await node.backplane.publish(prepare(event)))
    return out


async def watch(cluster: Cluster, topics: set[str]) -> None:
    for node in cluster.nodes:
        node.backplane.watch(topics)
    await cluster.settle()


async def test_seq_counts_1_2_3_per_topic_independently(cluster: Cluster) -> None:
    nodes = await cluster.start()
    got = []
    for i, topic in enumerate(["a", "a", "b", "a", "b", "*"]):
        node = nodes[i % len(nodes)]
        got.append((await publish(node, topic))[0])
    assert [(m.topic, m.seq) for m in got] == [
        ("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("*", 1)]
    assert got[0].data == b'{"type":"note","payload":{"i":0},"topic":"a","seq":1}'


async def test_concurrent_publishes_get_distinct_consecutive_seqs(cluster: Cluster) -> None:
    nodes = await cluster.start()
    results = await asyncio.gather(*(publish(nodes[i % len(nodes)], "t") for i in range(60)))
    assert sorted(m[0].seq for m in results) == list(range(1, 61))


async def test_since_returns_exactly_the_missed_messages_in_order(cluster: Cluster) -> None:
    nodes = await cluster.start(history_size=100)
    published = await publish(nodes[0], "t", 10)
    await publish(nodes[-1], "other", 3)
    replay = await nodes[-1].backplane.since("t", 4)
    assert not replay.resync and replay.last == 10
    assert [m.data for m in replay.items] == [m.data for m in published[4:]]
    assert [m.priority for m in replay.items] == [Priority.NORMAL] * 6
    assert [m.seq for m in (await nodes[0].backplane.since("t", 0)).items] == list(range(1, 11))
    caught_up = await nodes[0].backplane.since("t", 10)
    assert caught_up.items == [] and not caught_up.resync and caught_up.last == 10
    empty = await nodes[0].backplane.since("never", 0)
    assert empty.items == [] and not empty.resync and empty.last == 0


async def test_history_is_bounded_to_history_size(cluster: Cluster) -> None:
    nodes = await cluster.start(history_size=5)
    await publish(nodes[0], "t", 12)
    within = await nodes[-1].backplane.since("t", 7)
    assert [m.seq for m in within.items] == [8, 9, 10, 11, 12] and not within.resync
    too_old = await nodes[-1].backplane.since("t", 6)
    assert too_old.resync and too_old.items == [] and too_old.last == 12


async def test_no_history_means_resync_for_any_gap(cluster: Cluster) -> None:
    nodes = await cluster.start(history_size=0)
    await publish(nodes[0], "t", 3)
    assert (await nodes[0].backplane.since("t", 2)).resync
    assert not (await nodes[0].backplane.since("t", 3)).resync


async def test_resync_when_the_client_saw_numbers_never_assigned(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await publish(nodes[0], "t", 2)
    replay = await nodes[0].backplane.since("t", 5)
    assert replay.resync and replay.last == 2


async def test_resync_after_a_numbering_restart(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await publish(nodes[0], "t", 3)
    nodes = await cluster.restart()
    replay = await nodes[-1].backplane.since("t", 3)
    assert replay.resync and replay.last == 0
    assert (await publish(nodes[0], "t"))[0].seq == 1


async def test_deliver_is_called_once_per_message_in_seq_order(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await watch(cluster, {"a", "b"})
    for i in range(40):
        await publish(nodes[i % len(nodes)], "a" if i % 3 else "b")
    for node in nodes:
        assert [m.seq for m in await node.wait_for("a", 26)] == list(range(1, 27))
        assert [m.seq for m in await node.wait_for("b", 14)] == list(range(1, 15))
    await asyncio.sleep(0.05)  # nothing more comes
    for node in nodes:
        assert len(node.seqs("a")) == 26 and len(node.seqs("b")) == 14


async def test_every_node_gets_identical_bytes(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await watch(cluster, {"t"})
    published = []
    for node in nodes:
        published += await publish(node, "t", 3, priority="low", payload={"é": [1, 2.5, None]})
    for node in nodes:
        got = await node.wait_for("t", len(published))
        assert [(m.seq, m.priority, m.data) for m in got] == [
            (m.seq, m.priority, m.data) for m in published]
        assert all(m.priority is Priority.LOW for m in got)


async def test_broadcast_topic_is_always_delivered(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await watch(cluster, set())
    await publish(nodes[0], "*", 2)
    for node in nodes:
        assert [m.seq for m in await node.wait_for("*", 2)] == [1, 2]


async def test_watching_a_topic_delivers_what_is_published_after(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await publish(nodes[0], "late", 3)  # before anyone watches: never delivered late
    await watch(cluster, {"late"})
    await publish(nodes[-1], "late", 2)
    for node in nodes:
        got = await node.wait_for("late", 2)
        assert [m.seq for m in got][-2:] == [4, 5]
    # Unwatched and watched again: delivery goes on in order, never backwards.
    await watch(cluster, set())
    await publish(nodes[0], "late", 2)
    await watch(cluster, {"late"})
    await publish(nodes[0], "late", 1)
    for node in nodes:
        await node.wait_for("late", 3)
        seqs = node.seqs("late")
        assert seqs == sorted(set(seqs)) and seqs[-1] == 8


async def test_replay_then_live_leaves_no_gap(cluster: Cluster) -> None:
    """A resuming client: `since` then live delivery covers every seq exactly once."""
    nodes = await cluster.start()
    await publish(nodes[0], "r", 5)
    node = nodes[-1]
    node.backplane.watch({"r"})
    replay = await node.backplane.since("r", 2)
    more = await publish(nodes[0], "r", 3)
    await node.wait_for("r", 3)
    live = [m.seq for m in node.delivered if m.topic == "r" and m.seq > replay.last]
    assert [m.seq for m in replay.items] + live == list(range(3, 9))
    assert more[-1].seq == 8


# ---------------------------------------------------------------------------- idempotency keys


def new_key() -> str:
    return uuid.uuid4().hex


def note(topic: str, **payload: object) -> Prepared:
    return prepare({"type": "note", "topic": topic, "payload": payload})


async def test_a_repeated_key_is_delivered_once_and_answered_with_the_original_seq(
    cluster: Cluster,
) -> None:
    nodes = await cluster.start()
    await watch(cluster, {"t"})
    await publish(nodes[0], "t")  # seq 1, without a key
    key, event = new_key(), note("t", x=1)
    first = await nodes[0].backplane.publish(event, key)
    assert (first.topic, first.seq, first.duplicate) == ("t", 2, False)
    for node in nodes:
        await node.wait_for("t", 2)
    repeats = [await node.backplane.publish(event, key) for node in nodes for _ in range(2)]
    assert [(r.topic, r.seq, r.duplicate, r.data) for r in repeats] == [
        ("t", 2, True, first.data)] * len(repeats)
    # The next publish gets seq 3 (a repeat took no number), and it is the next delivery
    # on every node: the repeats delivered nothing.
    assert (await publish(nodes[-1], "t"))[0].seq == 3
    for node in nodes:
        await node.wait_for("t", 3)
        assert node.seqs("t") == [1, 2, 3]
    assert [m.seq for m in (await nodes[0].backplane.since("t", 0)).items] == [1, 2, 3]


async def test_a_repeat_is_found_by_a_node_that_never_saw_the_key(cluster: Cluster) -> None:
    """No node reads the topic: only the shared store can know the key on the other node."""
    nodes = await cluster.start()
    key, event = new_key(), note("quiet")
    first = await nodes[0].backplane.publish(event, key)
    again = await nodes[-1].backplane.publish(event, key)
    assert (again.seq, again.duplicate, first.duplicate) == (first.seq, True, False)
    assert (await nodes[-1].backplane.since("quiet", 0)).last == 1


async def test_concurrent_repeats_on_every_node_publish_once(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await watch(cluster, {"c"})
    key, event = new_key(), note("c")
    results = await asyncio.gather(
        *(nodes[i % len(nodes)].backplane.publish(event, key) for i in range(30)))
    assert sorted(r.duplicate for r in results) == [False] + [True] * 29
    assert {r.seq for r in results} == {1}
    assert (await publish(nodes[0], "c"))[0].seq == 2
    for node in nodes:
        await node.wait_for("c", 2)
        assert node.seqs("c") == [1, 2]


async def test_different_keys_are_different_publishes(cluster: Cluster) -> None:
    nodes = await cluster.start()
    await watch(cluster, {"d"})
    event = note("d")  # the same event twice, under two keys: two messages
    one = await nodes[0].backplane.publish(event, new_key())
    two = await nodes[-1].backplane.publish(event, new_key())
    assert (one.seq, one.duplicate, two.seq, two.duplicate) == (1, False, 2, False)
    for node in nodes:
        assert [m.seq for m in await node.wait_for("d", 2)] == [1, 2]


async def test_a_key_reused_for_another_event_is_refused(cluster: Cluster) -> None:
    nodes = await cluster.start()
    key = new_key()
    await nodes[0].backplane.publish(note("m", x=1), key)
    for other in (note("m", x=2), note("n", x=1),
                  prepare({"type": "note", "topic": "m", "payload": {"x": 1}, "priority": "high"})):
        for node in nodes:
            with pytest.raises(PublishError) as err:
                await node.backplane.publish(other, key)
            assert err.value.refusal is Refusal.KEY_REUSED
    assert (await nodes[-1].backplane.since("m", 0)).last == 1
    assert (await nodes[-1].backplane.since("n", 0)).last == 0


async def test_a_key_is_forgotten_after_the_window(cluster: Cluster) -> None:
    nodes = await cluster.start(window_ms=400)
    await watch(cluster, {"w"})
    key, event = new_key(), note("w")
    assert not (await nodes[0].backplane.publish(event, key)).duplicate
    await cluster.elapse(0.1)
    assert (await nodes[-1].backplane.publish(event, key)).duplicate
    await cluster.elapse(0.4)  # the window is over: the same key publishes anew
    later = await nodes[-1].backplane.publish(event, key)
    assert (later.seq, later.duplicate) == (2, False)
    assert (await nodes[0].backplane.publish(event, key)).seq == 2  # and is a key again
    for node in nodes:
        assert [m.seq for m in await node.wait_for("w", 2)] == [1, 2]


async def test_memory_keeps_at_most_max_keys_the_oldest_forgotten_first() -> None:
    clock = ManualClock()
    backplane = MemoryBackplane(10, max_keys=3, clock=clock)
    got: list[Message] = []
    await backplane.start(got.append)
    keys = [new_key() for _ in range(4)]
    for i, key in enumerate(keys):
        await backplane.publish(note("b", i=i), key)
        clock.advance(1)
    assert backplane.state()["keys"] == 3
    assert (await backplane.publish(note("b", i=3), keys[3])).duplicate  # the newest: kept
    assert (await backplane.publish(note("b", i=1), keys[1])).duplicate
    again = await backplane.publish(note("b", i=0), keys[0])  # the oldest: forgotten
    assert (again.seq, again.duplicate) == (5, False)
    assert [m.seq for m in got] == [1, 2, 3, 4, 5]
    assert backplane.state()["keys"] == 3
