"""The server over real sockets on 127.0.0.1: connect, publish, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import signal
import textwrap
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.aio import eventually, post_event
from tests.conftest import LogCapture, StartTether
from tests.support import ServerProcess
from tests.wsraw import RawWS
from tether.app import Tether


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def test_connect_greets_and_logs(start_tether: StartTether, log_capture: LogCapture) -> None:
    t = await start_tether()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as ws:
            hello = await ws.receive_json()
            assert hello["type"] == "connected"
            assert len(hello["sessionId"]) == 36 and hello["timestamp"].endswith("Z")
            conns = await get_json(f"{t.url}/api/connections")
            assert conns["count"] == 1
            assert conns["connections"][0]["sessionId"] == hello["sessionId"]
            await ws.close(code=4001, message=b"bye")
        assert await eventually(lambda: bool(log_capture.find("WebSocket client disconnected")),
                                1)
    connected = log_capture.find("WebSocket client connected")
    assert connected[0]["data"]["sessionId"] == hello["sessionId"]
    gone = log_capture.find("WebSocket client disconnected")[0]
    assert gone["data"] == {"sessionId": hello["sessionId"], "code": 4001, "reason": "bye"}
    assert len(t.hub.registry) == 0


async def test_publish_reaches_every_client_exactly_once(start_tether: StartTether) -> None:
    t = await start_tether()
    async with aiohttp.ClientSession() as s:
        clients = [await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") for _ in range(20)]
        for ws in clients:
            assert (await ws.receive_json())["type"] == "connected"
        for i in range(5):
            status, reply, _ = await post_event(
                t.url, {"type": "tick", "payload": {"i": i}, "priority": "low"})
            assert status == 202 and reply == {"accepted": True, "topic": "*", "seq": i + 1}
        for ws in clients:
            got = [await ws.receive_json() for _ in range(5)]
            assert [m["payload"]["i"] for m in got] == [0, 1, 2, 3, 4]
            assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
            assert got[0] == {"type": "tick", "payload": {"i": 0}, "priority": "low",
                              "topic": "*", "seq": 1}
            with pytest.raises(asyncio.TimeoutError):
                await ws.receive_json(timeout=0.05)  # nothing twice
        for ws in clients:
            await ws.close()


async def test_python_api_publish_and_topics(start_tether: StartTether) -> None:
    t = await start_tether()
    async with aiohttp.ClientSession() as s:
        a = await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws?topics=alpha")
        b = await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws")
        await a.receive_json()
        await b.receive_json()
        m = await t.publish({"type": "x", "topic": "alpha"})
        assert (m.topic, m.seq) == ("alpha", 1)
        await t.publish({"type": "y"})
        assert (await a.receive_json())["type"] == "x"
        assert (await a.receive_json())["type"] == "y"
        assert (await b.receive_json())["type"] == "y"  # b is not on alpha: only '*'
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1,2]", 400),
        (b'{"payload": 1}', 400),
        (b'{"type": "x", "priority": "urgent"}', 400),
        (b'{"type": "x", "payload": "' + b"y" * 2000 + b'"}', 413),
    ],
)
async def test_bad_posts_are_refused_and_nothing_is_broadcast(
    start_tether: StartTether, body: bytes, status: int
) -> None:
    t = await start_tether(max_message=1024)
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as ws:
        await ws.receive_json()
        got_status, reply, _ = await post_event(t.url, body)
        assert got_status == status and reply["error"]
        assert (await post_event(t.url, {"type": "ok"})).status == 202
        assert await ws.receive_json() == {"type": "ok", "topic": "*", "seq": 1}


async def test_publish_token(start_tether: StartTether) -> None:
    t = await start_tether(publish_token="s3cret")
    assert (await post_event(t.url, {"type": "x"})).status == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert (await post_event(t.url, {"type": "x"}, headers=wrong)).status == 401
    right = {"Authorization": "Bearer s3cret"}
    status, reply, _ = await post_event(t.url, {"type": "x"}, headers=right)
    assert status == 202 and reply["seq"] == 1  # the refused ones used no seq


async def test_paused_client_gets_high_at_once_and_the_rest_in_order_after_draining(
    start_tether: StartTether,
) -> None:
    t = await start_tether(backpressure_high=32_768, backpressure_low=8_192,
                           max_buffer=64 * 1024 * 1024, heartbeat_interval_ms=0)
    slow = await asyncio.to_thread(RawWS, "127.0.0.1", t.port, "/ws?topics=alerts", rcvbuf=4096)
    assert slow.status == 101
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as fast:
        await fast.receive_json()
        filler = "x" * 8000
        sent = 0
        while not any(c["paused"] for c in t.hub.connections()):
            await t.publish({"type": "fill", "payload": filler})
            sent += 1
            await asyncio.sleep(0)
            assert sent < 5000, "never paused"
        paused_id = next(c["sessionId"] for c in t.hub.connections() if c["paused"])
        slow_conn = t.hub.registry.get(paused_id)
        assert slow_conn is not None
        held_before = slow_conn.deferrals
        # Urgent, on a topic with nothing held back: queued for the paused client at once.
        await t.publish({"type": "urgent", "topic": "alerts", "priority": "high"})
        assert slow_conn.deferrals == held_before and slow_conn.outbox.queue
        await t.publish({"type": "held-normal"})
        await t.publish({"type": "held-low", "priority": "low"})
        assert slow_conn.deferrals == held_before + 2  # held back, not lost
        assert t.hub.health()["messages"]["deferred"]["low"] == 1
        # The fast client got everything at once.
        types = [(await fast.receive_json())["type"] for _ in range(sent + 2)]
        assert types[-2:] == ["held-normal", "held-low"]
        # Drain the slow client: it reads everything; once its buffer falls below
        # WS_BACKPRESSURE_LOW what was held back comes from the history, in order.
        received: list[dict[str, Any]] = []

        def drain() -> None:
            slow.sock.settimeout(0.5)
            try:
                while True:
                    f = slow.recv()
                    if f.opcode == 1:
                        received.append(orjson.loads(f.payload))
            except (TimeoutError, OSError):
                pass

        await asyncio.to_thread(drain)
        await t.publish({"type": "after-drain"})
        await asyncio.to_thread(drain)
        broadcast = [m for m in received if m.get("topic") == "*"]
        assert [m["seq"] for m in broadcast] == list(range(1, sent + 4))  # no gap, no repeat
        assert [m["type"] for m in broadcast][-3:] == ["held-normal", "held-low", "after-drain"]
        assert [m["type"] for m in received if m.get("topic") == "alerts"] == ["urgent"]
        assert slow_conn.deferred is None and t.hub.stats.recovered >= 2
        assert slow_conn.outbox.paused is False
    slow.close()


async def test_client_past_max_buffer_is_closed_1013_others_keep_receiving(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(backpressure_high=16_384, backpressure_low=4_096,
                           max_buffer=262_144, close_timeout_ms=300, heartbeat_interval_ms=0)
    dead = await asyncio.to_thread(RawWS, "127.0.0.1", t.port, rcvbuf=4096)
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as ok:
        await ok.receive_json()
        got: list[str] = []
        expected: list[int] = []  # how many in all, once the publishing is done

        async def reading() -> None:  # `ok` reads all the time, as a healthy client does
            while not expected or len(got) < expected[0]:
                got.append((await ok.receive_json())["type"])

        reader = asyncio.create_task(reading())
        n = 0
        while not log_capture.find("Closing slow client"):
            await t.publish({"type": "big", "priority": "high", "payload": "z" * 4000})
            n += 1
            await asyncio.sleep(0)
            assert n < 2000, "slow client never closed"
        expected.append(n + 20)  # before the last 20 go out: the reader stops at the last
        for _ in range(20):
            await t.publish({"type": "more", "priority": "high"})
        await asyncio.wait_for(reader, 5)
        assert got.count("big") == n and got.count("more") == 20
        assert await eventually(lambda: bool(log_capture.find("WebSocket client disconnected")),
                                2, interval=0.02)
    gone = log_capture.find("WebSocket client disconnected")[0]["data"]
    assert gone["code"] == 1013 and gone["reason"].startswith("Too slow")
    assert t.hub.stats.slow_closed == 1
    assert len(t.hub.registry) == 0
    dead.close()


async def test_shutdown_refuses_upgrades_with_503_and_closes_clients_1001(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(close_timeout_ms=1500, heartbeat_interval_ms=0,
                           max_buffer=64 * 1024 * 1024)
    # A client that stops reading with megabytes unsent: its close cannot flush.
    stuck = await asyncio.to_thread(RawWS, "127.0.0.1", t.port, rcvbuf=4096)
    while not any(c["buffered"] > 1_000_000 for c in t.hub.connections()):
        await t.publish({"type": "fill", "priority": "high", "payload": "f" * 60_000})
        await asyncio.sleep(0)
    async with aiohttp.ClientSession() as s:
        polite = await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws")
        await polite.receive_json()
        started = time.monotonic()
        stopping = asyncio.create_task(t.stop("test"))
        msg = await polite.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (1001, "Server shutting down")
        health = await get_json(f"http://127.0.0.1:{t.port}/health")
        assert health["status"] == "shutting_down"
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(f"ws://127.0.0.1:{t.port}/ws")
        assert err.value.status == 503
        assert await stopping is True
        elapsed = time.monotonic() - started
        assert 1.4 < elapsed < 4, elapsed  # waited C for the stuck one, then aborted it
    codes = sorted(r["data"]["code"] for r in log_capture.find("WebSocket client disconnected"))
    assert codes == [1001, 1001]
    assert len(t.hub.registry) == 0
    stuck.close()


SEED_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from tether import config, loops, logs
    from tether.app import Tether
    from tether.logs import get_logger

    settings = config.load(os.environ)
    logs.setup(settings.log_level)
    poller = get_logger("tmux-poller")

    async def main() -> int:
        t = Tether(settings)
        t.on_shutdown("tmux-poller", lambda: poller.info("Stopping tmux poller"), 60)
        t.on_shutdown("late", lambda: poller.info("Late handler"), 10)
        return await t.run()

    sys.exit(loops.run(main(), settings.event_loop))  # EVENT_LOOP, as `tether serve`
    """
)


async def test_seed_verification_heartbeat_and_sigint_order() -> None:
    """SEED.md task 3's manual check, automated, against a real process."""
    server = ServerProcess(env={"WS_HEARTBEAT_INTERVAL": "200"}, script=SEED_SCRIPT).start()
    try:
        start = server.wait_for("Starting heartbeat")
        assert start["data"]["intervalMs"] == 200 and start["module"] == "heartbeat"
        ready = server.find("Server ready")[0]["data"]
        assert ready["url"].startswith("http://localhost:") and ready["ws"].endswith("/ws")
        assert ready["health"].endswith("/health")
        async with aiohttp.ClientSession() as s, s.ws_connect(server.ws_url) as ws:
            await ws.receive_json()
            server.wait_for("WebSocket client connected")
            reader = asyncio.create_task(ws.receive())  # reading lets aiohttp answer pings
            tick = await asyncio.to_thread(server.wait_for, "Heartbeat tick", 5.0)
            assert tick["data"]["pinged"] == 1 and tick["data"]["total"] == 1
            await asyncio.to_thread(server.wait_for, "Received pong", 5.0)
            reader.cancel()
        server.signal(signal.SIGINT)
        assert server.proc is not None
        assert await asyncio.to_thread(server.proc.wait, 15) == 0
    finally:
        server.stop()
    messages = [(line["module"], line["message"], line.get("data", {}).get("name"))
                for line in server.lines()]
    names = [m for m in messages if m[1] in (
        "Stopping tmux poller", "Stopping WebSocket heartbeat", "Heartbeat stopped",
        "Running shutdown handler", "Late handler", "Shutdown initiated", "Shutdown complete")]
    assert names == [
        ("shutdown", "Shutdown initiated", None),
        ("shutdown", "Running shutdown handler", "tmux-poller"),
        ("tmux-poller", "Stopping tmux poller", None),
        ("shutdown", "Running shutdown handler", "ws-heartbeat"),
        ("main", "Stopping WebSocket heartbeat", None),
        ("heartbeat", "Heartbeat stopped", None),
        ("shutdown", "Running shutdown handler", "http-server"),
        ("shutdown", "Running shutdown handler", "backplane"),
        ("shutdown", "Running shutdown handler", "late"),
        ("tmux-poller", "Late handler", None),
        ("shutdown", "Shutdown complete", None),
    ]


def test_sigterm_exits_0_and_second_signal_forces_1() -> None:
    server = ServerProcess().start()
    server.signal(signal.SIGTERM)
    assert server.proc is not None and server.proc.wait(15) == 0
    assert server.find("Shutdown complete")[0]["data"]["signal"] == "SIGTERM"
    server.stop()

    # A shutdown handler that hangs: the second SIGINT forces exit 1.
    script = SEED_SCRIPT.replace(
        'lambda: poller.info("Stopping tmux poller")', "lambda: asyncio.sleep(30)")
    stuck = ServerProcess(script=script).start()
    stuck.signal(signal.SIGINT)
    stuck.wait_for("Shutdown initiated")
    stuck.signal(signal.SIGINT)
    assert stuck.proc is not None and stuck.proc.wait(15) == 1
    assert stuck.find("Second signal, forcing exit")
    stuck.stop()


def test_shutdown_timeout_forces_exit_1() -> None:
    script = SEED_SCRIPT.replace(
        'lambda: poller.info("Stopping tmux poller")', "lambda: asyncio.sleep(30)"
    ).replace("t = Tether(settings)", "t = Tether(settings); t.lifecycle.timeout = 0.5")
    stuck = ServerProcess(script=script).start()
    stuck.signal(signal.SIGINT)
    assert stuck.proc is not None and stuck.proc.wait(15) == 1
    assert stuck.find("Shutdown timed out")
    stuck.stop()


async def test_tether_is_usable_without_cli(log_capture: LogCapture) -> None:
    from tether.config import Settings

    t = Tether(Settings(port=0, heartbeat_interval_ms=0))
    await t.start()
    assert log_capture.find("Heartbeat disabled (interval <= 0)")
    assert (await get_json(f"{t.url}/health"))["heartbeat"]["enabled"] is False
    assert await t.stop() is True


async def test_a_burst_of_large_messages_does_not_pause_a_reading_client(
    start_tether: StartTether,
) -> None:
    """Frames queued for one flush are not the client's backlog: nothing is held back."""
    t = await start_tether(heartbeat_interval_ms=0)
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{t.port}/ws") as ws:
        await ws.receive_json()
        for i in range(5):  # one loop pass: all five sit in the queue together
            await t.publish({"type": "big", "payload": {"i": i, "pad": "p" * 60_000}})
        got = [(await ws.receive_json(timeout=5))["payload"]["i"] for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]
        assert t.hub.health()["messages"]["deferred"] == {"high": 0, "normal": 0, "low": 0}
