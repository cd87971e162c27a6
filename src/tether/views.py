"""What operators see: the hub's counters, `GET /health` and `GET /api/connections` (SPEC §9).

The counters are plain integers the rooms bump as they work; these views read
them (and the connections) when asked, so nothing here runs on a hot path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether.clock import iso, mono_to_iso
from tether.message import Priority

if TYPE_CHECKING:
    from tether.hub import Hub
    from tether.registry import Connection

# Upper bounds (seconds) of the RTT histogram buckets in /metrics.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _per_priority() -> list[int]:
    return [0] * len(Priority)


@dataclass(slots=True)
class Stats:
    """Counters shown in /health and /metrics (lists are indexed by Priority)."""

    connections_total: int = 0
    connections_refused: int = 0
    published: list[int] = field(default_factory=_per_priority)
    delivered: list[int] = field(default_factory=_per_priority)
    deferred: list[int] = field(default_factory=_per_priority)  # held back while paused
    recovered: int = 0  # held-back messages sent from the history once the client drained
    rtt_counts: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0
    rate_limited: int = 0
    abuse_closed: int = 0
    slow_closed: int = 0
    resumes: int = 0
    resyncs: int = 0
    replayed: int = 0
    client_errors: int = 0
    duplicates: int = 0  # publishes answered as a repeat of their idempotency key
    auth_refused: int = 0  # connections closed for a bad or missing token (4003, 4001)
    tokens_expired: int = 0  # connections closed at their token's exp (4001)
    token_refreshes: int = 0  # fresh tokens taken by an open connection
    topics_refused: int = 0  # topics asked for that a grant does not allow
    loop_lag: float = 0.0  # seconds, last measurement
    loop_lag_max: float = 0.0
    loop_stalls: int = 0
    # Connections ended, by close code (the one logged in `WebSocket client
    # disconnected`; 1006 when none was exchanged, RFC 6455 §7.1.5). Bounded:
    # a client may only send the codes wire.py lets through (about 2,000).
    disconnects: dict[int, int] = field(default_factory=dict)


def minimal_health(hub: Hub) -> dict[str, Any]:
    """`GET /health` without the admin token: what a load balancer needs, and no more."""
    return {
        "status": "shutting_down" if hub.shutting_down else "ok",
        "uptime": round(hub.clock.now() - hub.started_at, 3),
        "clients": len(hub.registry),
    }


def health(hub: Hub) -> dict[str, Any]:
    """The `GET /health` document."""
    hb = hub.heartbeat
    s = hub.stats
    settings = hub.settings
    return {
        "status": "shutting_down" if hub.shutting_down else "ok",
        "pid": os.getpid(),
        "uptime": round(hub.clock.now() - hub.started_at, 3),
        "clients": len(hub.registry),
        "heartbeat": {
            "enabled": hb is not None,
            "intervalMs": settings.heartbeat_interval_ms,
            "missed": settings.heartbeat_missed,
            "pinged": hb.pings_sent if hb else 0,
            "pongs": hb.pongs if hb else 0,
            "staleClosed": hb.stale_closed if hb else 0,
            "lateChecks": hb.late_checks if hb else 0,
        },
        "loop": {
            "lagMs": round(s.loop_lag * 1000, 3),
            "maxLagMs": round(s.loop_lag_max * 1000, 3),
            "stalls": s.loop_stalls,
        },
        "messages": {
            "published": sum(s.published),
            "duplicates": s.duplicates,
            "delivered": sum(s.delivered),
            "replayed": s.replayed,
            "deferred": {p.name.lower(): s.deferred[p] for p in Priority},
            "recovered": s.recovered,
            "rateLimited": s.rate_limited,
            "abuseClosed": s.abuse_closed,
            "slowClosed": s.slow_closed,
            "resumes": s.resumes,
            "resyncs": s.resyncs,
        },
        "auth": {
            "enabled": hub.access.enabled,
            "refused": s.auth_refused,
            "expired": s.tokens_expired,
            "refreshes": s.token_refreshes,
            "topicsRefused": s.topics_refused,
        },
        "disconnects": {str(code): n for code, n in sorted(s.disconnects.items())},
        "backplane": hub.backplane.state(),
    }


def _access(hub: Hub, conn: Connection) -> str:
    """How a connection was let in: open (no auth here), token, anonymous, or waiting."""
    grant = conn.grant
    if grant is None:
        return "waiting"
    if grant.sub is not None:
        return "token"
    return "anonymous" if hub.access.enabled else "open"


def connections(hub: Hub) -> list[dict[str, Any]]:
    """The `GET /api/connections` list: one object per client."""
    out = []
    clock = hub.clock
    for conn in hub.registry:
        beat = conn.beat
        last_pong = None
        rtt = None
        if beat is not None:
            if beat.last_pong is not None:
                last_pong = mono_to_iso(clock, beat.last_pong)
            if beat.rtt is not None:
                rtt = round(beat.rtt * 1000, 3)
        outbox = conn.outbox
        grant = conn.grant
        out.append(
            {
                "sessionId": conn.session_id,
                "access": _access(hub, conn),
                "sub": grant.sub if grant is not None else None,
                "expiresAt": iso(grant.exp) if grant is not None and grant.exp else None,
                "connectedAt": iso(conn.connected_at),
                "remote": conn.remote,
                "lastPong": last_pong,
                "rttMs": rtt,
                "buffered": outbox.buffered(),
                "paused": outbox.paused_now(),
                "deferred": conn.deferrals,
                "topics": sorted(conn.topics),
                "lastSeq": dict(conn.last_seq),
            }
        )
    return out
