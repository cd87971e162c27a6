"""The Redis backplane's faults (SPEC §8), against a real redis-server it stops and starts."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from tests.aio import eventually
from tests.redis_server import RedisServer, serve_without_redis
from tests.support import free_port
from tether.backplane.redis import PUBLISH_LUA, RedisBackplane
from tether.errors import BackplaneError
from tether.message import Message, prepare
from tether.redact import redact_url as redact

pytestmark = pytest.mark.redis


def event(topic: str, i: int = 0) -> object:
    return {"type": "note", "topic": topic, "payload": {"i": i}}


def test_redact_hides_the_password() -> None:
    assert redact("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact("redis://:secret@h") == "redis://***@h"
    assert redact("redis://h:1") == "redis://h:1"


async def test_unreachable_redis_at_start_up_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    backplane = RedisBackplane(f"redis://127.0.0.1:{port}", 10, connect_timeout=0.5)
    with pytest.raises(BackplaneError, match=f"cannot reach Redis at redis://127.0.0.1:{port}"):
        await backplane.start(lambda m: None)
    assert backplane.state()["status"] == "stopped"


async def test_start_up_retry_waits_for_redis() -> None:
    server = RedisServer()
    backplane = RedisBackplane(server.url, 10, startup_retry=10.0)
    starting = asyncio.create_task(backplane.start(lambda m: None))
    await asyncio.sleep(0.3)
    assert not starting.done()
    await asyncio.to_thread(server.start)
    try:
        await asyncio.wait_for(starting, 5)
        assert backplane.state()["status"] == "up"
        await backplane.stop()
    finally:
        server.close()


async def test_outage_publish_fails_node_recovers_and_renumbers(
    private_redis: RedisServer,
) -> None:
    got: list[Message] = []
    node = RedisBackplane(private_redis.url, 100)
    await node.start(got.append)
    try:
        node.watch({"t"})
        assert await eventually(lambda: node.state()["pending"] == 0)
        for i in range(3):
            await node.publish(prepare(event("t", i)))
        assert await eventually(lambda: len(got) == 3)

        await asyncio.to_thread(private_redis.stop)
        assert await eventually(lambda: node.state()["status"] == "down")
        with pytest.raises(BackplaneError, match="Redis unavailable"):
            await node.publish(prepare(event("t")))
        replay = await node.since("t", 2)  # no history without Redis: resync
        assert replay.resync and replay.last == 2

        await asyncio.to_thread(private_redis.start)  # empty: it had no persistence
        assert await eventually(lambda: node.state()["status"] == "up", timeout=8)
        assert node.state()["outages"] == 1
        # Every watched topic gets a renumbering notice (empty data, seq 0) ...
        assert await eventually(
            lambda: {(m.topic, m.seq) for m in got if not m.data} == {("t", 0), ("*", 0)})
        message = await node.publish(prepare(event("t", 9)))
        assert message.seq == 1  # ... because the numbering restarted
        assert await eventually(lambda: got[-1].seq == 1 and got[-1].data == message.data)
    finally:
        await node.stop()


class CutOffNode:
    """A node watching topic t, and a raw client that cuts it off and publishes meanwhile."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.got: list[Message] = []
        self.node = RedisBackplane(redis_server.url, 100, prefix=self.prefix)
        self.raw = aioredis.Redis.from_url(redis_server.url)

    async def __aenter__(self) -> CutOffNode:
        await self.node.start(self.got.append)
        self.node.watch({"t"})
        assert await eventually(lambda: self.node.state()["pending"] == 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.raw.aclose()
        await self.node.stop()

    async def cut_off_and_publish(self, n: int, trim_to: int | None = None) -> None:
        """Kill the node's connections, publish `n` behind its back, maybe trim the stream."""
        pipe = self.raw.pipeline(transaction=False)
        pipe.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        for i in range(n):
            pipe.execute_command("EVAL", PUBLISH_LUA, 2, f"{self.prefix}seq:t",
                                 f"{self.prefix}log:t", 1000, 1,
                                 f'{{"type":"note","payload":{{"i":{i}}}}}')
        if trim_to is not None:
            pipe.execute_command("XTRIM", f"{self.prefix}log:t", "MAXLEN", trim_to)
        await pipe.execute()


async def test_messages_trimmed_while_away_become_a_resync_notice(
    redis_server: RedisServer,
) -> None:
    async with CutOffNode(redis_server) as c:
        for i in range(3):
            await c.node.publish(prepare(event("t", i)))
        assert await eventually(lambda: len(c.got) == 3)
        # Cut the node off, publish 5 more and trim the stream to 2 before it is back.
        await c.cut_off_and_publish(5, trim_to=2)
        assert await eventually(lambda: len(c.got) >= 6)
        assert [(m.seq, bool(m.data)) for m in c.got] == [
            (1, True), (2, True), (3, True), (6, False), (7, True), (8, True)]
        assert c.node.state()["resyncs"] == 1


async def test_a_url_redis_cannot_use_is_a_clear_error() -> None:
    backplane = RedisBackplane("redis://127.0.0.1:notaport", 10)
    with pytest.raises(BackplaneError, match="not valid"):
        await backplane.start(lambda m: None)
    assert redact("redis://u:p@h:notaport") == "redis://***"


async def test_reader_resumes_after_the_last_seq_it_delivered(redis_server: RedisServer) -> None:
    async with CutOffNode(redis_server) as c:
        await c.node.publish(prepare(event("t", 0)))
        assert await eventually(lambda: len(c.got) == 1)
        # Cut the node's connections and publish while it is away: nothing is lost.
        await c.cut_off_and_publish(4)
        assert await eventually(lambda: len(c.got) == 5)
        assert [m.seq for m in c.got] == [1, 2, 3, 4, 5] and all(m.data for m in c.got)
        assert c.node.state()["resyncs"] == 0


def test_serve_exits_2_when_redis_is_unreachable() -> None:
    done = serve_without_redis({}, timeout=20)
    assert done.returncode == 2, done.stdout[-2000:]
    assert b"Cannot start the backplane" in done.stdout
    assert b"cannot reach Redis at redis://127.0.0.1:" in done.stdout


async def test_after_redis_lost_its_data_nodes_answer_repeats_they_published_or_delivered(
    private_redis: RedisServer,
) -> None:
    """The guarantee of the module docstring when Redis restarts empty, node by node."""
    got: list[Message] = []
    reader = RedisBackplane(private_redis.url, 100)  # watches t: delivers the original
    publisher = RedisBackplane(private_redis.url, 100)  # published it, reads nothing
    stranger = RedisBackplane(private_redis.url, 100)  # neither
    await reader.start(got.append)
    await publisher.start(lambda m: None)
    await stranger.start(lambda m: None)
    try:
        reader.watch({"t"})
        assert await eventually(lambda: reader.state()["pending"] == 0)
        await publisher.publish(prepare(event("t", 0)))
        original = await publisher.publish(prepare(event("t", 1)), "k-1")
        assert (original.seq, original.duplicate) == (2, False)
        assert await eventually(lambda: [m.seq for m in got] == [1, 2])

        await asyncio.to_thread(private_redis.kill)  # kill -9: the keys are gone with it
        assert await eventually(lambda: reader.state()["status"] == "down")
        # While Redis is down, a repeat is still answered from the node's memory ...
        repeat = await reader.publish(prepare(event("t", 1)), "k-1")
        assert (repeat.seq, repeat.duplicate) == (2, True)
        # ... and a new publish is refused without being attempted.
        with pytest.raises(BackplaneError) as err:
            await reader.publish(prepare(event("t", 2)), "k-2")
        assert not err.value.outcome_unknown

        await asyncio.to_thread(private_redis.start)  # empty: numbering restarts
        for node in (reader, publisher, stranger):
            assert await eventually(lambda n=node: n.state()["status"] == "up", timeout=8)
        for node in (reader, publisher):
            again = await node.publish(prepare(event("t", 1)), "k-1")
            assert (again.topic, again.seq, again.duplicate) == ("t", 2, True)
        # The documented limit: a node that neither published nor read it publishes anew.
        fresh = await stranger.publish(prepare(event("t", 1)), "k-1")
        assert (fresh.seq, fresh.duplicate) == (1, False)
        # From now on Redis has the key again, for every node.
        raw = aioredis.Redis.from_url(private_redis.url)
        try:
            assert (await raw.get("tether:idem:k-1") or b"").startswith(b"1 ")
        finally:
            await raw.aclose()
    finally:
        for node in (reader, publisher, stranger):
            await node.stop()
