"""The checker of the chaos test: what every client received, against the invariant (issue 15).

Pure: it reads the events the clients recorded (`bench/chaos_client.py`: one
`[kind, conn, t, topic, seq, extra]` each, `t` on CLOCK_MONOTONIC), the publishes
answered 202, and when the harness made the server lose its history; it returns
the violations, each with the client's received sequence around it.

The rules:

- **Order** (per client, per connection, per topic): the seqs received are
  strictly increasing and contiguous from the position the connection was
  told, except right after a `resync`, which gives the new one. A connection's
  position for a topic comes from its `?since=` or a `resume` it sent (when the
  epoch it named is the `connected` one's), from `subscribed`'s `seqs`, or from
  a `resync`. A `since` named under another epoch than the `connected` one's
  gives no position: the server owes a `resync` before any message of that
  topic (seqs belong to the epoch of the connection's `connected`). A message
  of a topic with no position is a violation too.
- **Accepted** (per client, per topic, across its connections): every publish
  answered 202, first sent after the client had a position for its topic, reaches it,
  unless a `resync` of that topic received afterwards covers it: one whose new
  position is at or past the publish's seq, or one that came after the history
  was lost (`Loss`) since the publish began.
- **Shutdown** (`shutdown=True`, the memory backplane, where each process has
  its own history): a connection that received the server's `1001` close frame
  has every publish of its topics that the same process accepted after the
  connection had a position for it: "publishes accepted before it reach the
  connected clients before they are closed with 1001" (README).
- **Numbering**: a publish accepted within one life of the history reaches
  every client under the seq its 202 named.
- **Claims**: each `since` a client sends is the position it had (a check of
  the harness's own client).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

STALE = -1  # a position named under another epoch: a resync must come first
KIND, CONN, T, TOPIC, SEQ, EXTRA = range(6)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A publish answered 202: its id (the payload's), topic, seq, first attempt, answer."""

    ident: str
    topic: str
    seq: int
    first: float
    answered: float


@dataclass(frozen=True, slots=True)
class Loss:
    """The history was lost from `start` (the kill) to `end` (the new one began)."""

    kind: str
    start: float
    end: float


@dataclass(slots=True)
class ClientLog:
    """What one client recorded."""

    name: str
    topics: list[str]
    events: list[list[Any]]


@dataclass(slots=True)
class Violation:
    rule: str
    client: str
    conn: int | None
    topic: str
    detail: str
    context: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"client {self.client}" + (f" connection {self.conn}" if self.conn else "")
        lines = [f"[{self.rule}] {where} topic {self.topic}: {self.detail}"]
        lines += [f"    {line}" for line in self.context]
        return "\n".join(lines)


@dataclass(slots=True)
class Report:
    violations: list[Violation] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, violation: Violation) -> None:
        self.violations.append(violation)
        self.counts[f"violations {violation.rule}"] += 1


def describe(event: Sequence[Any], index: int, t0: float = 0.0) -> str:
    """One recorded event as a line of context: arrival index, time, what it was."""
    kind, conn, t, topic, seq, extra = event
    what = f"{kind}"
    if topic is not None:
        what += f" {topic}"
    if seq is not None:
        what += f":{seq}"
    if kind == "msg" and extra is not None:
        what += f" id={extra}"
    elif extra is not None and kind != "msg":
        what += f" {extra}"
    return f"#{index} conn {conn} t={t - t0:.3f} {what}"


def _context(events: list[list[Any]], at: int, topic: str | None, t0: float,
             before: int = 8, after: int = 4) -> list[str]:
    """The events of `topic` (and the connection's own) around index `at`, marked."""
    def relevant(e: list[Any]) -> bool:
        return e[TOPIC] == topic or e[KIND] in ("open", "connected", "close", "claim", "reset",
                                                "pause")

    lines: list[str] = []
    i = at - 1
    while i >= 0 and len(lines) < before:
        if relevant(events[i]):
            lines.append(describe(events[i], i, t0))
        i -= 1
    lines.reverse()
    if at < len(events):
        lines.append(describe(events[at], at, t0) + "   <<<")
    j, n = at + 1, 0
    while j < len(events) and n < after:
        if relevant(events[j]):
            lines.append(describe(events[j], j, t0))
            n += 1
        j += 1
    return lines


class _Positions:
    """The client's own positions (topic → (seq, epoch)), tracked as the client does."""

    def __init__(self) -> None:
        self.have: dict[str, tuple[int, str]] = {}

    def take(self, topic: str, seq: int, epoch: str, message: bool) -> None:
        last = self.have.get(topic)
        if not message or last is None or seq > last[0] or last[1] != epoch:
            self.have[topic] = (seq, epoch)


def check_order(client: ClientLog, report: Report, t0: float = 0.0) -> None:
    """The order rule, and the claims check, over one client's events."""
    events = client.events
    pos: dict[str, int] = {}
    epoch = ""
    url_claims: tuple[str | None, dict[str, int]] = (None, {})
    own = _Positions()
    counts = report.counts

    def violation(rule: str, i: int, topic: str, detail: str) -> None:
        report.add(Violation(rule, client.name, events[i][CONN], topic, detail,
                             _context(events, i, topic, t0)))

    def claim(i: int, claimed_epoch: str | None, since: dict[str, int]) -> None:
        for topic, seq in since.items():
            if own.have.get(topic) != (seq, claimed_epoch):
                violation("claims", i, topic, f"claimed {seq} under {claimed_epoch}, "
                          f"had {own.have.get(topic)}")

    for i, event in enumerate(events):
        kind, _conn, _t, topic, seq, extra = event
        if kind == "open":
            pos = {}
            epoch = ""
            url_claims = (extra.get("epoch"), dict(extra.get("since") or {}))
            claim(i, *url_claims)
            counts["connections"] += 1
            if url_claims[1]:
                counts["resumes"] += 1
        elif kind == "connected":
            epoch = extra
            claimed, since = url_claims
            for t, s in since.items():
                pos[t] = s if claimed == epoch else STALE
            if since and claimed != epoch:
                counts["resumes across epochs"] += 1
        elif kind == "claim":
            claim(i, extra["epoch"], extra["since"])
            for t, s in extra["since"].items():
                pos[t] = s if extra["epoch"] == epoch else STALE
        elif kind == "subscribed":
            if topic not in pos:
                pos[topic] = seq
            if topic not in own.have:
                own.take(topic, seq, epoch, message=False)
        elif kind == "resync":
            counts["resyncs"] += 1
            pos[topic] = seq
            own.take(topic, seq, epoch, message=False)
        elif kind == "msg":
            counts["messages"] += 1
            p = pos.get(topic)
            if p is None:
                violation("order", i, topic, f"seq {seq} on a topic with no position")
            elif p == STALE:
                violation("order", i, topic, f"seq {seq} of epoch {epoch} before the resync "
                          "that a since from another epoch must get")
            elif seq <= p:
                violation("order", i, topic, f"seq {seq} at or below the position {p} "
                          "(a repeat or a reordering)")
            elif seq > p + 1:
                hole = f"{p + 1}" if seq == p + 2 else f"{p + 1}..{seq - 1}"
                violation("order", i, topic, f"seq {seq} after {p}: silent hole {hole}")
            if p is None or p == STALE or seq > p:
                pos[topic] = seq
            own.take(topic, seq, epoch, message=True)
        elif kind == "close":
            counts[f"closes {extra.get('code')}"] += 1
        elif kind == "other":
            counts["unexpected messages"] += 1


@dataclass(slots=True)
class _Seen:
    """One client's deliveries of one topic: ids, resyncs, when it first had a position."""

    first: float | None = None
    ids: dict[str, list[int]] = field(default_factory=dict)  # id -> the seqs it came with
    resync_times: list[float] = field(default_factory=list)
    resync_seqs: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # of every event of the topic
    indices: list[int] = field(default_factory=list)


def _seen(client: ClientLog) -> dict[str, _Seen]:
    seen: dict[str, _Seen] = {t: _Seen() for t in client.topics}
    for i, (kind, _conn, t, topic, seq, extra) in enumerate(client.events):
        s = seen.get(topic) if topic is not None else None
        if s is None:
            continue
        s.times.append(t)
        s.indices.append(i)
        if kind in ("subscribed", "resync") and s.first is None:
            s.first = t
        if kind == "msg" and extra is not None:
            s.ids.setdefault(extra, []).append(seq)
        elif kind == "resync":
            s.resync_times.append(t)
            s.resync_seqs.append(seq)
    return seen


def _covered(times: list[float], seqs: list[int], after: float, seq: int,
             losses: Sequence[Loss]) -> bool:
    """A resync received after `after` at or past `seq`, or after a loss of the history."""
    for k in range(bisect.bisect_right(times, after), len(times)):
        if seqs[k] >= seq:
            return True
        if any(loss.start < times[k] and loss.end > after for loss in losses):
            return True
    return False


def check_accepted(clients: Iterable[ClientLog], accepted: Sequence[Accepted],
                   losses: Sequence[Loss], report: Report, t0: float = 0.0) -> None:
    """The accepted rule: each 202 reaches every client that read its topic by then."""
    counts = report.counts
    shown: Counter[str] = Counter()
    for client in clients:
        seen = _seen(client)
        for pub in accepted:
            s = seen.get(pub.topic)
            if s is None:
                continue
            if s.first is None or s.first >= pub.first:
                counts["accepted: not yet reading"] += 1
                continue
            seqs = s.ids.get(pub.ident)
            if seqs is not None:
                counts["accepted: delivered"] += 1
                clean = not any(loss.start < pub.answered and loss.end > pub.first
                                for loss in losses)
                if clean and any(seq != pub.seq for seq in seqs):
                    # One life of the history, one key: one number, the same for everyone.
                    report.add(Violation(
                        "numbering", client.name, None, pub.topic,
                        f"id {pub.ident} accepted as seq {pub.seq}, received as {seqs}"))
            elif _covered(s.resync_times, s.resync_seqs, pub.first, pub.seq, losses):
                counts["accepted: covered by a resync"] += 1
            else:
                at = bisect.bisect_left(s.times, pub.first)
                index = s.indices[min(at, len(s.indices) - 1)] if s.indices else 0
                context = (_context(client.events, index, pub.topic, t0)
                           if shown[client.name] < 20 else [])
                shown[client.name] += 1
                report.add(Violation(
                    "accepted", client.name, None, pub.topic,
                    f"seq {pub.seq} (id {pub.ident}, accepted at t={pub.answered - t0:.3f}, "
                    f"first sent t={pub.first - t0:.3f}) never received, no resync covers it",
                    context))


def check_shutdown(clients: Iterable[ClientLog], accepted: Sequence[Accepted],
                   losses: Sequence[Loss], report: Report, t0: float = 0.0) -> None:
    """The shutdown rule: a connection closed 1001 got all its process accepted meanwhile."""
    bounds = sorted(loss.end for loss in losses)

    def life(t: float) -> int:  # which process: the number of restarts done by then
        return bisect.bisect_right(bounds, t)

    by_topic: dict[str, list[Accepted]] = {}
    for pub in accepted:
        by_topic.setdefault(pub.topic, []).append(pub)
    for client in clients:
        events = client.events
        start = 0
        for i, event in enumerate(events):
            if event[KIND] == "open":
                start = i
            if event[KIND] != "close" or event[EXTRA].get("code") != 1001:
                continue
            report.counts["closes 1001 checked"] += 1
            conn_events = events[start:i + 1]
            connected = next((e for e in conn_events if e[KIND] == "connected"), None)
            if connected is None:
                continue
            process = life(connected[T])
            since: dict[str, float] = {}  # topic -> when the connection had a position
            ids: dict[str, set[str]] = {}
            resyncs: dict[str, list[tuple[float, int]]] = {}
            claimed: dict[str, bool] = {}
            opened = conn_events[0]
            for t in opened[EXTRA].get("since") or {}:
                claimed[t] = opened[EXTRA].get("epoch") == connected[EXTRA]
            for e in conn_events:
                kind, topic = e[KIND], e[TOPIC]
                if kind == "connected":
                    for t, ok in claimed.items():
                        if ok:
                            since.setdefault(t, e[T])
                elif kind in ("subscribed", "resync") and topic is not None:
                    since.setdefault(topic, e[T])
                    if kind == "resync":
                        resyncs.setdefault(topic, []).append((e[T], e[SEQ]))
                elif kind == "msg":
                    ids.setdefault(topic, set()).add(e[EXTRA])
            for topic, began in since.items():
                for pub in by_topic.get(topic, ()):
                    if pub.first <= began or life(pub.first) != process:
                        continue
                    if life(pub.answered) != process:
                        continue
                    if pub.ident in ids.get(topic, set()):
                        report.counts["shutdown: delivered before 1001"] += 1
                        continue
                    if any(t > pub.first and s >= pub.seq for t, s in resyncs.get(topic, [])):
                        continue
                    # Around where it belonged: the connection's first event after it.
                    at = next((start + k for k, e in enumerate(conn_events)
                               if e[T] >= pub.answered and e[TOPIC] == topic), i)
                    report.add(Violation(
                        "shutdown", client.name, event[CONN], topic,
                        f"seq {pub.seq} (id {pub.ident}) accepted at "
                        f"t={pub.answered - t0:.3f} by the process this connection was on, "
                        f"not received before its 1001 close",
                        _context(events, at, topic, t0)))


def check(clients: Sequence[ClientLog], accepted: Sequence[Accepted], losses: Sequence[Loss],
          *, shutdown: bool = False, t0: float = 0.0) -> Report:
    """Every rule over every client; the report of violations and counts."""
    report = Report()
    for client in clients:
        check_order(client, report, t0)
    check_accepted(clients, accepted, losses, report, t0)
    if shutdown:
        check_shutdown(clients, accepted, losses, report, t0)
    report.counts["accepted publishes"] = len(accepted)
    return report
