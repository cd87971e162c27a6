"""The connection registry, with no I/O: who is connected, and who gets which topic.

Every connection is registered when its WebSocket opens and removed exactly
once when it closes, whatever closed it (peer, heartbeat, slow consumer,
shutdown). Topic `*` reaches every connection; other topics reach their
subscribers only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from tether.heartbeat import Beat
from tether.limits import TokenBucket
from tether.message import BROADCAST_TOPIC, Message
from tether.outbox import Outbox


class Peer(Protocol):
    """What the hub needs from a connection's transport (adapted in server.py)."""

    def write(self, data: bytes) -> None: ...
    def in_transport(self) -> int: ...
    def is_closing(self) -> bool: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    async def close(
        self, code: int, reason: str, timeout: float, *, read: bool = True
    ) -> None: ...


class Connection:
    """One client and its state."""

    __slots__ = (
        "beat",
        "close_code",
        "close_reason",
        "connected_at",
        "control_bucket",
        "frame_bucket",
        "last_seq",
        "message_bucket",
        "outbox",
        "peer",
        "pending",
        "reading",
        "remote",
        "session_id",
        "skipped",
        "topics",
    )

    def __init__(self, session_id: str, connected_at: float, remote: str, outbox: Outbox) -> None:
        self.session_id = session_id
        self.connected_at = connected_at  # wall-clock seconds
        self.remote = remote
        self.outbox = outbox  # its frames on their way out (outbox.py)
        outbox.owner = self
        self.peer = outbox.peer
        self.topics: set[str] = set()
        self.last_seq: dict[str, int] = {}  # last seq delivered, per topic
        self.skipped = 0  # messages skipped while paused
        self.close_code: int | None = None  # set when the server closed it
        self.close_reason = ""
        self.beat: Beat[Connection] | None = None
        # Inbound rates (SPEC §10), each made on first use: messages, control frames
        # (pings and pongs), and frames of every kind.
        self.message_bucket: TokenBucket | None = None
        self.control_bucket: TokenBucket | None = None
        self.frame_bucket: TokenBucket | None = None
        self.reading = True  # False once closed for abuse: its bytes are no longer read
        # While a resume replays history, live messages wait here (None = live).
        self.pending: list[Message] | None = None

    @property
    def closing(self) -> bool:
        """A close is under way: nothing more is written to it (its outbox is closed)."""
        return self.outbox.closed

    @closing.setter
    def closing(self, value: bool) -> None:
        self.outbox.closed = value

    @property
    def paused(self) -> bool:
        """Paused by backpressure: it gets only `high` messages for now."""
        return self.outbox.paused

    def __repr__(self) -> str:
        return f"<Connection {self.session_id} {self.remote}>"


class Registry:
    """Connections by session id, and subscribers by topic."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_topic: dict[str, dict[Connection, None]] = {}
        self._by_remote: dict[str, int] = {}  # connections per client address

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def __contains__(self, conn: object) -> bool:
        return isinstance(conn, Connection) and self._by_id.get(conn.session_id) is conn

    def from_address(self, remote: str) -> int:
        """How many registered connections come from `remote`."""
        return self._by_remote.get(remote, 0)

    def get(self, session_id: str) -> Connection | None:
        return self._by_id.get(session_id)

    def add(self, conn: Connection) -> None:
        if conn.session_id in self._by_id:
            raise ValueError(f"session {conn.session_id} is already registered")
        self._by_id[conn.session_id] = conn
        self._by_remote[conn.remote] = self._by_remote.get(conn.remote, 0) + 1
        for topic in conn.topics:
            self._by_topic.setdefault(topic, {})[conn] = None

    def remove(self, conn: Connection) -> bool:
        """Unregister; True the first time, False when it was already gone."""
        if self._by_id.get(conn.session_id) is not conn:
            return False
        del self._by_id[conn.session_id]
        left = self._by_remote[conn.remote] - 1
        if left:
            self._by_remote[conn.remote] = left
        else:
            del self._by_remote[conn.remote]
        for topic in conn.topics:
            self._unindex(topic, conn)
        return True

    @staticmethod
    def admit(conn: Connection, topics: Iterable[str], limit: int) -> list[str]:
        """`topics`, if `conn` may read them all without reading more than `limit`.

        Every route that adds topics (`?topics=`, `subscribe`, `?since=`,
        `resume`) comes through here, so one client's topics, and what the hub
        and the backplane keep for them, stay bounded. Raises ValueError.
        """
        wanted = list(dict.fromkeys(topics))
        new = sum(1 for t in wanted if t not in conn.topics and t != BROADCAST_TOPIC)
        if new and len(conn.topics) + new > limit:
            raise ValueError(
                f"topic limit: a client reads at most {limit} topics "
                f"(it reads {len(conn.topics)}, asked for {new} more)"
            )
        return wanted

    def subscribe(self, conn: Connection, topics: list[str]) -> list[str]:
        """Add topics; returns those that were new."""
        new = [t for t in dict.fromkeys(topics) if t not in conn.topics and t != BROADCAST_TOPIC]
        conn.topics.update(new)
        if conn in self:
            for topic in new:
                self._by_topic.setdefault(topic, {})[conn] = None
        return new

    def unsubscribe(self, conn: Connection, topics: list[str]) -> list[str]:
        gone = [t for t in topics if t in conn.topics]
        for topic in gone:
            conn.topics.discard(topic)
            self._unindex(topic, conn)
        return gone

    def _unindex(self, topic: str, conn: Connection) -> None:
        subs = self._by_topic.get(topic)
        if subs is not None:
            subs.pop(conn, None)
            if not subs:
                del self._by_topic[topic]

    def subscribers(self, topic: str) -> list[Connection]:
        """A snapshot of who receives `topic` (everyone, for `*`)."""
        if topic == BROADCAST_TOPIC:
            return list(self._by_id.values())
        subs = self._by_topic.get(topic)
        return list(subs) if subs else []

    def topics(self) -> dict[str, int]:
        """Subscribed topics and their subscriber counts."""
        return {t: len(s) for t, s in self._by_topic.items()}
