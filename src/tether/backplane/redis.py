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

This module holds the contract and its public side: the connections, publishing
with its idempotency, `since` and the state for /health. The keys, the entry
fields and the script are in redis_layout.py; the reader, with its fault
handling, in redis_reader.py; the link's status and outage log lines in
redis_link.py.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tether.backplane.redis_layout import PUBLISH_LUA, Layout, entry_message, text
from tether.backplane.redis_link import Link
from tether.backplane.redis_reader import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    BLOCK_MS,
    READ_COUNT,
    StreamReader,
)
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
from tether.message import Message, Prepared, stamp
from tether.redact import redact_error, redact_url, url_secrets

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "BLOCK_MS",
    "MIN_STREAM_LENGTH",
    "PUBLISH_LUA",
    "READ_COUNT",
    "RedisBackplane",
]

log = get_logger("backplane")

# A stream keeps at least this many entries even when HISTORY_SIZE is smaller, so
# that a reader a little behind still finds what it must deliver; `since` never
# answers beyond HISTORY_SIZE.
MIN_STREAM_LENGTH = 1000


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
        self.layout = Layout(prefix, self.node)
        self.link = Link(self.shown_url)
        self.reader = StreamReader(self.layout, self.link, self.keys, self.clock,
                                   self._secrets)
        self._cmd: aioredis.Redis | None = None  # since, wake
        self._pub: aioredis.Redis | None = None  # publish: never retried by redis-py
        self._reads: aioredis.Redis | None = None  # the reader's: its reads block
        self.published = 0
        self.duplicates = 0

    def _scrub(self, exc: BaseException) -> str:
        """An error's text, fit for a log line or /health (no credentials)."""
        return redact_error(exc, self._secrets)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, deliver: Deliver) -> None:
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
            self._reads = aioredis.Redis.from_url(
                self.url, socket_timeout=BLOCK_MS / 1000 + 5.0, retry=Retry(NoBackoff(), 0),
                **common,
            )
            # A publish is never resent by the library: a resend after a lost reply
            # would publish twice. Its caller retries, with its idempotency key.
            self._pub = aioredis.Redis.from_url(
                self.url, socket_timeout=5.0, retry=Retry(NoBackoff(), 0), **common,
            )
        except ValueError as exc:  # a URL redis-py cannot parse
            self.link.stopped()
            raise BackplaneError(
                f"REDIS_URL {self.shown_url} is not valid: {self._scrub(exc)}"
            ) from None
        self._script = self._pub.register_script(PUBLISH_LUA)
        self.reader.attach(self._reads, self._cmd, deliver)
        self.link.connecting()
        deadline = time.monotonic() + self.startup_retry
        delay = BACKOFF_MIN
        while True:
            try:
                await self.reader.first_sync()
                break
            except (RedisError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    await self._close()
                    raise BackplaneError(
                        f"cannot reach Redis at {self.shown_url}: {self._scrub(exc)}"
                    ) from None
                log.warn("Redis not reachable yet, retrying", url=self.shown_url,
                         error=self._scrub(exc), retryInMs=round(delay * 1000))
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        log.info("Redis backplane connected", url=self.shown_url, node=self.node,
                 historySize=self.history_size)
        self.reader.run()

    async def stop(self) -> None:
        await self.reader.stop()
        await self._close()

    async def _close(self) -> None:
        """Close the three connections; the reader is stopped (or never ran)."""
        for client in (self._reads, self._cmd, self._pub):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
        self._reads = self._cmd = self._pub = None
        self.reader.detach()
        self.link.stopped()

    # ------------------------------------------------------------------ publish / since

    def position(self, topic: str) -> int | None:
        return self.reader.positions.last.get(topic)  # the reader's place on a started topic

    @property
    def epoch(self) -> str:
        raw = self.reader.epoch
        return raw.decode() if isinstance(raw, bytes) else (raw or "")

    async def publish(self, prepared: Prepared, key: str | None = None) -> Published:
        if self._pub is None:
            raise BackplaneError("the Redis backplane is not started")
        topic = prepared.topic
        keys = [self.layout.seq(topic), self.layout.log(topic)]
        args: list[str | int | bytes] = [self.cap, int(prepared.priority), prepared.body]
        mark = ""
        if key is not None:
            # This node's memory first: it answers even while Redis is down, and
            # after Redis lost the key (see the module docstring).
            mark = fingerprint(prepared)
            seen = self.keys.get(key, self.clock.now())
            if seen is not None:
                return self._repeat(seen, prepared, mark)
            keys.append(self.layout.idem(key))
            args += [key, mark, self.window_ms, topic]
        if self.link.status == "down":  # fail fast, nothing attempted; the reader reconnects
            raise BackplaneError(f"Redis unavailable: {self.link.error}")
        try:
            reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # Sent, or maybe not: Redis may have run it before the failure.
            raise BackplaneError(f"Redis failed during a publish: {self._scrub(exc)}",
                                 outcome_unknown=True) from None
        seq = int(reply[0])
        if key is not None:
            if seq == 0:  # the key was used before, through any node
                first, fp, first_topic = text(reply[1]).split(" ", 2)
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
            pipe.execute_command("GET", self.layout.epoch)
            pipe.execute_command("GET", self.layout.seq(topic))
            pipe.execute_command("XRANGE", self.layout.log(topic), f"{max(seq, 0) + 1}-0", "+",
                                 "COUNT", max(self.history_size, 1))
            epoch, counter, entries = await pipe.execute()
        except (RedisError, OSError) as exc:
            # Without Redis there is no history: the client must refetch its state.
            log.warn("Resume without Redis, sending resync", topic=topic,
                     error=self._scrub(exc))
            return Replay(resync=True, last=seq)
        if self.reader.epoch is not None and epoch != self.reader.epoch:
            # Redis restarted empty and this node's reader has not renumbered yet.
            return Replay(resync=True, last=seq)
        last = int(counter or 0)
        replay: Replay[Message]
        if seq == last:
            replay = Replay(last=last)
        elif seq > last or seq < 0 or last - seq > self.history_size:
            replay = Replay(resync=True, last=last)
        else:
            items = [entry_message(topic, fields) for _, fields in entries]
            if len(items) != last - seq or items[0].seq != seq + 1:
                replay = Replay(resync=True, last=last)  # trimmed meanwhile
            else:
                replay = Replay(items, last=last)
        return await self._cover(topic, replay)

    async def _cover(self, topic: str, replay: Replay[Message]) -> Replay[Message]:
        """Join a replay to live delivery: nothing may fall between the two.

        A replay that ends before the reader's floor (see `Positions.floor`)
        is extended up to it.
        """
        floor = self.reader.positions.floor(topic, replay.last)
        if floor <= replay.last:
            return replay
        if replay.resync:
            return Replay(resync=True, last=floor)
        assert self._cmd is not None
        try:
            pipe = self._cmd.pipeline(transaction=False)
            first, end = f"{replay.last + 1}-0", f"{floor}-0"
            pipe.execute_command("XRANGE", self.layout.log(topic), first, end)
            (entries,) = await pipe.execute()
        except (RedisError, OSError):
            return Replay(resync=True, last=floor)
        extra = [entry_message(topic, fields) for _, fields in entries]
        if len(extra) != floor - replay.last or extra[0].seq != replay.last + 1:
            return Replay(resync=True, last=floor)
        return Replay(replay.items + extra, last=floor)

    # ------------------------------------------------------------------ watch / views

    def watch(self, topics: set[str]) -> None:
        self.reader.watch(topics)

    def state(self) -> dict[str, Any]:
        reader, link, positions = self.reader, self.link, self.reader.positions
        state: dict[str, Any] = {
            "name": self.name,
            "status": link.status,
            "url": self.shown_url,
            "node": self.node,
            "watched": positions.started,
            "pending": positions.pending,
            "published": self.published,
            "duplicates": self.duplicates,
            "keys": len(self.keys),
            "delivered": reader.delivered,
            "resyncs": reader.resyncs,
            "outages": link.outages,
        }
        if link.error is not None:
            state["error"] = link.error
        if link.down_since is not None:
            state["downMs"] = round((time.monotonic() - link.down_since) * 1000)
        return state
