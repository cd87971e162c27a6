"""The Redis backplane: one stream per topic, shared by every tether process (SPEC §8).

Layout (every key under `prefix`, "tether:" by default):

    seq:<topic>   the topic's counter: the last seq assigned
    log:<topic>   the topic's stream; entry id "<seq>-0", fields seq, p (priority), body
    epoch         a random token set once per Redis dataset: when it changes, Redis
                  lost its data and every topic's numbering restarted
    wake:<node>   a tiny stream that interrupts this node's blocking read (watch changes)
    idem:<key>    "<seq> <fingerprint> <topic>" of a publish made with an idempotency
                  key, expiring after the window (PX); the entry also carries k and f

Publishing runs one Lua script: INCR the counter and XADD the entry with the new
seq as its id, atomically, so stream order is seq order on every node. The body
is stored without topic/seq; each node stamps it (`message.stamp`, no
re-serialization), so every node delivers identical bytes.

Idempotent publishing, and what it guarantees. With a key, the same script first
looks for idem:<key>: if present it returns the original seq and publishes
nothing; else it publishes and sets idem:<key>, in the same atomic step. The
script is sent once, never retried by the client library: a call that fails
mid-way (the connection reset after Redis ran it, or Redis killed) has an
unknown outcome (BackplaneError.outcome_unknown, a 503 that says to retry with
the same key), and the retry finds the key.

- While Redis keeps its data for the window (it stays up, or persists every
  write: `appendfsync always`), a key is published at most once per window
  across every node and retry: exactly once, if the publisher retries until it
  gets an answer.
- Redis may lose recent writes (restarted without persistence, `kill -9` with
  `appendfsync everysec`). Each node therefore also remembers, for the window
  and for at most MAX_KEYS keys (oldest forgotten first), the keys it published
  and the keys its reader delivered (from the entry's `k` field), and answers a
  repeat from that memory first, even while Redis is down. A retry that reaches a
  node which published or delivered the original is answered as a duplicate and
  delivered nothing again. A retry that reaches a node which did neither (it had
  no subscribers for the topic, or it restarted) is published again: the clients
  that had the original get it a second time, after the `resync` that a
  renumbering sends anyway.
- Keys older than the window, or pushed out of a node's memory by MAX_KEYS newer
  ones, are forgotten there. Redis keeps its keys for the window with no count
  bound: its memory grows with the rate of keyed publishes times the window.

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

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from tether.backplane.base import Backplane, Deliver, Published
from tether.clock import Clock, SystemClock
from tether.errors import BackplaneError
from tether.history import Replay
from tether.idempotency import (
    DEFAULT_WINDOW_MS,
    MAX_KEYS,
    KeyMemory,
    Seen,
    check_repeat,
    fingerprint,
)
from tether.logs import get_logger
from tether.message import BROADCAST_TOPIC, Message, Prepared, Priority, resync_notice, stamp
from tether.redact import redact_error, redact_text, redact_url, url_secrets

log = get_logger("backplane")

# INCR + XADD in one atomic step. If the counter is gone but the stream is not
# (the key was deleted or evicted), continue after the stream's last id instead
# of failing on an id that is not increasing.
# KEYS: seq:<topic>, log:<topic>[, idem:<key>]
# ARGV: stream cap, priority, body[, key, fingerprint, window ms, topic]
# Returns {seq}, or {0, "<seq> <fingerprint> <topic>"} for a key already used.
PUBLISH_LUA = """
local idem = KEYS[3]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    return {0, seen}
  end
end
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
if idem then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], id, 'seq', seq, 'p', ARGV[2],
             'body', ARGV[3], 'k', ARGV[4], 'f', ARGV[5])
  redis.call('SET', idem, string.format('%d %s %s', seq, ARGV[5], ARGV[7]), 'PX', ARGV[6])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], id, 'seq', seq, 'p', ARGV[2],
             'body', ARGV[3])
end
return {seq}
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
        idempotency_window_ms: int = DEFAULT_WINDOW_MS,
        max_keys: int = MAX_KEYS,
        clock: Clock | None = None,
    ) -> None:
        self.url = url
        # What logs, errors and /health may show of the URL, and the secrets no
        # error text may contain (redis-py's messages name host and port only,
        # but an error text is not ours to trust).
        self.shown_url = redact_url(url)
        self._secrets = url_secrets(url)
        self.window_ms = idempotency_window_ms
        # Keys this node published or delivered: answers a repeat when Redis lost them.
        self.keys = KeyMemory(idempotency_window_ms / 1000, max_keys)
        self.clock: Clock = clock or SystemClock()
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
        self._cmd: aioredis.Redis | None = None  # since, wake
        self._pub: aioredis.Redis | None = None  # publish: never retried by redis-py
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
        self.duplicates = 0
        self.delivered = 0
        self.resyncs = 0
        self.outages = 0

    # ------------------------------------------------------------------ keys

    def _seq_key(self, topic: str) -> str:
        return f"{self.prefix}seq:{topic}"

    def _log_key(self, topic: str) -> str:
        return f"{self.prefix}log:{topic}"

    def _idem_key(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def _scrub(self, exc: BaseException) -> str:
        """An error's text, fit for a log line or /health (no credentials)."""
        return redact_error(exc, self._secrets)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self.status = "connecting"
        common: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout,
            # With maintenance notifications on ("auto", the default), redis-py 8
            # skips its check of a pooled connection before reuse: a connection
            # that Redis closed (it restarted) would fail the next command.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
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
            # A publish is never resent by the library: a resend after a lost reply
            # would publish twice. Its caller retries, with its idempotency key.
            self._pub = aioredis.Redis.from_url(
                self.url, socket_timeout=5.0, retry=Retry(NoBackoff(), 0), **common,
            )
        except ValueError as exc:  # a URL redis-py cannot parse
            self.status = "stopped"
            raise BackplaneError(
                f"REDIS_URL {self.shown_url} is not valid: {self._scrub(exc)}"
            ) from None
        self._script = self._pub.register_script(PUBLISH_LUA)
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
                        f"cannot reach Redis at {self.shown_url}: {self._scrub(exc)}"
                    ) from None
                log.warn("Redis not reachable yet, retrying", url=self.shown_url,
                         error=self._scrub(exc), retryInMs=round(delay * 1000))
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        log.info("Redis backplane connected", url=self.shown_url, node=self.node,
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
        for client in (self._reader, self._cmd, self._pub):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
        self._reader = self._cmd = self._pub = None

    # ------------------------------------------------------------------ publish / since

    async def publish(self, prepared: Prepared, key: str | None = None) -> Published:
        if self._pub is None:
            raise BackplaneError("the Redis backplane is not started")
        topic = prepared.topic
        keys = [self._seq_key(topic), self._log_key(topic)]
        args: list[str | int | bytes] = [self.cap, int(prepared.priority), prepared.body]
        mark = ""
        if key is not None:
            # This node's memory first: it answers even while Redis is down, and
            # after Redis lost the key (see the module docstring).
            mark = fingerprint(prepared)
            seen = self.keys.get(key, self.clock.now())
            if seen is not None:
                return self._repeat(seen, prepared, mark)
            keys.append(self._idem_key(key))
            args += [key, mark, self.window_ms, topic]
        if self.status == "down":  # fail fast, nothing attempted; the reader is reconnecting
            raise BackplaneError(f"Redis unavailable: {self.error}")
        try:
            reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # Sent, or maybe not: Redis may have run it before the failure.
            raise BackplaneError(f"Redis failed during a publish: {self._scrub(exc)}",
                                 outcome_unknown=True) from None
        seq = int(reply[0])
        if key is not None:
            if seq == 0:  # the key was used before, through any node
                first, fp, first_topic = _text(reply[1]).split(" ", 2)
                seen = Seen(first_topic, int(first), fp)
                self.keys.put(key, seen, self.clock.now())
                return self._repeat(seen, prepared, mark)
            self.keys.put(key, Seen(topic, seq, mark), self.clock.now())
        self.published += 1
        return Published.of(stamp(prepared, seq))

    def _repeat(self, seen: Seen, prepared: Prepared, mark: str) -> Published:
        check_repeat(seen, mark)
        self.duplicates += 1
        return Published.of(stamp(prepared, seen.seq), duplicate=True)

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
            log.warn("Resume without Redis, sending resync", topic=topic,
                     error=self._scrub(exc))
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
            log.debug("Wake-up not sent", error=self._scrub(exc))

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
                log.exception("Redis reader failed, restarting it",
                              error=redact_text(repr(exc), self._secrets))
                self._synced = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _lost(self, exc: BaseException, delay: float) -> None:
        self._synced = False
        self.error = self._scrub(exc)
        if self.status != "down":
            self.status = "down"
            self.outages += 1
            self.down_since = time.monotonic()
            # The node keeps serving its connections and heartbeats; publishes get 503.
            log.error("Redis connection lost", url=self.shown_url, error=self.error,
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
                log.info("Redis connection restored", url=self.shown_url,
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
        key = fields.get(b"k")
        if key is not None:  # remembered for a retry that comes after Redis lost it
            seen = Seen(topic, seq, _text(fields.get(b"f", b"")))
            self.keys.put(key.decode(errors="replace"), seen, self.clock.now())
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
            "url": self.shown_url,
            "node": self.node,
            "watched": len(self._last),
            "pending": len(self._watched - self._last.keys()),
            "published": self.published,
            "duplicates": self.duplicates,
            "keys": len(self.keys),
            "delivered": self.delivered,
            "resyncs": self.resyncs,
            "outages": self.outages,
        }
        if self.error is not None:
            state["error"] = self.error
        if self.down_since is not None:
            state["downMs"] = round((time.monotonic() - self.down_since) * 1000)
        return state
