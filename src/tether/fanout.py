"""Publish, fan-out and resume: each message to each subscriber once, in seq order (SPEC §6, §7).

A publish is validated and serialized once, then numbered by the backplane. The
backplane hands every message of a watched topic to `deliver`, which offers its
frame (encoded once) to each subscriber's outbox. A client that is resuming gets
live messages only after its replay, and duplicates are dropped by seq, so each
client sees each message once and in order. A resync notice from the backplane
(it lost messages) becomes `{"type":"resync"}` for the subscribers that may lack
some.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tether import frames
from tether.backplane.base import Published
from tether.errors import PublishError, Refusal, ShuttingDown
from tether.inbound import MAX_SEQ  # past any topic's last seq: `since` answers resync
from tether.message import Message, Priority, prepare
from tether.outbox import Decision

if TYPE_CHECKING:
    from tether.hub import Hub
    from tether.registry import Connection


def hold(conn: Connection) -> bool:
    """Live messages for `conn` wait in `conn.pending` from now (True: this call began it)."""
    if conn.pending is not None:
        return False
    conn.pending = []
    return True


class Fanout:
    """Delivery of published messages to this process's clients."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.stats = hub.stats
        self.registry = hub.registry
        self.in_flight = 0  # publishes waiting for the backplane (shutdown waits for them)
        self._tasks: set[asyncio.Future[None]] = set()  # recoveries under way

    async def publish(self, event: Any, key: str | None = None) -> Published:
        """Validate, serialize once, and publish through the backplane (SPEC §6).

        With an idempotency `key`, a repeat is answered as a duplicate (see
        `Backplane.publish`).
        """
        if self.hub.shutting_down:
            # Accepted now, it would reach nobody: the clients are being closed.
            raise ShuttingDown("server shutting down")
        prepared = prepare(event)
        if len(prepared.body) > self.hub.settings.max_message:
            limit = self.hub.settings.max_message
            raise PublishError(
                Refusal.TOO_LARGE, f"event is larger than WS_MAX_MESSAGE ({limit} bytes)")
        self.in_flight += 1
        try:
            message = await self.hub.backplane.publish(prepared, key)
        finally:
            self.in_flight -= 1
        if message.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.published[message.priority] += 1
        return message

    def deliver(self, message: Message) -> None:
        """Fan one message out to this process's subscribers (the backplane calls this).

        The frame is encoded once for every client. A client whose outbox takes
        it at once (`Outbox.offer`'s common case) costs a dict lookup and one
        call; everyone else takes `deliver_to`, which applies every rule.
        """
        frame = frames.text(message.data)
        topic, seq = message.topic, message.seq
        priority = message.priority
        if message.is_resync:  # a resync notice takes the full rules for everyone
            for conn in self.registry.subscribers(topic):
                if conn.pending is not None:
                    conn.pending.append(message)
                else:
                    self.deliver_to(conn, message, frame)
            return
        send = Decision.SEND
        delivered = 0
        for conn in self.registry.subscribers(topic):
            if conn.pending is not None:  # resuming: after its replay
                conn.pending.append(message)
                continue
            last_seq = conn.last_seq
            if seq <= last_seq.get(topic, 0):
                continue  # already delivered (resume overlap)
            if conn.deferred is not None and topic in conn.deferred:
                self._defer(conn, message)  # after the ones held back before it
                continue
            decision = conn.outbox.offer(frame, priority)
            if decision is send:
                last_seq[topic] = seq
                delivered += 1
            else:
                self._refused(conn, message, decision)
        if delivered:
            self.stats.delivered[priority] += delivered

    def deliver_to(
        self, conn: Connection, message: Message, frame: bytes | None = None, replay: bool = False
    ) -> None:
        """One message to one client, with every rule (resync notices, replays, dedup)."""
        topic = message.topic
        if message.is_resync:  # the backplane lost messages (SPEC §8)
            self.resync(conn, topic, message.seq)
            return
        if message.seq <= conn.last_seq.get(topic, 0):
            return  # already delivered (resume overlap)
        if conn.deferred is not None and topic in conn.deferred and not replay:
            self._defer(conn, message)  # after the ones held back before it
            return
        if frame is None:
            frame = frames.text(message.data)
        # A replay is what the client asked for to close a gap: never skipped.
        priority = Priority.HIGH if replay else message.priority
        decision = conn.outbox.offer(frame, priority)
        if decision is Decision.SEND:
            conn.last_seq[topic] = message.seq
            self.stats.delivered[message.priority] += 1
            if replay:
                self.stats.replayed += 1
        else:
            self._refused(conn, message, decision)

    def _refused(self, conn: Connection, message: Message, decision: Decision) -> None:
        if decision is Decision.SKIP:
            self._defer(conn, message)
        elif decision is Decision.CLOSE:
            self.hub.close_slow(conn)

    # ---- backpressure without loss (issue 15)
    #
    # A paused client is not sent `normal` and `low` messages; they are held back,
    # not lost: the connection notes, per topic, the last seq it had before them,
    # and every later message of that topic waits behind them (seq order per topic
    # is kept). When the client drains below WS_BACKPRESSURE_LOW (its transport
    # says so: `drained`), or when a `high` message of such a topic arrives (it is
    # urgent, and may not overtake), the topic is resumed from the history: the
    # held-back messages, in order, then the live stream, or `resync` when the
    # history no longer has them. Priority orders urgency; it no longer decides loss.

    def _defer(self, conn: Connection, message: Message) -> None:
        deferred = conn.deferred
        if deferred is None:
            deferred = conn.deferred = {}
        if message.topic not in deferred:
            deferred[message.topic] = conn.last_seq.get(message.topic, 0)
        conn.deferrals += 1
        self.stats.deferred[message.priority] += 1
        if message.priority is Priority.HIGH:
            self.recover(conn)

    def drained(self, conn: Connection) -> None:
        """The client's transport fell below WS_BACKPRESSURE_LOW: send what was held back."""
        if conn.deferred and not conn.closing:
            self.recover(conn)

    def recover(self, conn: Connection) -> None:
        """Resume the topics with held-back messages from the history (a task of the hub)."""
        if not conn.deferred or conn.pending is not None or conn.closing:
            return  # nothing held back, or a replay under way takes the new ones in turn
        task = asyncio.ensure_future(self._recover(conn))
        self._tasks.add(task)  # held until done (asyncio keeps only weak references)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self, conn: Connection) -> None:
        # Taken only once the task runs, where `resume` holds live messages back at
        # once: none slips out ahead of them (a hole, then the replay repeating it).
        if not conn.deferred or conn.pending is not None or conn.closing:
            return
        positions, conn.deferred = conn.deferred, None
        await self.resume(conn, positions, recovering=True)

    async def recover_all(self) -> None:
        """Send every client's held-back messages now, paused or not (shutdown, before 1001)."""
        for conn in list(self.registry):
            await self._recover(conn)

    def resync(self, conn: Connection, topic: str, seq: int) -> None:
        """Messages of `topic` up to `seq` were lost (0: renumbered): `resync` who may lack some."""
        last = conn.last_seq.get(topic, 0)
        if last < seq or (seq == 0 and last > 0):
            self._tell_resync(conn, topic, seq)

    def _tell_resync(self, conn: Connection, topic: str, seq: int) -> None:  # its new position
        conn.last_seq[topic] = seq
        self.stats.resyncs += 1
        self.hub.send_control(conn, {"type": "resync", "topic": topic, "seq": seq})

    def positions(self, conn: Connection) -> dict[str, int]:
        """Where each topic `conn` reads stands, where the backplane knows it at once."""
        topics = [*conn.topics]
        if conn.grant is None or conn.grant.can_read("*"):
            topics.append("*")
        found = {t: self.hub.backplane.position(t) for t in topics}
        return {t: seq for t, seq in found.items() if seq is not None}

    async def subscribe(self, conn: Connection, granted: list[str]) -> None:
        """Start `conn` on `granted` topics at their current seq, and tell it where (`subscribed`).

        `subscribed` carries `seqs`: the topic's current seq (0 before its first
        message) for each new topic, and the last seq sent for those it read
        already, so that a client can resume any topic precisely, even one that
        was empty when it subscribed. The subscription itself is a resume from
        that position: whatever is published meanwhile is replayed, in order,
        never lost between the reading of the position and the live stream.
        """
        hub = self.hub
        new = [t for t in dict.fromkeys(granted) if t not in conn.topics and t != "*"]
        positions = {t: (await hub.backplane.since(t, MAX_SEQ)).last for t in new}
        if conn.closing:
            return
        seqs = {t: conn.last_seq[t] for t in granted if t in conn.last_seq}
        seqs.update(positions)
        topics = sorted(conn.topics.union(new))
        hub.send_control(conn, {"type": "subscribed", "topics": topics, "seqs": seqs})
        await self.resume(conn, positions, subscribing=True)

    async def resume(
        self, conn: Connection, since: Mapping[str, int], *, recovering: bool = False,
        subscribing: bool = False,
    ) -> None:
        """Replay what the client missed on each topic, then let live messages through.

        Live messages wait (`hold`) while history is read, then go out with
        duplicates dropped by seq: in order, exactly once. Raises ValueError when
        the topics would pass WS_MAX_TOPICS (nothing is added then). A topic the
        connection's grant does not allow gets an `error` and nothing else: no
        history, no resync.
        """
        if not since:
            return
        hub = self.hub
        if recovering:  # topics it reads already: only those it still reads
            granted = [t for t in since if t in conn.topics or t == "*"]
        else:
            admission = self.registry.admit(conn, since, hub.settings.max_topics)
            hub.access.refused_topics(conn, admission.refused)
            if not admission.granted:
                return
            hub.subscribe(conn, admission.granted)
            granted = admission.granted
            if not subscribing:
                self.stats.resumes += 1
        # Positions from another life of the history (the server restarted, Redis
        # lost its data) name messages that no longer exist, or other ones under
        # the same numbers: the client gets `resync` with the new position, never
        # a replay from a numbering it does not know.
        epoch = hub.backplane.epoch
        stale = conn.claimed_epoch not in (None, epoch) and bool(epoch)
        conn.claimed_epoch = None
        held = hold(conn)
        try:
            for topic in granted:
                seq = since[topic]
                replay = await hub.backplane.since(topic, MAX_SEQ if stale else seq)
                if conn.closing:
                    return
                conn.last_seq[topic] = seq  # the client says what it has
                for message in replay.items:
                    self.deliver_to(conn, message, replay=True)
                if recovering:
                    self.stats.recovered += len(replay.items)
                if replay.resync:
                    self._tell_resync(conn, topic, replay.last)
        finally:
            if held:
                self.release(conn)

    def release(self, conn: Connection) -> None:
        """Send what `hold` kept back, in order, duplicates dropped by seq."""
        pending, conn.pending = conn.pending, None
        for message in pending or ():
            self.deliver_to(conn, message)
