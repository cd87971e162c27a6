"""tether.js and the dashboard with tokens, in a real Chromium against a real server (issue 14).

The page's getToken() asks the test for a token (Playwright's exposed function,
as a page would ask its backend), so the test decides what each token grants and
when it expires. Its calls are answered only while the test waits inside
Playwright (`wait_for_*`), never during a `time.sleep`.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page

from tests.support import ServerProcess, wait_until
from tether.auth import issue_token

pytestmark = pytest.mark.browser

SECRET = "browser-secret-" + "b" * 40
OPERATOR = "operator-key"


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    server = ServerProcess(env={"AUTH_SECRET": SECRET, "PUBLISH_TOKEN": OPERATOR,
                                "WS_HEARTBEAT_INTERVAL": "500"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def post(server: ServerProcess, topic: str) -> int:
    req = urllib.request.Request(
        f"{server.url}/event", data=json.dumps({"type": "note", "topic": topic}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {OPERATOR}"},
        method="POST")
    with urllib.request.urlopen(req, timeout=5) as res:
        seq: int = json.loads(res.read())["seq"]
        return seq


def load_client(page: Page, server: ServerProcess, options: str) -> None:
    """A page of the server's origin running a TetherClient (window.client), recording it."""
    page.goto(f"{server.url}/health")
    page.evaluate(
        """async (options) => {
          const { TetherClient } = await import("/tether.js");
          window.seen = []; window.states = []; window.errors = [];
          const client = new TetherClient({
            ...options,
            getToken: () => window.mintToken(),
          });
          client.on("message", (m) => window.seen.push(m.seq));
          client.on("state", (s) => window.states.push({ state: s.state, code: s.code ?? null }));
          client.on("error", (e) => window.errors.push(e));
          window.client = client;
          client.connect();
        }""",
        json.loads(options),
    )


def test_get_token_refreshes_across_expiries_without_losing_a_message(
    page: Page, server: ServerProcess
) -> None:
    minted: list[float] = []

    def mint() -> str:
        minted.append(time.time())
        # 1.2 s tokens: refreshed after ~1 s, so four of them pass in this test.
        return issue_token(SECRET, sub="alice", topics=["orders"],
                           claims={"exp": round(time.time() + 1.2, 3)})

    page.expose_function("mintToken", mint)
    load_client(page, server, '{"topics": ["orders"], "pingInterval": 400, "pongTimeout": 1000}')
    page.wait_for_function("window.client.state === 'connected'", timeout=5000)
    session = page.evaluate("window.client.sessionId")

    def publish() -> None:
        for _ in range(60):
            post(server, "orders")
            time.sleep(0.06)

    publisher = threading.Thread(target=publish)
    publisher.start()
    # Waiting in Playwright, not in join(): the page's getToken() calls reach mint()
    # only while the sync API is dispatching.
    page.wait_for_function("window.seen.length >= 60", timeout=10_000)
    publisher.join()
    assert page.evaluate("window.seen") == list(range(1, 61)), "every message once, in order"
    assert page.evaluate("window.client.sessionId") == session, "one connection throughout"
    assert page.evaluate("window.client.reconnects") == 0
    assert [s["state"] for s in page.evaluate("window.states")] == ["connecting", "connected"]
    assert len(minted) >= 4, minted
    assert len(server.find("Token refreshed")) >= 3
    assert server.find("Token expired") == [] and server.find("Token refused") == []


def test_a_refused_token_shows_unauthorized_and_stops_retrying(
    page: Page, server: ServerProcess
) -> None:
    page.expose_function("mintToken", lambda: issue_token("x" * 40, sub="mallory", topics=["**"]))
    load_client(page, server, '{"topics": ["orders"], "baseDelay": 100, "maxDelay": 200}')
    page.wait_for_function("window.client.state === 'unauthorized'", timeout=5000)
    states = page.evaluate("window.states")
    assert states == [{"state": "connecting", "code": None},
                      {"state": "unauthorized", "code": 4003}]
    page.wait_for_timeout(1000)  # several backoff delays: it does not come back
    assert page.evaluate("window.client.state") == "unauthorized"
    refused = server.find("Token refused")
    assert len(refused) == 1 and "Signature verification failed" in refused[0]["data"]["reason"]


def test_the_dashboard_takes_a_token_and_says_what_was_refused(
    page: Page, server: ServerProcess
) -> None:
    token = issue_token(SECRET, sub="alice", topics=["demo", "*"],
                        claims={"exp": round(time.time() + 3.0, 3)})
    page.context.add_init_script(f"sessionStorage.setItem('tether.token', {json.dumps(token)})")
    page.goto(f"{server.url}/?topics=demo,secrets&poll=300")
    page.wait_for_function("window.tether.state === 'connected'", timeout=5000)
    assert page.inner_text("#auth-sub") == "alice"
    notice = page.locator("#auth-notice")
    notice.wait_for(state="visible", timeout=3000)
    assert "“secrets” refused" in notice.inner_text()
    post(server, "demo")
    page.locator('#feed tr[data-topic="demo"][data-seq="1"]').wait_for(timeout=3000)
    post(server, "secrets")
    # Without ADMIN_TOKEN the server's details are closed; the dashboard says so.
    assert wait_until(lambda: "ADMIN_TOKEN" in page.inner_text("#health-status"), timeout=3)
    # At exp the server closes (4001): the page says so and waits for a fresh token.
    page.wait_for_function("window.tether.state === 'unauthorized'", timeout=5000)
    assert "Token expired" in notice.inner_text()
    assert page.inner_text("#state") == "unauthorized"
    assert page.locator('#feed tr[data-topic="secrets"]').count() == 0
    fresh = issue_token(SECRET, sub="alice", topics=["demo"], ttl=60)
    page.fill("#token", fresh)
    page.click("#btn-token")
    page.wait_for_function("window.tether.state === 'connected'", timeout=5000)
    assert page.evaluate("sessionStorage.getItem('tether.token')") == fresh
    # The expiry is gone from the notice; the new token still refuses `secrets`.
    assert wait_until(lambda: "secrets" in notice.inner_text(), timeout=3)
    assert "expired" not in notice.inner_text()
