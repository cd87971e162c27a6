"""The real hub, in-process, with its timers driven by a manual clock (no sockets, no sleeps).

The clock schedules the heartbeat, the event-loop lag monitor and the write flush
(`tether.clock.Clock`), so jumping it fires them: thirty heartbeat intervals run
in a fraction of a second, and the SPEC §4 bounds are checked against the
clock's own times.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import LogCapture
from tests.support import RecordingPeer
from tests.wsraw import frames_in
from tether.backplane.memory import MemoryBackplane
from tether.clock import ManualClock
from tether.config import Settings
from tether.frames import PING8_HEAD
from tether.hub import Hub
from tether.registry import Connection

I = 1.0  # noqa: E741 - the SPEC calls the interval I
K = 2


class Client(RecordingPeer):
    """A peer that notes the pings written to it and when it was aborted."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.pings: list[int] = []
        self.aborted_at: float | None = None
        self.conn: Connection | None = None

    def write(self, data: bytes) -> None:
        if data.startswith(PING8_HEAD) and len(data) == 10:
            self.pings.append(int.from_bytes(data[2:], "big"))
        else:
            super().write(data)

    def abort(self) -> None:
        self.aborted_at = self.clock.now()

    def close_frames(self) -> list[tuple[int | None, str]]:
        """(code, reason) of each close frame written to it."""
        return [(f.close_code, f.payload[2:].decode())
                for f in frames_in(b"".join(self.frames)) if f.opcode == 0x8]


def hub_with(clock: ManualClock, **settings: int) -> Hub:
    fields = {"heartbeat_interval_ms": round(I * 1000), "heartbeat_missed": K, **settings}
    return Hub(Settings(**fields), MemoryBackplane(100), clock)  # type: ignore[arg-type]


def test_thirty_intervals_through_the_hub_keep_the_spec_bounds(log_capture: LogCapture) -> None:
    clock = ManualClock()
    hub = hub_with(clock)
    rng = random.Random(7)
    clients = []
    for _ in range(60):
        c = Client(clock)
        c.conn = hub.open(c, "127.0.0.1")
        clients.append(c)
        clock.advance(rng.uniform(0, 0.02))
    hub.start_heartbeat()
    # A third of them die at a random moment: they stop answering, as a SIGSTOPped
    # process or a cut network would (the kernel still takes the bytes).
    died = {id(c): 1000 + rng.uniform(2, 20) * I for c in clients[:20]}
    last_answer: dict[int, float] = {}
    answered: dict[int, int] = {}
    start = clock.now()
    while clock.now() < start + 30 * I:
        clock.advance(0.005)
        for c in clients:
            if c.aborted_at is not None or not c.pings:
                continue
            if clock.now() >= died.get(id(c), float("inf")):
                continue
            assert c.conn is not None
            for ping_id in c.pings:  # answered at once, as a healthy client does
                hub.pong_id(c.conn, ping_id)
                last_answer[id(c)] = clock.now()
                answered[id(c)] = answered.get(id(c), 0) + 1
            c.pings.clear()
    for c in clients[20:]:  # the healthy: never closed, pinged about once an interval
        assert c.aborted_at is None
        assert 28 <= answered[id(c)] <= 31, answered[id(c)]
    for c in clients[:20]:  # the dead: closed within the SPEC's window
        assert c.aborted_at is not None
        silent = c.aborted_at - last_answer[id(c)]
        dead_for = c.aborted_at - died[id(c)]
        assert silent <= (K + 1) * I + 1e-6, silent  # within (K+1)·I of the last answer
        assert dead_for >= K * I - 1e-6, dead_for  # never sooner than K·I after death
        assert c.close_frames() == [(1000, "Heartbeat timeout")]
    assert len(hub.registry) == 40
    assert len(log_capture.find("Closing stale connection")) == 20
    assert hub.heartbeat is not None and hub.heartbeat.stale_closed == 20
    hub.stop()


@pytest.mark.parametrize("stall", [3 * I, 5 * I])
def test_a_stalled_server_closes_no_healthy_client_and_says_it_stalled(
    log_capture: LogCapture, stall: float
) -> None:
    clock = ManualClock()
    hub = hub_with(clock)
    clients = [Client(clock) for _ in range(20)]
    for c in clients:
        c.conn = hub.open(c, "127.0.0.1")
    hub.start_heartbeat()

    def run(seconds: float, answer: bool = True) -> None:
        until = clock.now() + seconds
        while clock.now() < until:
            clock.advance(0.005)
            if answer:
                answer_all()

    def answer_all() -> None:
        for c in clients:
            assert c.conn is not None
            for ping_id in c.pings:
                hub.pong_id(c.conn, ping_id)
            c.pings.clear()

    run(4 * I)
    # Every client has a ping outstanding whose answer is on its way...
    run(I, answer=False)
    # ...when the event loop is blocked (or the process suspended): no timer
    # runs, no ping goes out, no pong is read. Then the overdue timers run at
    # once, before the handlers have read the answers (the worst order).
    clock.stall(stall)
    clock.advance(0)
    answer_all()
    run(4 * I)
    assert all(c.aborted_at is None for c in clients)
    stalls = log_capture.find("Event loop stalled")
    assert len(stalls) == 1 and stalls[0]["data"]["lagMs"] >= stall * 1000 - 300
    assert hub.stats.loop_stalls == 1
    # The checks that ran late counted no miss: that is why nobody was closed.
    assert hub.heartbeat is not None and hub.heartbeat.late_checks >= len(clients)
    hub.stop()


def test_flushes_gather_frames_while_flushes_are_costly() -> None:
    """The flush delay follows the last flush's cost: jump the clock, not sleep."""
    clock = ManualClock()
    hub = hub_with(clock, heartbeat_interval_ms=0)

    class Slow(Client):
        def write(self, data: bytes) -> None:
            super().write(data)
            clock.stall(0.003)  # each write takes 3 ms of this clock

    slow = Slow(clock)
    conn = hub.open(slow, "127.0.0.1")
    clock.advance(0)  # the greeting's flush, on the next pass: it cost 3 ms
    assert len(slow.frames) == 1
    for i in range(3):
        hub.send(conn, f"m{i}")
    clock.advance(0.001)  # within the delay: nothing written yet
    assert len(slow.frames) == 1
    clock.advance(0.003)  # the delayed flush: the three frames in one write
    assert len(slow.frames) == 2 and slow.frames[1].count(b"\x81\x02m") == 3
