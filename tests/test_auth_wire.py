"""Tokens over real sockets (issue 14): who may read what, expiry, refresh, operator views.

A real tether on 127.0.0.1 (in this process, or two processes on one Redis for
the multi-node case) and aiohttp's client, which shows every text message and
the close code the server sent.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import LogCapture, StartTether
from tests.redis_server import running_redis
from tests.support import ServerProcess
from tether.app import Tether
from tether.auth import issue_token
from tether.client import Client, State, StateChange
from tether.watch import watch

SECRET = "wire-secret-" + "w" * 40
OTHER = "another-secret-" + "o" * 40
ADMIN = "admin-token-for-tests"
Messages = list[dict[str, Any]]


def token(sub: str = "alice", ttl: float = 60, **kw: Any) -> str:
    return issue_token(SECRET, sub=sub, ttl=ttl, **kw)


def exact_token(exp: float, topics: list[str], sub: str = "alice") -> str:
    """A token whose exp is `exp` to the millisecond (issue_token rounds to whole seconds)."""
    return issue_token(SECRET, sub=sub, topics=topics, claims={"exp": round(exp, 3)})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def auth_server(start_tether: StartTether, **settings: Any) -> Tether:
    fields = {"auth_secret": SECRET, "heartbeat_interval_ms": 0, "history_size": 5, **settings}
    return await start_tether(**fields)


def ws_url(t: Tether, query: str = "") -> str:
    return f"ws://127.0.0.1:{t.port}/ws{'?' + query if query else ''}"


async def read_until_closed(ws: aiohttp.ClientWebSocketResponse,
                            timeout: float = 5.0) -> tuple[Messages, int | None, float]:
    """Every text message until the server closes; its close code and when it came."""
    got: Messages = []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                got.append(json.loads(msg.data))
    return got, ws.close_code, time.time()


async def read_for(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> Messages:
    """The text messages that arrive within `seconds` (the connection must stay open)."""
    got: Messages = []
    deadline = asyncio.get_running_loop().time() + seconds
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            break
        assert msg.type is aiohttp.WSMsgType.TEXT, f"closed: {msg}"
        got.append(json.loads(msg.data))
    return got


async def until(ws: aiohttp.ClientWebSocketResponse, predicate: Callable[[dict[str, Any]], bool],
                got: Messages, timeout: float = 5.0) -> dict[str, Any]:
    """Read into `got` until a message matches; that message."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, f"closed: {msg}"
            got.append(json.loads(msg.data))
            if predicate(got[-1]):
                return got[-1]


async def publish(t: Tether, topic: str, n: int = 1) -> None:
    for _ in range(n):
        await t.publish({"type": "note", "topic": topic})


def of(got: Messages, topic: str) -> Messages:
    """Messages and resync notices of `topic` (errors naming it are not)."""
    return [m for m in got if m.get("topic") == topic and m["type"] in ("note", "resync")]


# ---------------------------------------------------------------- no token, bad token


async def test_no_token_is_closed_forbidden_with_not_one_message(
    start_tether: StartTether, session: aiohttp.ClientSession, log_capture: LogCapture
) -> None:
    t = await auth_server(start_tether, handshake_timeout_ms=300)
    silent = await session.ws_connect(ws_url(t, "topics=orders"))
    eager = await session.ws_connect(ws_url(t, "topics=orders"))
    await eager.send_json({"type": "subscribe", "topics": ["orders"]})  # not auth: closed
    for _ in range(3):
        await publish(t, "orders")
        await publish(t, "*")
    got, code, _ = await read_until_closed(eager)
    assert (got, code) == ([], 4003)
    started = time.monotonic()
    got, code, _ = await read_until_closed(silent)
    assert (got, code) == ([], 4003)
    assert time.monotonic() - started < 0.3 + 0.2  # closed at the auth deadline
    bad = await session.ws_connect(ws_url(t, "topics=orders&token=x.y.z"))
    got, code, _ = await read_until_closed(bad)
    assert (got, code) == ([], 4003)
    forged = issue_token(OTHER, sub="mallory", topics=["**"])
    bad = await session.ws_connect(ws_url(t))
    await bad.send_json({"type": "auth", "token": forged})
    got, code, _ = await read_until_closed(bad)
    assert (got, code) == ([], 4003)
    assert bad.close_code == 4003
    refusals = log_capture.find("Token refused")
    assert len(refusals) == 4 and all(r["level"] == "warn" for r in refusals)
    assert "Signature verification failed" in refusals[-1]["data"]["reason"]


# ---------------------------------------------------------------- a token for orders


@pytest.mark.parametrize("how", ["url", "message"])
async def test_a_token_for_orders_never_reads_secrets_through_any_route(
    start_tether: StartTether, session: aiohttp.ClientSession, how: str
) -> None:
    t = await auth_server(start_tether)
    await publish(t, "secrets", 8)  # past HISTORY_SIZE (5): a resume from 0 would resync
    await publish(t, "orders", 3)
    await publish(t, "*", 2)
    grant = token(topics=["orders"])
    query = "topics=orders,secrets&since=orders:0,secrets:0"
    ws = await session.ws_connect(ws_url(t, f"{query}&token={grant}" if how == "url" else query))
    if how == "message":
        await ws.send_json({"type": "auth", "token": grant})
    got: Messages = []
    await until(ws, lambda m: m.get("topic") == "orders" and m.get("seq") == 3, got)
    assert [m["type"] for m in got[:2]] == ["connected", "authenticated"]
    await ws.send_json({"type": "subscribe", "topics": ["secrets", "*"]})
    await ws.send_json({"type": "resume", "since": {"secrets": 2, "*": 0}})
    await until(ws, lambda m: m["type"] == "subscribed", got)
    await publish(t, "secrets")
    await publish(t, "*")
    await publish(t, "orders")
    await until(ws, lambda m: m.get("topic") == "orders" and m.get("seq") == 4, got)
    got += await read_for(ws, 0.2)
    assert [m["seq"] for m in of(got, "orders")] == [1, 2, 3, 4]
    assert of(got, "secrets") == [] and of(got, "*") == []
    refused = [m["topic"] for m in got if m["type"] == "error"]
    # ?topics=, ?since=, subscribe (secrets and *), resume (secrets and *)
    assert refused == ["secrets", "secrets", "secrets", "*", "secrets", "*"]
    subscribed = next(m for m in got if m["type"] == "subscribed")
    assert subscribed["topics"] == ["orders"]
    await ws.close()


# ---------------------------------------------------------------- expiry and refresh


@pytest.mark.parametrize("how", ["url", "message"])
async def test_expiry_closes_within_100_ms_of_exp(
    start_tether: StartTether, session: aiohttp.ClientSession, how: str
) -> None:
    t = await auth_server(start_tether)
    exp = time.time() + 0.8
    grant = exact_token(exp, ["orders"])
    ws = await session.ws_connect(ws_url(t, f"token={grant}" if how == "url" else ""))
    if how == "message":
        await ws.send_json({"type": "auth", "token": grant})
    got, code, closed_at = await read_until_closed(ws)
    assert code == 4001 and ws.close_code == 4001
    assert [m["type"] for m in got] == ["connected", "authenticated"]
    assert abs(closed_at - exp) < 0.1, f"closed {closed_at - exp:+.3f} s from exp"


async def test_a_refresh_before_exp_keeps_the_connection_and_narrows_it(
    start_tether: StartTether, session: aiohttp.ClientSession
) -> None:
    t = await auth_server(start_tether)
    first = exact_token(time.time() + 0.6, ["a", "b", "*"])
    ws = await session.ws_connect(ws_url(t, f"topics=a,b&token={first}"))
    got: Messages = []
    hello = await until(ws, lambda m: m["type"] == "authenticated", got)
    assert 0.4 < hello["expiresIn"] <= 0.6
    await ws.send_json({"type": "auth", "token": token(ttl=30, topics=["a"])})
    gone = await until(ws, lambda m: m["type"] == "unsubscribed", got)
    assert gone["topics"] == ["b", "*"]
    again = await until(ws, lambda m: m["type"] == "authenticated", got)
    assert again["topics"] == ["a"] and again["expiresIn"] > 25
    await asyncio.sleep(0.7)  # past the first token's exp
    for topic in ("b", "*", "a"):
        await publish(t, topic)
    got = await read_for(ws, 0.3)
    assert [(m["topic"], m["seq"]) for m in got] == [("a", 1)]
    assert not ws.closed


async def test_public_topics_are_readable_with_no_token(
    start_tether: StartTether, session: aiohttp.ClientSession
) -> None:
    t = await auth_server(start_tether, public_topics=("news", "*"))
    ws = await session.ws_connect(ws_url(t, "topics=news,orders"))
    got: Messages = []
    await until(ws, lambda m: m["type"] == "error", got)
    assert [m["type"] for m in got] == ["connected", "error"] and got[1]["topic"] == "orders"
    for topic in ("orders", "news", "*"):
        await publish(t, topic)
    got = await read_for(ws, 0.3)
    assert [m["topic"] for m in got] == ["news", "*"]


# ---------------------------------------------------------------- operator views


async def get(session: aiohttp.ClientSession, url: str,
              bearer: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    async with session.get(url, headers=headers) as r:
        return r.status, await r.text()


async def test_operator_views_need_admin_token_and_health_says_little_without_it(
    start_tether: StartTether, session: aiohttp.ClientSession
) -> None:
    t = await auth_server(start_tether, admin_token=ADMIN)
    base = f"http://127.0.0.1:{t.port}"
    ws = await session.ws_connect(ws_url(t, f"token={token(topics=['orders'])}"))
    await ws.receive_json(timeout=5)
    for path in ("/api/connections", "/metrics"):
        for bearer in (None, "wrong", SECRET, token(topics=["**"])):
            status, _ = await get(session, base + path, bearer)
            assert status == 401, (path, bearer)
        status, body = await get(session, base + path, ADMIN)
        assert status == 200, path
    _, body = await get(session, base + "/api/connections", ADMIN)
    view = json.loads(body)["connections"][0]
    assert view["sub"] == "alice" and view["access"] == "token" and view["topics"] == []
    status, body = await get(session, base + "/health")
    health = json.loads(body)
    assert status == 200 and set(health) == {"status", "uptime", "clients"}
    assert health["clients"] == 1 and health["status"] == "ok"
    assert view["sessionId"] not in body and "127.0.0.1" not in body
    _, body = await get(session, base + "/health", ADMIN)
    assert json.loads(body)["auth"]["enabled"] is True and "heartbeat" in json.loads(body)


async def test_with_auth_on_and_no_admin_token_the_views_are_closed(
    start_tether: StartTether, session: aiohttp.ClientSession
) -> None:
    t = await auth_server(start_tether)
    base = f"http://127.0.0.1:{t.port}"
    for path in ("/api/connections", "/metrics"):
        assert (await get(session, base + path))[0] == 403
        assert (await get(session, base + path, SECRET))[0] == 403
    assert set(json.loads((await get(session, base + "/health"))[1])) == {
        "status", "uptime", "clients"}
    open_ = await start_tether()  # no auth, no ADMIN_TOKEN: open as before
    assert (await get(session, f"http://127.0.0.1:{open_.port}/api/connections"))[0] == 200


# ---------------------------------------------------------------- publishing with a token


async def post(session: aiohttp.ClientSession, t: Tether, event: dict[str, Any],
               bearer: str | None) -> int:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    async with session.post(f"http://127.0.0.1:{t.port}/event", json=event,
                            headers=headers) as r:
        return r.status


async def test_a_token_publishes_to_what_its_publish_claim_grants(
    start_tether: StartTether, session: aiohttp.ClientSession
) -> None:
    t = await auth_server(start_tether, publish_token="operator-key")
    writer = token(topics=[], publish=["orders", "user.42.*"])
    reader = token(topics=["**"])
    assert await post(session, t, {"type": "x", "topic": "orders"}, writer) == 202
    assert await post(session, t, {"type": "x", "topic": "user.42.cart"}, writer) == 202
    assert await post(session, t, {"type": "x", "topic": "secrets"}, writer) == 403
    assert await post(session, t, {"type": "x"}, writer) == 403  # the broadcast topic
    assert await post(session, t, {"type": "x", "topic": "orders"}, reader) == 403
    assert await post(session, t, {"type": "x", "topic": "orders"}, None) == 401
    expired = issue_token(SECRET, sub="a", publish=["orders"], ttl=1, now=time.time() - 5)
    assert await post(session, t, {"type": "x", "topic": "orders"}, expired) == 401
    forged = issue_token(OTHER, sub="a", publish=["**"])
    assert await post(session, t, {"type": "x", "topic": "orders"}, forged) == 401
    assert await post(session, t, {"type": "x", "topic": "secrets"}, "operator-key") == 202
    assert await post(session, t, {"type": "x"}, "operator-key") == 202


# ---------------------------------------------------------------- the Python client and watch


async def test_the_python_client_refreshes_with_a_token_function(
    start_tether: StartTether,
) -> None:
    t = await auth_server(start_tether)
    minted: list[float] = []

    async def fresh() -> str:
        minted.append(time.time())
        return exact_token(time.time() + 1.0, ["orders"])

    errors: Messages = []
    client = Client(f"http://127.0.0.1:{t.port}", topics=["orders", "secrets"], token=fresh,
                    on_control=lambda m: errors.append(m) if m["type"] == "error" else None)
    async with client:
        session_id = await client.wait_connected(5)
        for _ in range(5):
            await publish(t, "orders")
            await publish(t, "secrets")
            await asyncio.sleep(0.4)  # 2 s: past two of the tokens' expiries
        got = []
        async with asyncio.timeout(5):
            async for msg in client:
                got.append(msg)
                if msg["seq"] == 5:
                    break
        assert [(m["topic"], m["seq"]) for m in got] == [("orders", i) for i in range(1, 6)]
        assert client.session_id == session_id and client.reconnects == 0
        assert len(minted) >= 3 and t.hub.stats.token_refreshes >= 2
        assert [e["topic"] for e in errors] == ["secrets"]
        assert client.sub == "alice"
        # A new connection: a new token, then the resume of what it missed meanwhile.
        await client.reconnect()
        await publish(t, "orders", 3)
        async with asyncio.timeout(5):
            async for msg in client:
                got.append(msg)
                if msg["seq"] == 8:
                    break
        assert [m["seq"] for m in got] == list(range(1, 9))
        assert client.reconnects == 1 and client.session_id != session_id


async def test_a_refused_token_ends_the_client_and_watch_unauthorized(
    start_tether: StartTether,
) -> None:
    t = await auth_server(start_tether)
    states: list[StateChange] = []
    ended = asyncio.Event()

    def on_state(change: StateChange) -> None:
        states.append(change)
        if change.state is State.UNAUTHORIZED:
            ended.set()

    client = Client(f"http://127.0.0.1:{t.port}", token=issue_token(OTHER, sub="a"),
                    on_state=on_state, backoff_base=0.05)
    await client.start()
    await asyncio.wait_for(ended.wait(), 5)
    await client.close()
    assert [s.state for s in states] == [State.CONNECTING, State.UNAUTHORIZED]
    assert t.hub.stats.connections_total == 1  # it did not try again
    out = io.StringIO()
    status = await watch(f"http://127.0.0.1:{t.port}", token="x.y.z", out=out)
    assert status == 1 and "unauthorized: closed by server: 4003 Forbidden" in out.getvalue()


# ---------------------------------------------------------------- several nodes


@pytest.mark.redis
async def test_a_client_resumes_on_another_node_with_its_token(
    session: aiohttp.ClientSession,
) -> None:
    with running_redis() as redis:
        env = {"REDIS_URL": redis.url, "AUTH_SECRET": SECRET, "WS_HEARTBEAT_INTERVAL": "0",
               "PUBLISH_TOKEN": "operator-key"}
        a, b = ServerProcess(env=env).start(), ServerProcess(env=env).start()
        try:
            grant = token(topics=["orders"])
            ws = await session.ws_connect(f"{a.ws_url}?topics=orders,secrets")
            await ws.send_json({"type": "auth", "token": grant})
            got: Messages = []
            await until(ws, lambda m: m["type"] == "error", got)
            for topic in ("orders", "secrets", "orders"):
                await post_to(session, a, topic)
            await until(ws, lambda m: m.get("seq") == 2 and m.get("topic") == "orders", got)
            await ws.close()
            for topic in ("orders", "secrets", "orders"):  # missed, published on node a
                await post_to(session, a, topic)
            ws = await session.ws_connect(f"{b.ws_url}?since=orders:2,secrets:0")
            await ws.send_json({"type": "auth", "token": grant})
            got = []
            await until(ws, lambda m: m.get("seq") == 4 and m.get("topic") == "orders", got)
            got += await read_for(ws, 0.2)
            assert [m["seq"] for m in of(got, "orders")] == [3, 4]
            assert of(got, "secrets") == [] and [m.get("topic") for m in got if
                                                 m["type"] == "error"] == ["secrets"]
            await ws.close()
            forged = issue_token(OTHER, sub="a", topics=["orders"])
            ws = await session.ws_connect(f"{b.ws_url}?since=orders:0&token={forged}")
            got, code, _ = await read_until_closed(ws)
            assert (got, code) == ([], 4003)
        finally:
            a.stop()
            b.stop()


async def post_to(session: aiohttp.ClientSession, node: ServerProcess, topic: str) -> int:
    async with session.post(f"{node.url}/event", json={"type": "note", "topic": topic},
                            headers={"Authorization": "Bearer operator-key"}) as r:
        assert r.status == 202, await r.text()
        seq: int = (await r.json())["seq"]
        return seq
