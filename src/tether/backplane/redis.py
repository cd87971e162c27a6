"""The Redis backplane: one stream per topic, shared by every tether process (SPEC §8).

Layout (every key under `prefix`, "tether:" by default):

    seq:<topic>   the topic's counter: the last seq assigned
    log:<topic>   the topic's stream; entry id "<seq>-0", fields seq, p (priority), body
    epoch         a random token set once per Redis dataset: when it changes, Redis
                  lost its data and every topic's numbering restarted
    wake:<node>   a tiny stream that interrupts this node's blocking read (watch changes)

Publishing runs one Lua script: INCR the counter and XADD the entry with the new
seq as its id, atomically, so stream order is seq order on every node. The body
is stored without topic/seq; each node stamps it (`message.stamp`, no
re-serialization), so every node delivers identical bytes.

Every node reads (XREAD BLOCK) the streams of the topics it has subscribers for
and calls `deliver` in seq order per topic, its own publishes included (publish
itself never delivers). `since` reads history with XRANGE.

Faults: an unreachable Redis at start-up raises BackplaneError. Lost while
running, the reader logs it, retries with exponential backoff and resumes each
stream after the last seq it delivered. Where messages were lost meanwhile
(trimmed from the stream, or Redis restarted empty) it delivers a *resync notice*
— a Message with empty `data` — and the hub sends `resync` to the subscribers
that lacked them (see `Hub._deliver_to`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tether.backplane.base import Backplane, Deliver
from tether.errors import BackplaneError
from tether.history import Replay
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, Message, Prepared, Priority, resync_notice, stamp

log = get_logger("backplane")

# INCR + XADD in one atomic step. If the counter is gone but the stream is not
# (the key was deleted or evicted), continue after the stream's last id instead
# of failing on an id that is not increasing.
PUBLISH_LUA = """
local seq = redis.call('INCR', KEYS[1])
if seq == 1 and redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local last = tonumber(string.match(info[i + 1], '^(%d+)'))
      if last >= seq then
        seq = last + 1
        redis.call('SET', KEYS[1], seq)
      end
    end
  end
end
local id = string.format('%d-0', seq)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], id, 'seq', seq, 'p', ARGV[2], 'body', ARGV[3])
return seq
"""

# A stream keeps at least this many entries even when HISTORY_SIZE is smaller, so
# that a reader a little behind still finds what it must deliver; `since` never
# answers beyond HISTORY_SIZE.
MIN_STREAM_LENGTH = 1000
BLOCK_MS = 5000  # longest XREAD wait; watch changes interrupt it through wake:<node>
READ_COUNT = 1000  # entries per stream per read
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
NOT_WATCHED = 1 << 62


def redact(url: str) -> str:
    """The URL without its password, for logs and /health."""
    parts = urlsplit(url)
    try:
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # not even a URL: show only its scheme
        return f"{parts.scheme}://***"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBackplane(Backplane):
    """Seq, history and fan-out in Redis streams, for several tether processes."""

    name = "redis"

    def __init__(
        self,
        url: str,
        history_size: int,
        *,
        prefix: str = "tether:",
        startup_retry: float = 0.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.history_size = history_size
        self.prefix = prefix
        self.startup_retry = startup_retry  # seconds to keep trying at start-up
        self.connect_timeout = connect_timeout
        self.cap = max(history_size, MIN_STREAM_LENGTH)
        self.node = uuid.uuid4().hex[:12]
        self._epoch_key = prefix + "epoch"
        self._wake_key = f"{prefix}wake:{self.node}"
        self._wake_id = "0-0"
        self._deliver: Deliver | None = None
        self._cmd: aioredis.Redis | None = None  # publish, since, wake
        self._reader: aioredis.Redis | None = None  # the blocking reads
        self._task: asyncio.Task[None] | None = None
        self._wakes: set[asyncio.Task[None]] = set()
        self._epoch: bytes | None = None
        self._synced = False
        self._stopping = False
        # Topics with local subscribers (and "*"), and for those the reader has
        # started on: the last seq handled (`_last`) and where reading began
        # (`_floor`). `_hint` is the lowest `since` snapshot of a topic not yet
        # started on: reading must begin no later than that.
        self._watched: set[str] = {BROADCAST_TOPIC}
        self._last: dict[str, int] = {}
        self._floor: dict[str, int] = {}
        self._hint: dict[str, int] = {}
        self.status = "stopped"
        self.error: str | None = None
        self.down_since: float | None = None
        self.published = 0
        self.delivered = 0
        self.resyncs = 0
        self.outages = 0

    # ------------------------------------------------------------------ keys

    def _seq_key(self, topic: str) -> str:
        return f"{self.prefix}seq:{topic}"

    def _log_key(self, topic: str) -> str:
        return f"{self.prefix}log:{topic}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self.status = "connecting"
        common: dict[str, Any] = {"socket_connect_timeout": self.connect_timeout}
        try:
            # One quick retry on a broken pooled connection (Redis restarted); the
            # reader does its own retrying, with backoff.
            self._cmd = aioredis.Redis.from_url(
                self.url, socket_timeout=5.0,
                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)), **common,
            )
            self._reader = aioredis.Redis.from_url(
                self.url, socket_timeout=BLOCK_MS / 1000 + 5.0, retry=Retry(NoBackoff(), 0),
                **common,
            )
        except ValueError as exc:  # a URL redis-py cannot parse
            self.status = "stopped"
            raise BackplaneError(f"REDIS_URL {redact(self.url)} is not valid: {exc}") from None
        self._script = self._cmd.register_script(PUBLISH_LUA)
        deadline = time.monotonic() + self.startup_retry
        delay = BACKOFF_MIN
        while True:
            try:
                await self._sync()
                await self._start_topics(self._reader)
                break
            except (RedisError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    await self._close()
                    self.status = "stopped"
                    raise BackplaneError(
                        f"cannot reach Redis at {redact(self.url)}: {exc}"
                    ) from None
                log.warn("Redis not reachable yet, retrying", url=redact(self.url),
                         error=str(exc), retryInMs=round(delay * 1000))
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        log.info("Redis backplane connected", url=redact(self.url), node=self.node,
                 historySize=self.history_size)
        self._task = asyncio.create_task(self._read_loop(), name="redis-backplane-reader")

    async def stop(self) -> None:
        self._deliver = None
        self._stopping = True
        tasks = {t for t in (self._task, *self._wakes) if t is not None and not t.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=0.5)
            if late and self._reader is not None:
                # A cancelled blocking read can outlive its cancellation inside the
                # client; closing its connection ends it.
                with contextlib.suppress(RedisError, OSError):
                    await self._reader.connection_pool.disconnect(inuse_connections=True)
                await asyncio.wait(late, timeout=1.0)
        self._task = None
        await self._close()
        self.status = "stopped"

    async def _close(self) -> None:
        for client in (self._reader, self._cmd):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
        self._reader = self._cmd = None

    # ------------------------------------------------------------------ publish / since

    async def publish(self, prepared: Prepared) -> Message:
        if self._cmd is None:
            raise BackplaneError("the Redis backplane is not started")
        if self.status == "down":  # fail fast; the reader is reconnecting
            raise BackplaneError(f"Redis unavailable: {self.error}")
        topic = prepared.topic
        try:
            seq = await self._script(
                keys=[self._seq_key(topic), self._log_key(topic)],
                args=[self.cap, int(prepared.priority), prepared.body],
            )
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"Redis unavailable: {exc}") from None
        self.published += 1
        return stamp(prepared, int(seq))

    async def since(self, topic: str, seq: int) -> Replay[Message]:
        if self._cmd is None:
            raise BackplaneError("the Redis backplane is not started")
        try:
            pipe = self._cmd.pipeline(transaction=True)
            pipe.execute_command("GET", self._epoch_key)
            pipe.execute_command("GET", self._seq_key(topic))
            pipe.execute_command("XRANGE", self._log_key(topic), f"{max(seq, 0) + 1}-0", "+",
                                 "COUNT", max(self.history_size, 1))
            epoch, counter, entries = await pipe.execute()
        except (RedisError, OSError) as exc:
            # Without Redis there is no history: the client must refetch its state.
            log.warn("Resume without Redis, sending resync", topic=topic, error=str(exc))
            return Replay(resync=True, last=seq)
        if self._epoch is not None and epoch != self._epoch:
            # Redis restarted empty and this node's reader has not renumbered yet.
            return Replay(resync=True, last=seq)
        last = int(counter or 0)
        replay: Replay[Message]
        if seq == last:
            replay = Replay(last=last)
        elif seq > last or seq < 0 or last - seq > self.history_size:
            replay = Replay(resync=True, last=last)
        else:
            items = [self._message(topic, fields) for _, fields in entries]
            if len(items) != last - seq or items[0].seq != seq + 1:
                replay = Replay(resync=True, last=last)  # trimmed meanwhile
            else:
                replay = Replay(items, last=last)
        return await self._cover(topic, replay)

    async def _cover(self, topic: str, replay: Replay[Message]) -> Replay[Message]:
        """Join a replay to live delivery: nothing may fall between the two.

        Live messages reach a resuming client from the reader, starting after
        `_floor`. If the reader has not started on the topic yet, it will start no
        later than this snapshot (`_hint`); if it started after the snapshot, the
        replay is extended up to where it started.
        """
        if topic not in self._watched:
            return replay
        if topic not in self._last:
            self._hint[topic] = min(self._hint.get(topic, replay.last), replay.last)
            return replay
        floor = self._floor[topic]
        if floor <= replay.last:
            return replay
        if replay.resync:
            return Replay(resync=True, last=floor)
        assert self._cmd is not None
        try:
            pipe = self._cmd.pipeline(transaction=False)
            first, end = f"{replay.last + 1}-0", f"{floor}-0"
            pipe.execute_command("XRANGE", self._log_key(topic), first, end)
            (entries,) = await pipe.execute()
        except (RedisError, OSError):
            return Replay(resync=True, last=floor)
        extra = [self._message(topic, fields) for _, fields in entries]
        if len(extra) != floor - replay.last or extra[0].seq != replay.last + 1:
            return Replay(resync=True, last=floor)
        return Replay(replay.items + extra, last=floor)

    def _message(self, topic: str, fields: dict[bytes, bytes]) -> Message:
        prepared = Prepared(topic, Priority(int(fields[b"p"])), fields[b"body"])
        return stamp(prepared, int(fields[b"seq"]))

    # ------------------------------------------------------------------ watch

    def watch(self, topics: set[str]) -> None:
        wanted = set(topics)
        wanted.add(BROADCAST_TOPIC)
        if wanted == self._watched:
            return
        for topic in self._watched - wanted:
            self._last.pop(topic, None)
            self._floor.pop(topic, None)
            self._hint.pop(topic, None)
        added = wanted - self._watched
        self._watched = wanted
        if added and self._task is not None:
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
            pipe.execute_command("XADD", self._wake_key, "MAXLEN", "1", "*", "w", "1")
            pipe.execute_command("PEXPIRE", self._wake_key, 60_000)
            await pipe.execute()
        except (RedisError, OSError) as exc:  # the reader is retrying anyway
            log.debug("Wake-up not sent", error=str(exc))

    # ------------------------------------------------------------------ the reader

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
                log.exception("Redis reader failed, restarting it", error=repr(exc))
                self._synced = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _lost(self, exc: BaseException, delay: float) -> None:
        self._synced = False
        self.error = str(exc) or type(exc).__name__
        if self.status != "down":
            self.status = "down"
            self.outages += 1
            self.down_since = time.monotonic()
            # The node keeps serving its connections and heartbeats; publishes get 503.
            log.error("Redis connection lost", url=redact(self.url), error=self.error,
                      retryInMs=round(delay * 1000))
        else:
            log.debug("Redis still unreachable", error=self.error,
                      retryInMs=round(delay * 1000))

    async def _sync(self) -> None:
        """(Re)connect: learn the dataset's epoch; renumber if Redis lost its data."""
        assert self._reader is not None
        pipe = self._reader.pipeline(transaction=True)
        pipe.execute_command("SET", self._epoch_key, uuid.uuid4().hex, "NX")
        pipe.execute_command("GET", self._epoch_key)
        known = list(self._last)
        for topic in known:
            pipe.execute_command("GET", self._seq_key(topic))
        _, epoch, *counters = await pipe.execute()
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            log.warn("Redis lost its data: numbering restarted, subscribers get resync",
                     topics=len(self._last))
            self._epoch = epoch
            self._hint.clear()
            for topic in list(self._last):
                self._last[topic] = self._floor[topic] = 0
                self._notify(topic, 0)
        else:
            for topic, counter in zip(known, counters, strict=True):
                value = int(counter or 0)
                if topic in self._last and value < self._last[topic]:  # a lagging replica
                    log.warn("Redis counter went back, subscribers get resync",
                             topic=topic, last=self._last[topic], counter=value)
                    self._last[topic] = self._floor[topic] = value
                    self._notify(topic, 0)
        self._synced = True
        if self.status != "up":
            if self.status == "down" and self.down_since is not None:
                log.info("Redis connection restored", url=redact(self.url),
                         downMs=round((time.monotonic() - self.down_since) * 1000))
            self.status = "up"
            self.error = None
            self.down_since = None

    async def _start_topics(self, client: aioredis.Redis) -> bool:
        """Begin reading newly watched topics at their current seq (or an earlier hint).

        Returns False when Redis turned out to have restarted (resync first).
        """
        topics = [t for t in self._watched if t not in self._last]
        if not topics:
            return True
        pipe = client.pipeline(transaction=True)
        pipe.execute_command("GET", self._epoch_key)
        for topic in topics:
            pipe.execute_command("GET", self._seq_key(topic))
        epoch, *counters = await pipe.execute()
        if epoch != self._epoch:
            self._synced = False
            return False
        for topic, counter in zip(topics, counters, strict=True):
            if topic in self._watched and topic not in self._last:
                start = min(int(counter or 0), self._hint.pop(topic, NOT_WATCHED))
                self._last[topic] = self._floor[topic] = start
        return True

    async def _read_once(self) -> None:
        reader = self._reader
        assert reader is not None
        if not await self._start_topics(reader):
            return
        topics = {self._log_key(t): t for t in self._last}
        streams: dict[str, str] = {key: f"{self._last[t]}-0" for key, t in topics.items()}
        streams[self._wake_key] = self._wake_id
        pipe = reader.pipeline(transaction=False)
        # The epoch is read on the same connection just before the blocking read:
        # a Redis that restarted between two reads is noticed even when the client
        # reconnected silently.
        pipe.execute_command("GET", self._epoch_key)
        pipe.execute_command("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS",
                             *streams.keys(), *streams.values())
        epoch, result = await pipe.execute()
        if epoch != self._epoch:
            self._synced = False
            return
        for raw_key, entries in result or ():
            key = _text(raw_key)
            if key == self._wake_key:
                self._wake_id = _text(entries[-1][0])
                continue
            topic = topics.get(key)
            if topic is None:
                continue
            for _, fields in entries:
                self._take(topic, fields)

    def _take(self, topic: str, fields: dict[bytes, bytes]) -> None:
        last = self._last.get(topic)
        if last is None:  # unwatched while the read was under way
            return
        seq = int(fields[b"seq"])
        if seq <= last:
            return
        if seq > last + 1:
            log.warn("Messages lost while Redis was away, subscribers get resync",
                     topic=topic, lost=f"{last + 1}..{seq - 1}")
            self._notify(topic, seq - 1)
        self._last[topic] = seq
        self.delivered += 1
        if self._deliver is not None:
            self._deliver(self._message(topic, fields))

    def _notify(self, topic: str, seq: int) -> None:
        self.resyncs += 1
        if self._deliver is not None:
            self._deliver(resync_notice(topic, seq))

    # ------------------------------------------------------------------ views

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "url": redact(self.url),
            "node": self.node,
            "watched": len(self._last),
            "pending": len(self._watched - self._last.keys()),
            "published": self.published,
            "delivered": self.delivered,
            "resyncs": self.resyncs,
            "outages": self.outages,
        }
        if self.error is not None:
            state["error"] = self.error
        if self.down_since is not None:
            state["downMs"] = round((time.monotonic() - self.down_since) * 1000)
        return state
