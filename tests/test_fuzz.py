"""Hypothesis fuzz of everything a client can send, against one long-lived server process.

Client messages (any JSON value, protocol-shaped messages with random arguments,
random text and binary frames of random sizes, invalid UTF-8), the `?topics=` and
`?since=` query strings, and `POST /event` bodies. Throughout, a healthy client
reads the broadcast topic while a ticker publishes to it. Each test checks at its
end (the `rig` fixture's teardown) that the server came through it healthy: no
error was logged, no traceback was printed, the server's client count is back to
the healthy client alone, and the healthy client has every message published to
`*`, in order, exactly once. So each test stands alone, in any order; only the
server process is shared, to spare a start per test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import HttpClient, ServerProcess, wait_until
from tests.wsraw import RawWS

MAX_MESSAGE = 65_536
# `rig` is function-scoped on purpose: its health check runs once after all of a
# test's examples, not after each one.
FUZZ = settings(max_examples=150, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class Published:
    """The highest seq the server assigned on topic `*` (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = 0

    def saw(self, reply: dict[str, Any]) -> None:
        if reply.get("topic") == "*":
            with self.lock:
                self.last = max(self.last, int(reply["seq"]))


class Healthy(threading.Thread):
    """A well-behaved client in its own thread: answers pings, records seqs on `*`."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.ws = RawWS("127.0.0.1", port)
        self.seqs: list[int] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        self.ws.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                f = self.ws.recv()
            except TimeoutError:
                continue
            except BaseException as exc:  # the healthy client must never be dropped
                self.error = exc
                return
            if f.opcode == 0x9:
                self.ws.send_frame(0xA, f.payload)
            elif f.opcode == 0x1:
                msg = orjson.loads(f.payload)
                if "seq" in msg and msg.get("topic") == "*":
                    self.seqs.append(msg["seq"])
            elif f.opcode == 0x8:
                self.error = AssertionError(f"healthy client closed: {f.close_code}")
                return


class Ticker(threading.Thread):
    """Publishes a tick every 20 ms while the fuzz runs."""

    def __init__(self, url: str, published: Published) -> None:
        super().__init__(daemon=True)
        self.http = HttpClient(url)
        self.published = published
        self.stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(0.02):
                status, reply, _ = self.http.post_event(b'{"type":"tick"}')
                assert status == 202, (status, reply)
                self.published.saw(reply)
                self.count += 1
        except BaseException as exc:
            self.error = exc


class Rig:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.port = server.port
        self.published = Published()
        self.http = HttpClient(server.url)
        self.healthy = Healthy(self.port)
        self.healthy.ws.recv_data()  # connected
        self.healthy.start()
        self.ticker = Ticker(server.url, self.published)
        self.ticker.start()

    def check(self) -> None:
        """The server is healthy: nothing leaked, nothing logged as an error, nothing lost."""
        assert self.server.proc is not None and self.server.proc.poll() is None
        assert wait_until(lambda: self.http.get_json("/health")["clients"] == 1, 10), \
            self.http.get_json("/health")
        text = self.server.text()
        assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]
        errors = [line for line in self.server.lines() if line.get("level") == "error"]
        assert not errors, errors[:3]
        status, reply, _ = self.http.post_event(b'{"type":"marker"}')
        assert status == 202
        self.published.saw(reply)
        last = self.published.last
        assert wait_until(lambda: bool(self.healthy.seqs) and self.healthy.seqs[-1] >= last, 10)
        assert self.healthy.error is None, self.healthy.error
        assert self.ticker.error is None, self.ticker.error
        seqs = list(self.healthy.seqs)  # the ticker may have published more meanwhile
        assert len(seqs) >= last and seqs == list(range(1, len(seqs) + 1))


@pytest.fixture(scope="module")
def shared_rig() -> Iterator[Rig]:
    """The server, the healthy client and the ticker, for every test of the module."""
    env = {"LOG_LEVEL": "info", "WS_MESSAGE_RATE": "1000000", "WS_PING_RATE": "100000",
           "WS_MAX_MESSAGE": str(MAX_MESSAGE), "HISTORY_SIZE": "50"}
    server = ServerProcess(env=env)
    server.start()
    r = Rig(server)
    try:
        yield r
    finally:
        r.ticker.stop.set()
        r.ticker.join(5)
        r.healthy.stop.set()
        r.healthy.join(5)
        r.healthy.ws.close()
        r.ticker.http.close()
        r.http.close()
        assert r.ticker.count > 10  # it really ran alongside the fuzz
        assert server.stop() == 0


@pytest.fixture
def rig(shared_rig: Rig) -> Iterator[Rig]:
    """The shared rig, checked healthy after the test: each test answers for its own traffic."""
    shared_rig.check()  # what an earlier test left is not blamed on this one
    yield shared_rig
    shared_rig.check()


# ------------------------------------------------------------------ strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
topic_names = st.text(max_size=70) | st.sampled_from(["a", "b", "*", "news", "", " ", "a,b"])
anything = json_values | topic_names | st.lists(topic_names, max_size=120)
protocol = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "resume", "ping", "pong", "error",
                              "connected", "Subscribe", ""]) | st.text(max_size=10)},
    optional={
        "topics": anything,
        "since": anything | st.dictionaries(topic_names, st.integers() | st.text(), max_size=5),
        "id": json_values,
    },
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[int, bytes]:
    """One client message: (opcode, payload)."""
    kind = draw(st.sampled_from(["json", "protocol", "text", "binary", "sized"]))
    if kind == "json":  # stdlib json: big integers and lone surrogates (as \\u escapes) too
        return 0x1, json.dumps(draw(json_values)).encode()
    if kind == "protocol":
        return 0x1, json.dumps(draw(protocol)).encode()
    if kind == "text":  # surrogates make invalid UTF-8 on purpose
        return 0x1, draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "binary":
        return 0x2, draw(st.binary(max_size=300))
    size = draw(st.sampled_from([0, 1, 125, 126, 65_535, MAX_MESSAGE, MAX_MESSAGE + 1]) |
                st.integers(0, MAX_MESSAGE + 2000))
    return draw(st.sampled_from([0x1, 0x2])), b"x" * size


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ------------------------------------------------------------------ the fuzz


@FUZZ
@given(messages=st.lists(frames(), min_size=1, max_size=6))
def test_fuzz_client_messages(rig: Rig, messages: list[tuple[int, bytes]]) -> None:
    ws = RawWS("127.0.0.1", rig.port)
    try:
        assert orjson.loads(ws.recv_data().payload)["type"] == "connected"
        expect: int | None = None  # the close code the first bad message must bring
        for opcode, payload in messages:
            ws.send_frame(opcode, payload)
            if len(payload) > MAX_MESSAGE:
                expect = 1009
                break
            if opcode == 0x1 and not valid_utf8(payload):
                expect = 1007
                break
        if expect is None:
            ws.send_text('{"type":"ping","id":"end"}')
        deadline = time.monotonic() + 5
        while True:
            f = ws.recv_data(max(0.05, deadline - time.monotonic()))
            if f.opcode == 0x8:
                assert f.close_code == expect, (f.close_code, messages)
                return
            assert f.opcode == 0x1, f  # tether answers in text only
            reply = orjson.loads(f.payload)
            assert isinstance(reply, dict) and isinstance(reply.get("type"), str), reply
            if reply == {"type": "error", "error": ""}:
                pytest.fail("an error reply says nothing")
            if reply.get("type") == "pong" and reply.get("id") == "end":
                assert expect is None
                return
    finally:
        ws.close()


@FUZZ
@given(topics=st.none() | st.text(max_size=300), since=st.none() | st.text(max_size=300)
       | st.lists(st.tuples(topic_names, st.integers(-5, 2**70)), max_size=5).map(
           lambda pairs: ",".join(f"{t}:{n}" for t, n in pairs)))
def test_fuzz_query_strings(rig: Rig, topics: str | None, since: str | None) -> None:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in (("topics", topics), ("since", since))
                     if v is not None)
    ws = RawWS("127.0.0.1", rig.port, path=f"/ws?{query}" if query else "/ws")
    try:
        assert ws.status in (101, 400), ws.status
        if ws.status == 101:
            assert orjson.loads(ws.recv_data().payload)["type"] == "connected"
            ws.send_text('{"type":"ping","id":"q"}')
            while True:
                reply = orjson.loads(ws.recv_data().payload)
                assert reply["type"] in ("pong", "resync", "tick", "marker") or "seq" in reply \
                    or (reply["type"] == "error" and reply["error"].startswith("since: ")), reply
                if reply.get("id") == "q":
                    break
    finally:
        ws.close()


events = st.fixed_dictionaries(
    {},
    optional={"type": json_values | st.text(max_size=20), "topic": anything,
              "priority": st.sampled_from(["high", "normal", "low", "urgent", ""]) | json_values,
              "payload": json_values, "seq": json_values},
)


@FUZZ
@given(body=st.one_of(
    events.map(lambda e: json.dumps(e).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(MAX_MESSAGE - 50, MAX_MESSAGE + 50).map(
        lambda n: b'{"type":"big","payload":"' + b"p" * n + b'"}'),
))
def test_fuzz_post_event_bodies(rig: Rig, body: bytes) -> None:
    status, reply, _ = rig.http.post_event(body)
    assert status in (202, 400, 413), (status, reply)
    if status == 202:
        rig.published.saw(reply)
        assert reply["accepted"] is True and reply["seq"] >= 1
    else:
        assert reply["error"] and reply["status"] == status
