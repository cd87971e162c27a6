"""The chaos test of the invariant (issue 15), bounded: one fixed seed, each fault once.

`bench/chaos.py` runs real tether servers, careful clients (`bench/chaos_client.py`),
steady publishes at mixed priorities and a seeded schedule of faults, then checks
what every client received (`bench/chaos_check.py`). Here: once on the memory
backplane (pause, slow close, SIGSTOP, TCP reset, a server restart), once on two
nodes and a real redis-server (the same, with a Redis restart and a node killed
instead of the restart). The longer run with random seeds is
`python -m bench.chaos --minutes 10`.

The checker's rules are tested first, on recorded sequences made by hand: each
one must find the violation it is for, and pass the sequences that keep it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.chaos import Config, Result, run_chaos, summary
from bench.chaos_check import Accepted, ClientLog, Loss, Report, check
from tests.redis_server import RedisServer

SEED = 7  # the fixed seed of the bounded run
SECONDS = 14.0  # of publishing and faults, per backplane


# ---------------------------------------------------------------------- the checker's rules


class Log:
    """A client's recorded events, written by hand (the format of bench/chaos_client.py)."""

    def __init__(self, topics: tuple[str, ...] = ("a",)) -> None:
        self.topics = list(topics)
        self.events: list[list[Any]] = []
        self.conn = 0
        self.t = 0.0

    def _add(self, kind: str, topic: str | None = None, seq: int | None = None,
             extra: Any = None) -> Log:
        self.t += 1.0
        self.events.append([kind, self.conn, self.t, topic, seq, extra])
        return self

    def open(self, since: dict[str, int] | None = None, epoch: str | None = None) -> Log:
        self.conn += 1
        return self._add("open", extra={"url": "u", "epoch": epoch, "since": since or {}})

    def connected(self, epoch: str = "E1") -> Log:
        return self._add("connected", extra=epoch)

    def subscribed(self, topic: str, seq: int) -> Log:
        return self._add("subscribed", topic, seq)

    def msg(self, topic: str, *seqs: int, ids: tuple[str, ...] = ()) -> Log:
        for i, seq in enumerate(seqs):
            self._add("msg", topic, seq, ids[i] if i < len(ids) else f"{topic}{seq}")
        return self

    def resync(self, topic: str, seq: int) -> Log:
        return self._add("resync", topic, seq)

    def claim(self, since: dict[str, int], epoch: str) -> Log:
        return self._add("claim", extra={"epoch": epoch, "since": since})

    def close(self, code: int | None = 1006) -> Log:
        return self._add("close", extra={"code": code, "why": ""})

    def client(self, name: str = "c") -> ClientLog:
        return ClientLog(name, self.topics, self.events)


def rules(report: Report) -> list[str]:
    return [v.rule for v in report.violations]


def test_a_contiguous_stream_across_reconnects_and_resyncs_passes() -> None:
    log = (Log(("a", "b")).open().connected("E1").subscribed("a", 5).subscribed("b", 0)
           .msg("a", 6, 7).msg("b", 1).close()
           .open({"a": 7, "b": 1}, "E1").connected("E1").msg("a", 8).resync("b", 40)
           .msg("b", 41).close(1013)
           # a new epoch: the server owes a resync before any message of each topic
           .open({"a": 8, "b": 41}, "E1").connected("E2").resync("a", 3).msg("a", 4)
           .resync("b", 0).msg("b", 1, 2))
    report = check([log.client()], [], [])
    assert report.violations == [], [str(v) for v in report.violations]
    assert report.counts["resumes"] == 2 and report.counts["resyncs"] == 3


@pytest.mark.parametrize(("seqs", "what"), [
    ((6, 8), "silent hole 7"),
    ((6, 6), "a repeat"),
    ((7, 6), "silent hole 6"),  # and then a reordering
    ((6, 9, 10), "silent hole 7..8"),
])
def test_the_order_rule_finds_holes_repeats_and_reordering(seqs: tuple[int, ...],
                                                           what: str) -> None:
    log = Log().open().connected().subscribed("a", 5).msg("a", *seqs)
    report = check([log.client()], [], [])
    assert rules(report) and set(rules(report)) == {"order"}
    assert what in report.violations[0].detail
    assert "<<<" in "\n".join(report.violations[0].context)  # the sequence around it


def test_a_resume_that_repeats_what_the_last_connection_had_is_a_violation() -> None:
    log = (Log().open().connected().subscribed("a", 5).msg("a", 6, 7).close()
           .open({"a": 7}, "E1").connected("E1").msg("a", 7, 8))
    assert rules(check([log.client()], [], [])) == ["order"]


def test_a_new_epochs_numbering_without_a_resync_is_a_violation() -> None:
    """Issue 15's restart: since=a:7 answered from the new life's numbering."""
    log = (Log().open().connected("E1").subscribed("a", 5).msg("a", 6, 7).close()
           .open({"a": 7}, "E1").connected("E2").msg("a", 8))
    report = check([log.client()], [], [])
    assert rules(report) == ["order"]
    assert "before the resync" in report.violations[0].detail
    # A `resume` message under another epoch is held to the same rule.
    log = (Log().open().connected("E2").subscribed("a", 5).claim({"a": 5}, "E2")
           .msg("a", 6))
    assert rules(check([log.client()], [], [])) == []
    log = Log().open().connected("E2").claim({"a": 5}, "E1").msg("a", 6)
    assert "order" in rules(check([log.client()], [], []))


def test_a_message_of_a_topic_with_no_position_is_a_violation() -> None:
    log = Log().open().connected().msg("a", 1)
    assert rules(check([log.client()], [], [])) == ["order"]


def test_a_since_that_is_not_the_clients_position_is_flagged() -> None:
    log = (Log().open().connected().subscribed("a", 5).msg("a", 6).close()
           .open({"a": 9}, "E1").connected("E1"))
    assert rules(check([log.client()], [], [])) == ["claims"]


def test_the_accepted_rule_each_202_reaches_each_reader_or_a_resync_covers_it() -> None:
    log = Log().open().connected().subscribed("a", 0)  # has a position at t=3
    log.msg("a", 1, ids=("p1",))  # t=4
    log.resync("a", 5)  # t=5: 2..5 are gone, told
    log.msg("a", 6, ids=("p6",))  # t=6
    accepted = [
        Accepted("p1", "a", 1, first=3.5, answered=3.6),  # delivered
        Accepted("p3", "a", 3, first=3.5, answered=3.6),  # covered by the resync to 5
        Accepted("p6", "a", 6, first=5.5, answered=5.6),  # delivered
        Accepted("p0", "a", 0, first=2.0, answered=2.1),  # before it read the topic
    ]
    report = check([log.client()], accepted, [])
    assert report.violations == [], [str(v) for v in report.violations]
    assert report.counts["accepted: covered by a resync"] == 1
    assert report.counts["accepted: not yet reading"] == 1
    # Past the resync's position, or before it with no resync after: lost.
    lost = [Accepted("p7", "a", 7, first=5.5, answered=5.6),
            Accepted("p9", "a", 9, first=6.5, answered=6.6)]
    report = check([log.client()], lost, [])
    assert rules(report) == ["accepted", "accepted"]
    assert "never received" in report.violations[0].detail
    # After the history was lost (a restart), a later resync covers it whatever its seq.
    log.close(1001).open({"a": 6}, "E1").connected("E2").resync("a", 2)  # t=7..10
    assert rules(check([log.client()], lost[:1], [])) == ["accepted"]
    assert rules(check([log.client()], lost[:1], [Loss("restart", start=6.5, end=8.5)])) == []


def test_the_numbering_rule_one_seq_per_accepted_publish() -> None:
    log = Log().open().connected().subscribed("a", 0).msg("a", 1, ids=("p1",))
    assert rules(check([log.client()], [Accepted("p1", "a", 2, 3.5, 3.6)], [])) == [
        "numbering"]
    # Across a loss of the history a retried publish may be numbered again.
    assert rules(check([log.client()], [Accepted("p1", "a", 2, 3.5, 3.6)],
                       [Loss("restart", 3.55, 3.58)])) == []


def test_the_shutdown_rule_a_1001_close_comes_after_what_was_accepted() -> None:
    log = (Log().open().connected("E1").subscribed("a", 0).msg("a", 1, ids=("p1",))
           .close(1001))  # closed at t=5
    accepted = [Accepted("p1", "a", 1, 3.5, 3.6), Accepted("p2", "a", 2, 3.7, 3.8)]
    report = check([log.client()], accepted, [], shutdown=True)
    assert "shutdown" in rules(report)
    # A publish the next process accepted is not owed to the old connection.
    next_life = Accepted("q1", "a", 1, 6.5, 6.6)
    report = check([log.client()], [accepted[0], next_life], [Loss("restart", 5.5, 6.0)],
                   shutdown=True)
    assert "shutdown" not in rules(report)
    assert report.counts["shutdown: delivered before 1001"] == 1


# ---------------------------------------------------------------------- the bounded chaos runs


def _assert_clean(result: Result) -> None:
    text = summary(result)
    print(text)
    assert result.ok, text
    idle = [f"{f.kind} ({f.note})" for f in result.faults if not f.effect]
    assert not idle, f"faults that did not bite: {idle}\n{text}"
    counts, server = result.report.counts, result.server_counts
    assert counts["accepted: delivered"] > 2_000, text  # it checked something
    assert server["recovered (held back, then sent from the history)"] > 0, text  # pause
    assert counts["closes 1013"] >= 1 or server["closed as too slow (1013)"] >= 1, text
    assert server["closed as stale (heartbeat)"] >= 1, text  # SIGSTOP
    assert counts["resumes"] >= 3, text


@pytest.mark.slow
async def test_chaos_memory_backplane(tmp_path: Path) -> None:
    result = await run_chaos(Config(backplane="memory", seconds=SECONDS, seed=SEED,
                                    bounded=True, quiet=True, workdir=tmp_path))
    _assert_clean(result)
    assert sorted(f.kind for f in result.faults) == ["pause", "reset", "restart", "slow", "stop"]
    counts = result.report.counts
    assert counts["closes 1001"] >= 1 and counts["resumes across epochs"] >= 1
    assert counts["shutdown: delivered before 1001"] > 0


@pytest.mark.slow
@pytest.mark.redis
async def test_chaos_redis_backplane(private_redis: RedisServer, tmp_path: Path) -> None:
    result = await run_chaos(Config(backplane="redis", seconds=SECONDS, seed=SEED,
                                    bounded=True, quiet=True, workdir=tmp_path),
                             redis=private_redis)
    _assert_clean(result)
    assert sorted(f.kind for f in result.faults) == [
        "nodekill", "pause", "redis", "reset", "slow", "stop"]
    assert result.report.counts["resumes across epochs"] >= 1  # after the Redis restart
