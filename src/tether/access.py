"""Who is let in, and for how long: each connection's token, from open to expiry.

With AUTH_SECRET or AUTH_PUBLIC_KEY set, a connection is admitted with the
Grant of its token (`auth.py`), or as an anonymous reader of PUBLIC_TOPICS;
until then it waits, gets nothing and may send nothing but `auth`. Without
them, every connection is admitted at once with `auth.OPEN` (it reads every
topic), as before tokens existed.

A connection's states (its `grant`: None while waiting) and what moves it:

    state      event                              next       what it gets
    ---------  ---------------------------------  ---------  --------------------------------------
    open       auth off                           admitted   connected; ?topics=, ?since=
    open       ?token= valid                      admitted   connected, authenticated; ?topics= and
                                                             ?since= by the grant; the expiry timer
    open       no ?token=, PUBLIC_TOPICS set      admitted   connected; ?topics=, ?since= by them
    open       no ?token=                         waiting    nothing; ?topics=, ?since= held;
                                                             the WS_HANDSHAKE_TIMEOUT timer
    waiting    auth valid                         admitted   as `?token= valid`, held topics then
    waiting    deadline passes                    closed     4003 "Forbidden: no token ..."
    waiting    any other message, binary          closed     4003 "Forbidden: auth expected first"
    admitted   auth valid (same sub, or was anon) admitted   unsubscribed (what the new token no
                                                             longer grants), authenticated
    admitted   its token's exp comes              closed     4001 "Token expired"
    any        auth with a bad token              closed     4003 (4001 when it is expired);
                                                             a token of another sub: 4003

Each row is a test in tests/test_auth.py. Every timer is the hub clock's, so a
test jumps to the deadline or to `exp`. What a connection may read is checked
when it asks (`Registry.admit`) and when its grant changes (`Registry.regrant`):
a delivery costs nothing more (`fanout.deliver` does not look at grants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether import codes
from tether.auth import OPEN, AuthError, Grant, Patterns, Verifier, anonymous
from tether.clock import iso
from tether.config import Settings
from tether.logs import get_logger
from tether.registry import Held

if TYPE_CHECKING:
    from tether.hub import Hub
    from tether.registry import Connection

log = get_logger("auth")
ws_log = get_logger("websocket")


def make_verifier(settings: Settings) -> Verifier | None:
    """The Verifier of AUTH_SECRET or AUTH_PUBLIC_KEY, with PUBLIC_TOPICS; None when auth is off."""
    public = Patterns(settings.public_topics)
    if settings.auth_secret is not None:
        return Verifier.hmac(settings.auth_secret, public)
    if settings.auth_public_key is not None:
        return Verifier.public_key(settings.auth_public_key, public)
    return None


class Access:
    """The auth state of this hub's connections, driven by their messages and the clock."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        settings = hub.settings
        self.verifier = make_verifier(settings)
        self.public = Patterns(settings.public_topics)
        self.deadline = settings.handshake_timeout_ms / 1000

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    # ---- open

    def open(self, conn: Connection, topics: list[str], token: str | None) -> None:
        """A registered connection opened: admit it, refuse it, or let it wait for `auth`."""
        verifier = self.verifier
        if verifier is None:
            self._admit(conn, OPEN, topics, token=False)
        elif token is not None:
            try:
                grant = verifier.verify(token, self.hub.clock.wall())
            except AuthError as exc:
                self.refuse(conn, exc)
                return
            self._admit(conn, grant, topics, token=True)
        elif self.public:
            self._admit(conn, anonymous(self.public), topics, token=False)
        else:
            conn.grant = None  # as Hub.open registered it: not even `*` reaches it
            conn.held = Held(topics, "")
            conn.auth_timer = self.hub.clock.call_later(
                self.deadline, lambda: self._deadline(conn))

    def hold_since(self, conn: Connection, raw: str) -> bool:
        """Keep a `?since=` until the connection is admitted; False when it is admitted."""
        if conn.grant is not None:
            return False
        if conn.held is not None:
            conn.held = conn.held._replace(since=raw)
        return True

    def _admit(self, conn: Connection, grant: Grant, topics: list[str], *, token: bool,
               watch: bool = False) -> None:
        hub = self.hub
        hub.regrant(conn, grant)
        admission, error = None, None
        if topics:
            try:
                admission = hub.registry.admit(conn, topics, hub.settings.max_topics)
            except ValueError as exc:
                error = str(exc)
            else:
                # Hub.open tells the backplane once it is done; an `auth` admission here.
                hub.registry.subscribe(conn, admission.granted)
                if watch:
                    hub.watch_topics()
        if hub.greet:
            greeting: dict[str, Any] = {"type": "connected", "sessionId": conn.session_id,
                                        "timestamp": iso(conn.connected_at),
                                        "epoch": hub.backplane.epoch}
            seqs = hub.fanout.positions(conn)
            if seqs:
                greeting["seqs"] = seqs
            hub.send_control(conn, greeting)
        if token:
            self._arm_expiry(conn, grant)
            self.authenticated(conn, grant)
        data: dict[str, Any] = {"sessionId": conn.session_id, "remote": conn.remote}
        if grant.sub is not None:
            data["sub"] = grant.sub
        ws_log.info("WebSocket client connected", **data)
        if error is not None:
            hub.inbound.client_error(conn, error)
        elif admission is not None:
            self.refused_topics(conn, admission.refused)

    # ---- messages

    async def auth(self, conn: Connection, token: object) -> None:
        """An `auth` message: admit a waiting connection, or refresh an admitted one's token."""
        hub = self.hub
        verifier = self.verifier
        if verifier is None:  # nothing to check: every connection reads every topic here
            hub.send_control(conn, {"type": "authenticated", "sub": None, "exp": None,
                                    "expiresIn": None, "topics": sorted(conn.topics)})
            return
        try:
            grant = verifier.verify(token, hub.clock.wall())
        except AuthError as exc:
            self.refuse(conn, exc)
            return
        old = conn.grant
        if old is None:  # waiting: admitted now, with what its URL asked for
            held, conn.held = conn.held, None
            self._cancel(conn)
            self._admit(conn, grant, held.topics if held else [], token=True, watch=True)
            if held is not None and held.since and not conn.closing:
                await hub.inbound.resume_query(conn, held.since)
            return
        if old.sub is not None and old.sub != grant.sub:
            # A connection is one user's for its life: a token of another ends it.
            self.refuse(conn, AuthError("token for another sub"))
            return
        hub.stats.token_refreshes += 1
        lost = hub.regrant(conn, grant)
        self._arm_expiry(conn, grant)
        if lost:
            hub.send_control(conn, {"type": "unsubscribed", "topics": lost,
                                    "reason": "not granted by the new token"})
        self.authenticated(conn, grant)
        log.debug("Token refreshed", sessionId=conn.session_id, sub=grant.sub,
                  expiresIn=self._expires_in(grant), unsubscribed=lost)

    def before_auth(self, conn: Connection) -> None:
        """A waiting connection sent something other than `auth`: it is closed."""
        self.refuse(conn, AuthError("auth expected first"))

    def authenticated(self, conn: Connection, grant: Grant) -> None:
        self.hub.send_control(conn, {
            "type": "authenticated",
            "sub": grant.sub,
            "exp": grant.exp,
            # The client's clock may be off: it schedules its refresh by this.
            "expiresIn": self._expires_in(grant),
            "topics": sorted(conn.topics),
        })

    def refused_topics(self, conn: Connection, topics: list[str]) -> None:
        """Each topic the connection's grant does not let it read: an `error` naming it."""
        hub = self.hub
        for topic in topics:
            hub.stats.topics_refused += 1
            hub.send_control(conn, {"type": "error", "topic": topic,
                                    "error": f"forbidden: not allowed to read topic {topic!r}"})

    # ---- closing

    def refuse(self, conn: Connection, exc: AuthError) -> None:
        """Close for a bad or missing token: 4001 when it expired, else 4003."""
        if conn.closing:
            return
        hub = self.hub
        hub.stats.auth_refused += 1
        sub = conn.grant.sub if conn.grant is not None else None
        log.warn("Token refused", sessionId=conn.session_id, remote=conn.remote, sub=sub,
                 reason=exc.reason)
        if exc.expired:
            hub.close(conn, *codes.TOKEN_EXPIRED)
        else:
            code, reason = codes.FORBIDDEN
            hub.close(conn, code, f"{reason}: {exc.reason}")

    def _deadline(self, conn: Connection) -> None:
        conn.auth_timer = None
        if conn.grant is None:
            seconds = f"{self.deadline:g}"
            self.refuse(conn, AuthError(f"no token within WS_HANDSHAKE_TIMEOUT ({seconds} s)"))

    def _arm_expiry(self, conn: Connection, grant: Grant) -> None:
        self._cancel(conn)
        if grant.exp is not None:
            delay = max(0.0, grant.exp - self.hub.clock.wall())
            conn.auth_timer = self.hub.clock.call_later(delay, lambda: self._expired(conn))

    def _expired(self, conn: Connection) -> None:
        conn.auth_timer = None
        if conn.closing:
            return
        hub = self.hub
        hub.stats.tokens_expired += 1
        sub = conn.grant.sub if conn.grant is not None else None
        log.info("Token expired", sessionId=conn.session_id, sub=sub)
        hub.close(conn, *codes.TOKEN_EXPIRED)

    def _expires_in(self, grant: Grant) -> float | None:
        if grant.exp is None:
            return None
        return round(max(0.0, grant.exp - self.hub.clock.wall()), 3)

    def _cancel(self, conn: Connection) -> None:
        timer, conn.auth_timer = conn.auth_timer, None
        if timer is not None:
            timer.cancel()

    def forget(self, conn: Connection) -> None:
        """The connection is gone: its timer too."""
        if conn.auth_timer is not None:
            self._cancel(conn)
        conn.held = None
