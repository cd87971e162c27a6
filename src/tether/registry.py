"""The connection registry, with no I/O: who is connected, and who gets which topic.

Every connection is registered when its WebSocket opens and removed exactly
once when it closes, whatever closed it (peer, heartbeat, slow consumer,
shutdown). Topic `*` reaches every connection whose grant reads it (every
connection on a server without auth); other topics reach their subscribers
only. What a connection may read is checked here, when it asks (`admit`), and
when its grant changes (`regrant`), never per message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

from tether.auth import OPEN, Grant
from tether.heartbeat import Beat
from tether.limits import TokenBucket
from tether.message import BROADCAST_TOPIC, Message
from tether.outbox import Outbox

if TYPE_CHECKING:
    from tether.clock import Timer


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
        "auth_timer",
        "beat",
        "claimed_epoch",
        "close_code",
        "close_reason",
        "connected_at",
        "control_bucket",
        "deferrals",
        "deferred",
        "frame_bucket",
        "grant",
        "held",
        "last_seq",
        "message_bucket",
        "outbox",
        "peer",
        "pending",
        "reading",
        "remote",
        "session_id",
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
        # The epoch the client's positions belong to (`?epoch=`, `resume.epoch`; None:
        # an older client that sends none, taken to mean the current one).
        self.claimed_epoch: str | None = None
        # Topics with messages held back while it was paused: topic → the last seq
        # it had before them; sent from the history once it drains (fanout.py).
        self.deferred: dict[str, int] | None = None
        self.deferrals = 0  # messages held back so far
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
        # What it may read and publish (auth.py); None while it waits for its
        # first `auth` message, when it gets nothing and may send nothing else.
        self.grant: Grant | None = OPEN
        self.auth_timer: Timer | None = None  # the auth deadline, then the token's expiry
        self.held: Held | None = None  # `?topics=` and `?since=` kept until it is admitted

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


class Held(NamedTuple):
    """The topics and resume point of an upgrade URL, kept until the connection is admitted."""

    topics: list[str]
    since: str


class Admission(NamedTuple):
    """Topics a connection asked for: those it may read, and those its grant refuses."""

    granted: list[str]
    refused: list[str]


class Registry:
    """Connections by session id, subscribers by topic, and who receives `*`."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_topic: dict[str, dict[Connection, None]] = {}
        self._by_remote: dict[str, int] = {}  # connections per client address
        self._broadcast: dict[Connection, None] = {}  # those whose grant reads `*`

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
        if conn.grant is not None and conn.grant.reads_broadcast:
            self._broadcast[conn] = None
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
        self._broadcast.pop(conn, None)
        for topic in conn.topics:
            self._unindex(topic, conn)
        return True

    @staticmethod
    def admit(conn: Connection, topics: Iterable[str], limit: int) -> Admission:
        """`topics` split by `conn`'s grant, if it reads no more than `limit` once granted.

        Every route that adds topics (`?topics=`, `subscribe`, `?since=`,
        `resume`) comes through here, so what a client may read is checked in
        one place, once, when it asks; and one client's topics, and what the
        hub and the backplane keep for them, stay bounded. Raises ValueError
        when the granted ones would pass `limit` (nothing is added then).
        """
        wanted = list(dict.fromkeys(topics))
        grant = conn.grant
        if grant is None:  # not admitted yet: it reads nothing
            return Admission([], wanted)
        granted: list[str] = []
        refused: list[str] = []
        for topic in wanted:
            (granted if grant.can_read(topic) else refused).append(topic)
        new = sum(1 for t in granted if t not in conn.topics and t != BROADCAST_TOPIC)
        if new and len(conn.topics) + new > limit:
            raise ValueError(
                f"topic limit: a client reads at most {limit} topics "
                f"(it reads {len(conn.topics)}, asked for {new} more)"
            )
        return Admission(granted, refused)

    def regrant(self, conn: Connection, grant: Grant) -> list[str]:
        """Give `conn` a new grant; the topics it loses (`*` last if it loses the broadcast).

        A refreshed token may grant less: the topics it no longer grants are
        unsubscribed at once, and `*` stops reaching it. Topics it grants anew
        are not subscribed: the client asks for them.
        """
        lost = sorted(t for t in conn.topics if not grant.can_read(t))
        self.unsubscribe(conn, lost)
        had_broadcast = conn in self._broadcast
        conn.grant = grant
        if conn in self:
            if grant.reads_broadcast:
                self._broadcast[conn] = None
            elif had_broadcast:
                del self._broadcast[conn]
                lost.append(BROADCAST_TOPIC)
        return lost

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
        """A snapshot of who receives `topic` (everyone whose grant reads it, for `*`)."""
        if topic == BROADCAST_TOPIC:
            return list(self._broadcast)
        subs = self._by_topic.get(topic)
        return list(subs) if subs else []

    def topics(self) -> dict[str, int]:
        """Subscribed topics and their subscriber counts."""
        return {t: len(s) for t, s in self._by_topic.items()}
