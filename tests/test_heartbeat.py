"""The pure heartbeat core, driven by a manual clock: no sleeping, no sockets."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from tether.clock import ManualClock
from tether.heartbeat import (
    ANSWER,
    Beat,
    Heartbeat,
    State,
    Tick,
    decode_ping_id,
    encode_ping_id,
)

I = 1.0  # noqa: E741 - the SPEC calls the interval I


def run_until(hb: Heartbeat[str], clock: ManualClock, until: float, step: float = 0.01,
              answer: set[str] | None = None) -> list[tuple[float, list[str], list[str]]]:
    """Tick every `step` up to `until`; clients in `answer` pong each ping at once."""
    log = []
    while clock.now() < until - 1e-9:
        clock.advance(step)
        t = hb.tick(clock.now())
        for beat in t.ping:
            if answer is not None and beat.owner in answer:
                hb.pong(beat, beat.ping_id, clock.now())
        log.append((clock.now(), [b.owner for b in t.ping], [b.owner for b in t.stale]))
    return log


def drive(hb: Heartbeat[int], clock: ManualClock, until: float) -> int:
    """Tick at each due time up to `until`, every ping answered at once; the number of ticks."""
    ticks = 0
    while clock.now() < until:
        due = hb.next_due()
        assert due is not None
        clock.advance(max(0.0, due - clock.now()))
        ticks += 1
        for b in hb.tick(clock.now()).ping:
            hb.pong(b, b.ping_id, clock.now())
    return ticks


def test_phases_spread_10000_simultaneous_connections() -> None:
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(I, 2)
    for n in range(10_000):
        hb.add(n, clock.now())
    per_tick = []
    pinged: Counter[int] = Counter()
    assert hb.period == pytest.approx(I - 2 * hb.resolution)
    for _ in range(round(hb.period / 0.01)):  # one turn of the wheel in ticks of 10 ms
        clock.advance(0.01)
        t = hb.tick(clock.now())
        per_tick.append(len(t.ping))
        pinged.update(b.owner for b in t.ping)
    assert len(pinged) == 10_000 and set(pinged.values()) == {1}  # each once per turn
    # Even spread: no tick carries more than ~2x its fair share (100 per tick).
    assert max(per_tick) <= 200, max(per_tick)
    assert min(per_tick) >= 50, min(per_tick)


def test_work_per_tick_is_proportional_to_due_connections() -> None:
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(I, 2)
    for n in range(1000):
        hb.add(n, clock.now())
    clock.advance(0.001)
    assert hb.tick(clock.now()).ping == []  # no slot has come round yet
    clock.advance(hb.resolution)
    # One slot: its share of the connections (1000 · w / I = 10), not all of them.
    assert 5 <= len(hb.tick(clock.now()).ping) <= 20


def test_pings_to_one_connection_are_exactly_one_period_apart() -> None:
    """Each connection keeps its slot: ticks at any times ping it every P = I - 2w exactly."""
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(I, 2)
    beats = [hb.add(n, clock.now()) for n in range(50)]
    sent: dict[int, list[float]] = {n: [] for n in range(50)}
    while clock.now() < 1000 + 6 * I:
        due = hb.next_due()
        assert due is not None
        clock.advance(max(0.0, due - clock.now()) + 0.0003)  # a timer fires a bit late
        for b in hb.tick(clock.now()).ping:
            sent[b.owner].append(clock.now())
            hb.pong(b, b.ping_id, clock.now())
    assert all(b.alive for b in beats)
    for times in sent.values():
        assert len(times) >= 5
        assert all(abs((b - a) - hb.period) < 1e-6 for a, b in itertools.pairwise(times)), times


def test_slots_are_visited_once_per_interval_and_only_when_occupied() -> None:
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(30.0, 2)
    assert hb.resolution == pytest.approx(0.1) and hb.slots == 300
    beat = hb.add(1, clock.now())
    ticks = drive(hb, clock, 1000 + 90.0)
    assert ticks <= 4  # one occupied slot: a tick per interval, not one per slot
    hb.remove(beat)
    assert hb.next_due() is None


def test_stale_after_exactly_k_missed_pings() -> None:
    for k in (1, 2, 3):
        clock = ManualClock()
        hb: Heartbeat[str] = Heartbeat(I, k)
        beat = hb.add("dead", clock.now())
        first_ping = None
        stale_at = None
        pings = 0
        while stale_at is None and clock.now() < 1000 + 10:
            clock.advance(0.01)
            t = hb.tick(clock.now())
            if t.ping:
                pings += 1
                first_ping = first_ping or clock.now()
            if t.stale:
                stale_at = clock.now()
        assert stale_at is not None and first_ping is not None
        assert pings == k  # K pings sent, all unanswered
        # Never before K·I after the first unanswered ping, nor past (K+1)·I after
        # the last sign of life (here: the connect at 1000).
        assert k * I <= stale_at - first_ping
        assert stale_at - 1000 <= (k + 1) * I + 0.011
        assert not beat.alive and hb.count == 0 and hb.stale_closed == 1


def test_healthy_client_never_stale() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    hb.add("ok", clock.now())
    log = run_until(hb, clock, clock.now() + 20 * I, answer={"ok"})
    assert not any(stale for _, _, stale in log)
    assert sum(len(p) for _, p, _ in log) in (19, 20, 21)


def test_detection_bound_after_last_pong() -> None:
    """A peer that dies just after a pong is stale within (K+1)·I, and not before K·I."""
    for k in (1, 2, 3):
        clock = ManualClock()
        hb: Heartbeat[str] = Heartbeat(I, k)
        beat = hb.add("p", clock.now())
        alive = {"p"}
        died_at = None
        stale_at = None
        while stale_at is None:
            clock.advance(0.005)
            t = hb.tick(clock.now())
            for b in t.ping:
                if b.owner in alive:
                    hb.pong(b, b.ping_id, clock.now())
                    if clock.now() > 1000 + 3.3:  # dies just after this pong
                        alive.clear()
                        died_at = clock.now()
            if t.stale:
                stale_at = clock.now()
        assert died_at is not None and not beat.alive
        assert k * I <= stale_at - died_at <= (k + 1) * I + 0.01


@pytest.mark.parametrize("k", [1, 2])
def test_server_stall_of_five_intervals_closes_no_healthy_client(k: int) -> None:
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(I, k)
    beats = [hb.add(n, clock.now()) for n in range(100)]
    run_until(hb, clock, clock.now() + 2 * I, answer=set(range(100)))
    # Pings go out, then the loop stalls for 5·I before anything more runs: the
    # answers are sitting unread when the first late tick runs.
    clock.advance(0.5)
    sent = hb.tick(clock.now()).ping
    assert sent
    clock.advance(5 * I)
    late = hb.tick(clock.now())
    assert late.stale == [] and late.late > 0
    for b in beats:  # now the handlers read the pongs
        hb.pong(b, b.ping_id, clock.now())
    answer = set(range(100))
    log = run_until(hb, clock, clock.now() + 5 * I, answer=answer)
    assert not any(stale for _, _, stale in log)
    assert hb.count == 100


def test_pings_never_sent_during_stall_do_not_count() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    beat = hb.add("x", clock.now())
    run_until(hb, clock, clock.now() + 1.5 * I, answer={"x"})
    clock.advance(10 * I)  # suspended: ten intervals of pings never sent
    t = hb.tick(clock.now())
    assert t.stale == [] and len(t.ping) == 1  # one ping, not ten
    assert beat.misses == 0


def test_any_inbound_frame_resets() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    beat = hb.add("x", clock.now())
    for _ in range(10):  # never pongs, but sends a message each interval
        run_until(hb, clock, clock.now() + I)
        hb.seen(beat, clock.now())
    assert beat.alive and beat.misses == 0


def test_outbound_traffic_is_not_proof_of_life() -> None:
    """Nothing the server writes is passed to the core: only seen()/pong() reset."""
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    hb.add("x", clock.now())
    log = run_until(hb, clock, clock.now() + 4 * I)
    assert any(stale for _, _, stale in log)


def test_rtt_from_matching_pong_only() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    beat = hb.add("x", clock.now())
    while not hb.tick(clock.now()).ping:
        clock.advance(0.01)
    sent_id = beat.ping_id
    clock.advance(0.037)
    assert hb.pong(beat, sent_id, clock.now()) == pytest.approx(0.037)
    assert beat.rtt == pytest.approx(0.037)
    assert hb.pong(beat, sent_id + 99, clock.now()) is None  # not ours: no RTT
    assert hb.pong(beat, None, clock.now()) is None
    assert hb.pongs == 3 and beat.last_pong == clock.now()


def test_removed_connections_are_never_pinged() -> None:
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(I, 2)
    beats: list[Beat[int]] = [hb.add(n, clock.now()) for n in range(10)]
    for b in beats[:5]:
        hb.remove(b)
    log = run_until(hb, clock, clock.now() + 3 * I)
    pinged = {o for _, p, _ in log for o in p}
    assert pinged == set(range(5, 10)) and hb.count == 0  # the rest went stale
    assert hb.next_due() is None


def test_late_ping_younger_than_interval_is_not_a_miss() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 1)
    beat = hb.add("x", clock.now())
    due = hb.next_due()
    assert due is not None
    clock.advance(due - clock.now() + 0.9 * I)  # first ping goes out 0.9·I late
    t = hb.tick(clock.now())
    assert len(t.ping) == 1
    clock.advance(0.2 * I)  # next due on the phase grid; the ping is only 0.2·I old
    assert hb.tick(clock.now()).stale == []
    assert beat.alive


def test_early_final_check_keeps_the_phase_when_the_client_answers() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    beat = hb.add("slow", clock.now())
    times: list[float] = []
    answered = 0
    while clock.now() < 1000 + 6 * I:
        clock.advance(0.001)
        t = hb.tick(clock.now())
        if t.ping:
            times.append(clock.now())
        assert not t.stale
        # Answers only after one miss was counted: each time the final check is
        # queued early, then finds the client alive.
        if beat.outstanding and beat.misses == 1 and clock.now() - beat.ping_at > 0.5 * I:
            hb.pong(beat, beat.ping_id, clock.now())
            answered += 1
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert answered >= 2
    assert all(abs(g - hb.period) < 0.002 for g in gaps), gaps  # one ping per turn, on phase


def test_ping_payload_round_trip() -> None:
    assert decode_ping_id(encode_ping_id(12345)) == 12345
    assert len(encode_ping_id(2**63)) == 8
    assert decode_ping_id(b"short") is None


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        Heartbeat(0, 2)
    with pytest.raises(ValueError):
        Heartbeat(1, 0)


def test_grouped_pings_keep_the_bound_from_the_last_answer() -> None:
    """Pings go out a slot (up to w) early, in groups; a close still lands within (K+1)·I."""
    clock = ManualClock()
    hb: Heartbeat[int] = Heartbeat(30.0, 2)
    for n in range(19_000):
        hb.add(n, clock.now())
    ticks = drive(hb, clock, 1000 + 30.0)
    assert ticks <= 30.0 / hb.resolution + 5  # ~300 groups of ~63, not 19,000 wake-ups
    # A peer that answered three pings, then died just after the third answer.
    for resolution in (None, 0.2):
        hb2: Heartbeat[str] = Heartbeat(1.0, 2, resolution)
        beat = hb2.add("x", clock.now())
        answered = 0
        died_at = 0.0
        while True:
            due = hb2.next_due()
            assert due is not None
            clock.advance(max(0.0, due - clock.now()))
            t = hb2.tick(clock.now())
            if t.ping and answered < 3:
                hb2.pong(beat, beat.ping_id, clock.now())
                answered += 1
                died_at = clock.now()
            if t.stale:
                break
        assert 2.0 <= clock.now() - died_at <= 3.0
        # The midpoint of its window: `slack` of room before (K+1)·I.
        assert clock.now() - beat.last_seen == pytest.approx(3.0 - hb2.slack, abs=1e-6)


def test_closing_check_is_never_before_k_intervals_after_death() -> None:
    """Death at any instant between two pings: closed in [K·I, (K+1)·I] of it (± margin)."""
    for k in (1, 2):
        for frac in (0.0005, 0.1, 0.5, 0.9, 0.9995):
            clock = ManualClock()
            hb: Heartbeat[str] = Heartbeat(I, k)
            beat = hb.add("p", clock.now())
            alive, died_at, stale_at = True, None, None
            while stale_at is None:
                due = hb.next_due()
                assert due is not None
                if alive and clock.now() > 1000 + 3.0 and died_at is None:
                    # Dies `frac` of the way from its last answer to its next ping.
                    died_at = clock.now() + frac * (due - clock.now())
                    alive = False
                clock.advance(max(0.0, due - clock.now()))
                t = hb.tick(clock.now())
                for b in t.ping:
                    if alive:
                        hb.pong(b, b.ping_id, clock.now())
                if t.stale:
                    stale_at = clock.now()
            assert died_at is not None and not beat.alive
            # With `slack` of room on each side, for timer latency.
            assert k * I + hb.slack - 1e-6 <= stale_at - died_at, (k, frac)
            assert stale_at - died_at <= (k + 1) * I - hb.slack + 1e-6, (k, frac)


def test_closing_check_sits_mid_window_and_voids_when_the_client_answers() -> None:
    clock = ManualClock()
    hb: Heartbeat[str] = Heartbeat(I, 2)
    assert hb.slack == hb.resolution == pytest.approx(0.01)
    beat = hb.add("x", clock.now())
    while beat.final_at is None:  # never answers: the 2nd ping queues the closing check
        due = hb.next_due()
        assert due is not None
        clock.advance(due - clock.now())
        hb.tick(clock.now())
    lo = beat.first_at + 2 * I
    hi = beat.last_seen + 3 * I
    assert beat.final_at == pytest.approx((lo + hi) / 2)
    assert beat.final_at >= beat.ping_at + I  # the 2nd ping will be at least I old
    # It answers before its slot comes round: the slot pings as usual, and the
    # queued check, when its time comes, closes nothing.
    hb.pong(beat, beat.ping_id, clock.now() + 0.1)
    clock.advance(hb.period)
    assert [b.owner for b in hb.tick(clock.now()).ping] == ["x"]
    assert beat.final_at is None
    clock.advance(I)
    assert hb.tick(clock.now()).stale == [] and beat.alive


def test_every_state_moves_as_the_transition_table_says() -> None:
    """Each (state, event) of heartbeat.py's table, reached by real events, K = 2."""
    S = State

    def at_state(target: State) -> tuple[Heartbeat[str], ManualClock, Beat[str]]:
        clock = ManualClock()
        hb: Heartbeat[str] = Heartbeat(I, 2)
        beat = hb.add("x", clock.now())
        passed = target in (S.CLOSING_PASSED, S.REVIVED_PASSED)
        want = {S.REVIVED: S.CLOSING, S.REVIVED_PASSED: S.CLOSING_PASSED}.get(target, target)
        for _ in range(10_000):
            if beat.state is want and not (want is S.WAITING and beat.misses):
                break
            if want is S.CLOSING_PASSED and beat.state is S.CLOSING:
                # its slot comes round before the check: advance to that visit only
                clock.advance(hb._visits[0][0] - clock.now())
                hb.tick(clock.now())
                continue
            due = hb.next_due()
            assert due is not None
            clock.advance(due - clock.now())
            hb.tick(clock.now())
        assert beat.state is want, (target, beat.state)
        if target in (S.REVIVED, S.REVIVED_PASSED):
            hb.seen(beat, clock.now())
        assert beat.state is target and passed == (target.name.endswith("PASSED"))
        return hb, clock, beat

    # answer
    for state, after in ANSWER.items():
        hb, clock, beat = at_state(state)
        hb.pong(beat, None, clock.now())
        assert beat.state is after and beat.misses == 0, state
    # visit and check, each transition applied to a beat in that state
    for state, event, late, (pinged, stale, after) in [
        (S.QUIET, "visit", False, (True, False, S.WAITING)),
        (S.WAITING, "visit", False, (True, False, S.CLOSING)),  # a miss: the next is the K-th
        (S.WAITING, "visit", True, (True, False, S.WAITING)),  # late: no miss counted
        (S.CLOSING, "visit", False, (False, False, S.CLOSING_PASSED)),
        (S.CLOSING_PASSED, "visit", False, (False, False, S.CLOSING_PASSED)),
        (S.REVIVED, "visit", False, (True, False, S.WAITING)),  # its check is cancelled
        (S.REVIVED_PASSED, "visit", False, (True, False, S.WAITING)),
        (S.CLOSING, "check", False, (False, True, None)),
        (S.CLOSING_PASSED, "check", False, (False, True, None)),
        (S.CLOSING_PASSED, "check", True, (True, False, S.CLOSING)),  # late: ping again
        (S.REVIVED, "check", False, (False, False, S.QUIET)),
        (S.REVIVED_PASSED, "check", False, (True, False, S.WAITING)),
    ]:
        hb, clock, beat = at_state(state)
        due = beat.ping_at + I if event == "visit" else beat.check_at
        now = due + (3 * hb.tolerance if late else 0.0)
        clock.advance(max(0.0, now - clock.now()))
        t: Tick[str] = Tick()
        if event == "visit":
            hb._visit(beat, due, clock.now(), t)
        else:
            hb._check(beat, due, clock.now(), t)
        case = (state, event, late)
        assert (beat in t.ping, beat in t.stale, t.late) == (pinged, stale, int(late)), case
        if stale:
            assert not beat.alive and beat.misses == 2, case
        else:
            assert beat.state is after, (case, beat.state)
            assert (beat.final_at is not None) == (after in (S.CLOSING, S.CLOSING_PASSED)), case
