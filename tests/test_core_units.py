"""Pure modules without an event loop: registry, backpressure, history, messages, frames."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import RecordingPeer
from tether import frames
from tether.clock import ManualClock
from tether.errors import PublishError, Refusal
from tether.history import History
from tether.message import Priority, prepare, stamp
from tether.outbox import Backpressure, Decision, Outbox, Writer
from tether.registry import Connection, Registry
from tether.wire import BINARY, PING, PONG, TEXT, FrameReader


def conn(sid: str, *topics: str) -> Connection:
    outbox = Outbox(RecordingPeer(), Backpressure(100, 10, 1000), Writer(ManualClock(), print))
    c = Connection(sid, 0.0, "127.0.0.1", outbox)
    c.topics.update(topics)
    return c


# ---- registry


def test_registry_add_remove_count_iterate() -> None:
    r = Registry()
    a, b = conn("a", "x"), conn("b", "y")
    r.add(a)
    r.add(b)
    assert len(r) == 2 and {c.session_id for c in r} == {"a", "b"}
    assert a in r and r.get("a") is a
    assert r.remove(a) is True
    assert r.remove(a) is False  # idempotent: unregistered exactly once
    assert len(r) == 1 and a not in r
    with pytest.raises(ValueError):
        r.add(b)


def test_registry_topics_and_broadcast() -> None:
    r = Registry()
    a, b, c = conn("a", "x"), conn("b", "x", "y"), conn("c")
    for x in (a, b, c):
        r.add(x)
    assert set(r.subscribers("x")) == {a, b}
    assert set(r.subscribers("y")) == {b}
    assert set(r.subscribers("*")) == {a, b, c}  # every client receives '*'
    assert r.subscribers("nobody") == []
    assert r.subscribe(c, ["y", "y", "*"]) == ["y"]
    assert set(r.subscribers("y")) == {b, c}
    r.unsubscribe(b, ["y"])
    assert set(r.subscribers("y")) == {c}
    r.remove(c)
    assert r.subscribers("y") == [] and "y" not in r.topics()


def test_registry_iteration_is_a_snapshot() -> None:
    r = Registry()
    for i in range(10):
        r.add(conn(str(i)))
    for c in r:
        r.remove(c)  # removing while iterating is safe
    assert len(r) == 0


# ---- backpressure


def test_backpressure_hysteresis_and_priorities() -> None:
    bp = Backpressure(high=100, low=20, max_buffer=1000)
    assert bp.paused(False, 100) is False
    assert bp.paused(False, 101) is True
    assert bp.paused(True, 50) is True  # stays paused until below low
    assert bp.paused(True, 19) is False
    assert bp.decide(True, 150, 10, Priority.HIGH) is Decision.SEND
    assert bp.decide(True, 150, 10, Priority.NORMAL) is Decision.SKIP
    assert bp.decide(True, 150, 10, Priority.LOW) is Decision.SKIP
    assert bp.decide(False, 50, 10, Priority.LOW) is Decision.SEND
    assert bp.decide(False, 995, 10, Priority.HIGH) is Decision.CLOSE
    with pytest.raises(ValueError):
        Backpressure(high=10, low=20, max_buffer=100)


# ---- history


def test_history_assigns_consecutive_seqs_per_topic() -> None:
    h: History[str] = History(3)
    for topic in ("a", "a", "b", "a"):
        seq = h.next_seq(topic)
        h.append(topic, seq, f"{topic}{seq}")
    assert h.last_seq("a") == 3 and h.last_seq("b") == 1
    with pytest.raises(ValueError):
        h.append("a", 7, "gap")


def test_history_since_and_resync() -> None:
    h: History[int] = History(3)
    for seq in range(1, 6):
        h.append("t", seq, seq)
    assert h.since("t", 5).items == [] and not h.since("t", 5).resync
    assert h.since("t", 3).items == [4, 5]
    assert h.since("t", 2).items == [3, 4, 5]
    r = h.since("t", 1)  # message 2 is gone
    assert r.resync and r.last == 5
    assert h.since("t", 9).resync  # numbering restarted
    assert h.since("new", 0).items == []
    assert h.since("new", 4).resync


def test_history_size_zero_keeps_nothing() -> None:
    h: History[int] = History(0)
    h.append("t", 1, 1)
    assert h.since("t", 0).resync and h.since("t", 1).items == []


# ---- messages


def test_prepare_and_stamp_serialize_once_and_append_topic_seq() -> None:
    p = prepare({"type": "t", "payload": {"k": [1, 2]}, "topic": "a", "priority": "high"})
    assert p.topic == "a" and p.priority is Priority.HIGH
    m = stamp(p, 7)
    assert orjson.loads(m.data) == {
        "type": "t", "payload": {"k": [1, 2]}, "priority": "high", "topic": "a", "seq": 7}
    assert orjson.loads(stamp(prepare({"type": "x"}), 1).data) == {
        "type": "x", "topic": "*", "seq": 1}


@pytest.mark.parametrize(
    "event",
    [[], "x", {}, {"type": ""}, {"type": 1}, {"type": "x", "topic": ""},
     {"type": "x", "topic": "a,b"}, {"type": "x", "priority": "urgent"},
     {"type": "x", "payload": {1, 2}}, {"type": "resync", "topic": "a"}, {"type": "connected"}],
)
def test_prepare_rejects_bad_events(event: object) -> None:
    with pytest.raises(PublishError) as err:
        prepare(event)
    assert err.value.refusal is Refusal.INVALID


# ---- frames


def test_frames_length_encodings() -> None:
    assert frames.text(b"hi") == b"\x81\x02hi"
    assert frames.text(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert frames.text(b"x" * 70000)[:2] == b"\x81\x7f"
    assert frames.ping(b"12345678") == b"\x89\x0812345678"
    assert frames.close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    with pytest.raises(ValueError):
        frames.ping(b"x" * 126)


def test_frame_reader_reassembles_messages_between_pongs_and_pings() -> None:
    from tests.wsraw import encode

    pong = encode(0xA, b"\x00\x00\x00\x00\x00\x00\x00\x07")
    text = encode(0x1, b'{"type":"ping"}')
    reader = FrameReader(1000)
    data = text + pong + encode(0x2, b"ab", fin=False) + encode(0x9, b"p") + pong[:5]
    assert reader.feed(data) == [(TEXT, '{"type":"ping"}'), (PONG, (7).to_bytes(8, "big")),
                                 (PING, b"p")]
    assert not reader.at_boundary  # the pong is cut
    assert reader.feed(pong[5:] + encode(0x0, b"cd")) == [(PONG, (7).to_bytes(8, "big")),
                                                          (BINARY, b"abcd")]
    assert reader.at_boundary and reader.failure is None and reader.frames == 6


def test_a_lone_heartbeat_pong_is_read_as_its_ping_id() -> None:
    from tests.wsraw import encode

    pong = encode(0xA, (123456789).to_bytes(8, "big"))
    lone_pong = FrameReader(1000).lone_pong
    assert lone_pong(pong) == 123456789
    assert lone_pong(encode(0xA, b"1234567")) is None  # not 8 bytes: not ours
    assert lone_pong(encode(0x9, b"12345678")) is None  # a ping, not a pong
    assert lone_pong(pong + pong) is None  # two frames: the general path
    # Inside another frame's payload the same bytes are data: the caller asks first.
    reader = FrameReader(1000)
    reader.feed(encode(0x1, b"x" * 40)[:20])
    assert not reader.at_boundary and reader.lone_pong(pong) is None


@pytest.mark.parametrize(("data", "failure"), [
    (bytes([0x81 | 0x40, 0x80, 1, 2, 3, 4]), 1002),  # RSV1 set, nothing negotiated
    (bytes([0x83, 0x80, 1, 2, 3, 4]), 1002),  # reserved data opcode
    (bytes([0x8B, 0x80, 1, 2, 3, 4]), 1002),  # reserved control opcode
    (bytes([0x81, 0x00]), 1002),  # unmasked
    (bytes([0x09, 0x80, 1, 2, 3, 4]), 1002),  # a fragmented ping
    (bytes([0x80, 0x80, 1, 2, 3, 4]), 1002),  # a continuation with no message
    (bytes([0x88, 0x81, 0, 0, 0, 0, 3]), 1002),  # a close frame of one byte
    (bytes([0x89, 0xFE, 0, 5, 0, 0, 0, 0]) + b"12345", 1002),  # ping length in 16 bits
    (bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]), 1007),  # invalid UTF-8
    (bytes([0x81, 0xFF]) + (2**40).to_bytes(8, "big") + b"\0\0\0\0", 1009),  # far too big
])
def test_frame_reader_maps_each_violation_to_its_close_code(data: bytes, failure: int) -> None:
    reader = FrameReader(1000)
    assert reader.feed(data) == []
    assert reader.failure is not None and reader.failure[0] == failure
    assert reader.feed(b"anything") == []  # nothing more is read after a failure


def test_fragmented_text_fails_at_the_first_bad_fragment() -> None:
    from tests.wsraw import encode

    reader = FrameReader(1000)
    assert reader.feed(encode(0x1, "κό".encode(), fin=False)) == []
    assert reader.failure is None
    assert reader.feed(encode(0x0, b"\xf4\x90\x80\x80", fin=False)) == []  # > U+10FFFF
    assert reader.failure == (1007, "Invalid UTF-8")


def test_ping8_head_is_the_header_of_an_8_byte_ping() -> None:
    assert frames.ping(b"12345678") == frames.PING8_HEAD + b"12345678"


# ---- the outbox: its common case equals the rule as written


class HeldPeer(RecordingPeer):
    """A peer whose transport holds as many bytes as the test says."""

    def __init__(self, held: int, closing: bool) -> None:
        super().__init__()
        self.held, self.closing = held, closing

    def in_transport(self) -> int:
        return self.held

    def is_closing(self) -> bool:
        return self.closing


def _plain_offer(outbox: Outbox, frame: bytes, priority: Priority) -> Decision:
    """`Outbox.offer` with no shortcut: every case through Backpressure."""
    if outbox.closed:
        return Decision.GONE
    if outbox.peer.is_closing():
        outbox.closed = True
        return Decision.GONE
    in_transport = outbox.peer.in_transport()
    outbox.paused = outbox.rule.paused(outbox.paused, in_transport)
    decision = outbox.rule.decide(outbox.paused, in_transport + outbox.queued, len(frame),
                                  priority)
    if decision is Decision.SEND:
        outbox.queue = [*(outbox.queue or []), frame]
        outbox.queued += len(frame)
        if outbox.queued > outbox.rule.high:  # more than the transport may hold: written now
            outbox.flush()
    return decision


@given(
    held=st.integers(0, 1200), queued=st.integers(0, 1200), size=st.integers(1, 400),
    paused=st.booleans(), closed=st.booleans(), closing=st.booleans(),
    priority=st.sampled_from(list(Priority)),
)
@settings(max_examples=2000, deadline=None)
def test_outbox_offer_decides_as_the_plain_rule_for_every_state(
    held: int, queued: int, size: int, paused: bool, closed: bool, closing: bool,
    priority: Priority,
) -> None:
    rule = Backpressure(high=500, low=100, max_buffer=1500)
    boxes = []
    for _ in range(2):
        box = Outbox(HeldPeer(held, closing), rule, Writer(ManualClock(), print))
        box.queue = [b"q" * queued] if queued else None
        box.queued, box.paused, box.closed = queued, paused, closed
        boxes.append(box)
    fast, plain = boxes
    frame = b"f" * size
    assert fast.offer(frame, priority) is _plain_offer(plain, frame, priority)
    assert (fast.paused, fast.closed, fast.queued, fast.queue) == (
        plain.paused, plain.closed, plain.queued, plain.queue)
    assert fast.peer.frames == plain.peer.frames  # type: ignore[attr-defined]  # HeldPeer


def test_a_burst_waiting_for_the_writer_never_closes_a_client_that_keeps_up() -> None:
    """Frames waiting for a delayed flush are written once more than `high` waits.

    Else a burst on a loaded machine (the writer's delay grows with the last
    flush's cost) would count as the client's and close a healthy one (1013).
    """
    rule = Backpressure(high=500, low=100, max_buffer=1500)
    writer = Writer(ManualClock(), print)
    writer.cost = 0.004  # the last flush was costly: the next one waits 4 ms
    peer = RecordingPeer()  # takes every byte at once: nothing is held in its transport
    box = Outbox(peer, rule, writer)
    for _ in range(100):
        assert box.offer(b"x" * 100, Priority.HIGH) is Decision.SEND
        assert box.queued <= rule.high
    assert sum(map(len, peer.frames)) + box.queued == 100 * 100
