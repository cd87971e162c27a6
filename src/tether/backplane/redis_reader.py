"""The Redis backplane's reader: each node delivers its watched topics in seq order.

This module holds the reading and fault rules of redis.py's docstring (the
contract): one blocking XREAD over the streams of the topics this node has
subscribers for (interrupted through wake:<node> when they change); every entry
delivered once, in seq order per topic; and where messages were lost (Redis
away, restarted empty, or a replica behind) a resync notice instead. It also
says where live delivery of a topic begins, so that a resume's replay joins it
(`Positions.floor`). It opens no connection of its own: RedisBackplane hands it two.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tether.backplane.base import Deliver
from tether.backplane.redis_layout import Layout, entry_message, text
from tether.backplane.redis_link import Link
from tether.clock import Clock
from tether.idempotency import KeyMemory, Seen
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, resync_notice
from tether.redact import redact_error, redact_text

log = get_logger("backplane")

BLOCK_MS = 5000  # longest XREAD wait; watch changes interrupt it through wake:<node>
READ_COUNT = 1000  # entries per stream per read
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
NOT_WATCHED = 1 << 62


class Positions:
    """Where the reader stands in each watched topic: bookkeeping only, no I/O.

    `watched`: the topics with local subscribers, and "*". For those the reader
    has started on: the last seq handled (`last`) and where reading began
    (`floors`). `hints` holds the lowest `since` snapshot of a topic not yet
    started on: reading must begin no later than that.
    """

    def __init__(self) -> None:
        self.watched: set[str] = {BROADCAST_TOPIC}
        self.last: dict[str, int] = {}
        self.floors: dict[str, int] = {}
        self.hints: dict[str, int] = {}

    def watch(self, topics: set[str]) -> bool:
        """Watch these topics (and "*") and no others; whether any is new."""
        wanted = set(topics)
        wanted.add(BROADCAST_TOPIC)
        if wanted == self.watched:
            return False
        for topic in self.watched - wanted:
            self.last.pop(topic, None)
            self.floors.pop(topic, None)
            self.hints.pop(topic, None)
        added = wanted - self.watched
        self.watched = wanted
        return bool(added)

    def unstarted(self) -> list[str]:
        """The watched topics the reader has not started on yet."""
        return [t for t in self.watched if t not in self.last]

    def start(self, topic: str, counter: int) -> None:
        """Begin `topic` at its counter, or at an earlier hint (if still watched)."""
        if topic in self.watched and topic not in self.last:
            start = min(counter, self.hints.pop(topic, NOT_WATCHED))
            self.last[topic] = self.floors[topic] = start

    def restart(self, topic: str, seq: int) -> None:
        """Read `topic` again from `seq`: Redis numbered it anew, or from lower."""
        self.last[topic] = self.floors[topic] = seq

    def floor(self, topic: str, last: int) -> int:
        """Where live delivery of `topic` begins, for a replay that ends at seq `last`.

        Live messages reach a resuming client from the reader, starting after
        its floor. If the reader has not started on the topic yet, it will start
        no later than this snapshot (a hint), and `last` is returned: the replay
        needs nothing more. A replay that ends before the floor must be extended
        up to it.
        """
        if topic not in self.watched:
            return last
        if topic not in self.last:
            self.hints[topic] = min(self.hints.get(topic, last), last)
            return last
        return self.floors[topic]

    @property
    def started(self) -> int:
        """How many watched topics the reader has started on."""
        return len(self.last)

    @property
    def pending(self) -> int:
        """How many watched topics the reader has not started on yet."""
        return len(self.watched - self.last.keys())


class StreamReader:
    """Reads the watched topics' streams and calls `deliver` with each entry, in seq order."""

    def __init__(self, layout: Layout, link: Link, keys: KeyMemory, clock: Clock,
                 secrets: tuple[str, ...]) -> None:
        self.layout = layout
        self.link = link  # told when Redis is lost and back
        self.keys = keys  # the keys delivered are remembered here (see redis.py)
        self.clock = clock
        self._secrets = secrets
        self._client: aioredis.Redis | None = None  # the blocking reads
        self._cmd: aioredis.Redis | None = None  # wake-ups
        self._deliver: Deliver | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakes: set[asyncio.Task[None]] = set()
        self._wake_id = "0-0"
        self.epoch: bytes | None = None
        self._synced = False
        self._stopping = False
        self.positions = Positions()
        self.delivered = 0
        self.resyncs = 0

    def _scrub(self, exc: BaseException) -> str:
        """An error's text, fit for a log line or /health (no credentials)."""
        return redact_error(exc, self._secrets)

    # ------------------------------------------------------------------ lifecycle

    def attach(self, client: aioredis.Redis, cmd: aioredis.Redis, deliver: Deliver) -> None:
        """Read through `client` (its reads block), wake it through `cmd`, deliver to `deliver`."""
        self._client, self._cmd, self._deliver = client, cmd, deliver

    async def first_sync(self) -> None:
        """Learn the dataset's epoch and start on the watched topics (raises RedisError)."""
        assert self._client is not None
        await self._sync()
        await self._start_topics(self._client)

    def run(self) -> None:
        """Read and deliver from now on, in a task, until `stop`."""
        self._task = asyncio.create_task(self._read_loop(), name="redis-backplane-reader")

    async def stop(self) -> None:
        """Stop reading and delivering; the connections stay with their owner to close."""
        self._deliver = None
        self._stopping = True
        tasks = {t for t in (self._task, *self._wakes) if t is not None and not t.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=0.5)
            if late and self._client is not None:
                # A cancelled blocking read can outlive its cancellation inside the
                # client; closing its connection ends it.
                with contextlib.suppress(RedisError, OSError):
                    await self._client.connection_pool.disconnect(inuse_connections=True)
                await asyncio.wait(late, timeout=1.0)
        self._task = None

    def detach(self) -> None:
        """Forget the connections (their owner closed them)."""
        self._client = self._cmd = None

    # ------------------------------------------------------------------ watch

    def watch(self, topics: set[str]) -> None:
        """Read these topics (and "*") from now on, and no others."""
        if self.positions.watch(topics) and self._task is not None:
            # One wake-up per change: a read that started before it must not miss it.
            task = asyncio.create_task(self._wake())
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)

    async def _wake(self) -> None:
        """Interrupt this node's blocking read so it starts on the new topics."""
        if self._cmd is None:
            return
        try:
            pipe = self._cmd.pipeline(transaction=False)
            pipe.execute_command("XADD", self.layout.wake, "MAXLEN", "1", "*", "w", "1")
            pipe.execute_command("PEXPIRE", self.layout.wake, 60_000)
            await pipe.execute()
        except (RedisError, OSError) as exc:  # the reader is retrying anyway
            log.debug("Wake-up not sent", error=self._scrub(exc))

    # ------------------------------------------------------------------ the read loop

    async def _read_loop(self) -> None:
        delay = BACKOFF_MIN
        while not self._stopping:
            try:
                if not self._synced:
                    await self._sync()
                    delay = BACKOFF_MIN
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._stopping:
                    return
                self._lost(exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
            except Exception as exc:  # a bug must not stop delivery for good
                log.exception("Redis reader failed, restarting it",
                              error=redact_text(repr(exc), self._secrets))
                self._synced = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _lost(self, exc: BaseException, delay: float) -> None:
        self._synced = False
        self.link.lost(self._scrub(exc), delay)

    async def _sync(self) -> None:
        """(Re)connect: learn the dataset's epoch; renumber if Redis lost its data."""
        assert self._client is not None
        pipe = self._client.pipeline(transaction=True)
        pipe.execute_command("SET", self.layout.epoch, uuid.uuid4().hex, "NX")
        pipe.execute_command("GET", self.layout.epoch)
        positions = self.positions
        known = list(positions.last)
        for topic in known:
            pipe.execute_command("GET", self.layout.seq(topic))
        _, epoch, *counters = await pipe.execute()
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            log.warn("Redis lost its data: numbering restarted, subscribers get resync",
                     topics=len(positions.last))
            self.epoch = epoch
            positions.hints.clear()
            for topic in list(positions.last):
                positions.restart(topic, 0)
                self._notify(topic, 0)
        else:
            for topic, counter in zip(known, counters, strict=True):
                value = int(counter or 0)
                last = positions.last.get(topic)
                if last is not None and value < last:  # a lagging replica
                    log.warn("Redis counter went back, subscribers get resync",
                             topic=topic, last=last, counter=value)
                    positions.restart(topic, value)
                    self._notify(topic, 0)
        self._synced = True
        self.link.up()

    async def _start_topics(self, client: aioredis.Redis) -> bool:
        """Begin reading newly watched topics at their current seq (or an earlier hint).

        Returns False when Redis turned out to have restarted (resync first).
        """
        topics = self.positions.unstarted()
        if not topics:
            return True
        pipe = client.pipeline(transaction=True)
        pipe.execute_command("GET", self.layout.epoch)
        for topic in topics:
            pipe.execute_command("GET", self.layout.seq(topic))
        epoch, *counters = await pipe.execute()
        if epoch != self.epoch:
            self._synced = False
            return False
        for topic, counter in zip(topics, counters, strict=True):
            self.positions.start(topic, int(counter or 0))
        return True

    async def _read_once(self) -> None:
        client = self._client
        assert client is not None
        if not await self._start_topics(client):
            return
        last = self.positions.last
        topics = {self.layout.log(t): t for t in last}
        streams: dict[str, str] = {key: f"{last[t]}-0" for key, t in topics.items()}
        streams[self.layout.wake] = self._wake_id
        pipe = client.pipeline(transaction=False)
        # The epoch is read on the same connection just before the blocking read:
        # a Redis that restarted between two reads is noticed even when the client
        # reconnected silently.
        pipe.execute_command("GET", self.layout.epoch)
        pipe.execute_command("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS",
                             *streams.keys(), *streams.values())
        epoch, result = await pipe.execute()
        if epoch != self.epoch:
            self._synced = False
            return
        for raw_key, entries in result or ():
            key = text(raw_key)
            if key == self.layout.wake:
                self._wake_id = text(entries[-1][0])
                continue
            topic = topics.get(key)
            if topic is None:
                continue
            for _, fields in entries:
                self._take(topic, fields)

    def _take(self, topic: str, fields: dict[bytes, bytes]) -> None:
        last = self.positions.last.get(topic)
        if last is None:  # unwatched while the read was under way
            return
        seq = int(fields[b"seq"])
        if seq <= last:
            return
        if seq > last + 1:
            log.warn("Messages lost while Redis was away, subscribers get resync",
                     topic=topic, lost=f"{last + 1}..{seq - 1}")
            self._notify(topic, seq - 1)
        self.positions.last[topic] = seq
        self.delivered += 1
        key = fields.get(b"k")
        if key is not None:  # remembered for a retry that comes after Redis lost it
            seen = Seen(topic, seq, text(fields.get(b"f", b"")))
            self.keys.put(key.decode(errors="replace"), seen, self.clock.now())
        if self._deliver is not None:
            self._deliver(entry_message(topic, fields))

    def _notify(self, topic: str, seq: int) -> None:
        self.resyncs += 1
        if self._deliver is not None:
            self._deliver(resync_notice(topic, seq))
