"""The dashboard and tether.js in a real Chromium against real server processes.

SPEC §4 (browser liveness), §7 (resume), §9 (dashboard, tether.js).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.support import OUTPUT, ServerProcess, publish, wait_until

pytestmark = pytest.mark.browser


def health(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as res:
        body: dict[str, Any] = json.loads(res.read())
        return body


def open_dashboard(page: Page, server: ServerProcess, query: str = "") -> str:
    """Load the dashboard and wait until it is connected; returns its session id."""
    page.goto(f"{server.url}/{query}")
    wait_connected(page)
    session = page.evaluate("window.tether.sessionId")
    assert isinstance(session, str) and len(session) == 36
    return session


def wait_connected(page: Page, other_than: str | None = None, timeout: float = 5.0) -> str:
    page.wait_for_function(
        "(old) => window.tether && window.tether.state === 'connected'"
        " && window.tether.sessionId && window.tether.sessionId !== old",
        arg=other_than,
        timeout=timeout * 1000,
    )
    session: str = page.evaluate("window.tether.sessionId")
    return session


def feed_seqs(page: Page, topic: str) -> list[int]:
    seqs: list[str] = page.eval_on_selector_all(
        f'#feed tr.event[data-topic="{topic}"]', "rows => rows.map(r => r.dataset.seq)"
    )
    return sorted(int(s) for s in seqs)


def test_dashboard_connects_shows_events_rtt_and_counters(
    page: Page, server: ServerProcess
) -> None:
    session = open_dashboard(page, server, "?pingInterval=300&poll=300")
    assert page.inner_text("#state") == "connected"
    assert page.get_attribute("#conn-state", "data-state") == "connected"
    assert page.inner_text("#ws-url") == f"ws://127.0.0.1:{server.port}/ws"

    # The server pings with protocol pings; Chromium answers them by itself.
    def browser_pongs() -> list[dict[str, Any]]:
        return [
            line for line in server.find("Received pong")
            if line["data"].get("sessionId") == session
            and isinstance(line["data"].get("rttMs"), (int, float))
        ]

    assert wait_until(lambda: len(browser_pongs()) >= 3, timeout=5), server.text()[-3000:]
    assert all(0 <= p["data"]["rttMs"] < 1000 for p in browser_pongs())

    # The liveness ping's round trip is the RTT shown, as a number and a chart.
    page.wait_for_function(
        "Number(document.getElementById('rtt').dataset.value) >= 0", timeout=3000
    )
    rtt = float(page.inner_text("#rtt"))
    assert 0 <= rtt < 1000
    assert page.get_attribute("#rtt-line", "d", timeout=1000).startswith("M")

    # Published events appear in the feed with their topic and seq.
    accepted = publish(server.url, {"type": "order.created", "topic": "demo",
                                    "payload": {"id": 42}})
    assert accepted["seq"] == 1
    row = page.locator('#feed tr[data-topic="demo"][data-seq="1"]')
    row.wait_for(timeout=3000)
    assert "order.created" in row.inner_text() and '"id":42' in row.inner_text()
    publish(server.url, {"type": "broadcast"})
    page.locator('#feed tr[data-topic="*"][data-seq="1"]').wait_for(timeout=3000)

    # The copy-paste curl command publishes to this server, as shown.
    curl = page.inner_text("#curl")
    assert f"http://127.0.0.1:{server.port}/event" in curl
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and '"seq":2' in done.stdout.replace(" ", ""), done
    page.locator('#feed tr[data-topic="demo"][data-seq="2"]').wait_for(timeout=3000)

    # The publish form works too.
    page.fill('#publish-form input[name="type"]', "from.form")
    page.click('#publish-form button[type="submit"]')
    page.locator('#feed tr[data-topic="demo"][data-seq="3"]').wait_for(timeout=3000)
    assert "accepted: demo #3" in page.inner_text("#publish-result")
    # To a topic the page did not watch yet: it subscribes first, and shows it.
    page.fill('#publish-form input[name="topic"]', "alerts")
    page.click('#publish-form button[type="submit"]')
    page.locator('#feed tr[data-topic="alerts"][data-seq="1"]').wait_for(timeout=3000)
    page.fill('#publish-form input[name="topic"]', "demo")

    # Server counters from /health.
    page.wait_for_function(
        "document.getElementById('h-clients').textContent === '1'"
        " && Number(document.getElementById('h-pongs').textContent) > 0",
        timeout=3000,
    )
    for i in range(3):
        publish(server.url, {"type": "metric", "topic": "demo", "payload": {"cpu": 0.25 + i / 10}})
    page.locator('#feed tr[data-topic="demo"][data-seq="6"]').wait_for(timeout=3000)
    # Enough RTT samples for the chart, and the new-row highlight faded, for the screenshot.
    page.wait_for_function("parseInt(document.getElementById('rtt-count').textContent) >= 12",
                           timeout=6000)
    OUTPUT.mkdir(exist_ok=True)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)


def test_server_restart_page_reconnects_within_backoff_bound(page: Page) -> None:
    first = ServerProcess().start()
    port = first.port
    try:
        session = open_dashboard(page, first, "?maxDelay=1000")
        for _ in range(3):
            publish(first.url, {"type": "before", "topic": "demo"})
        page.locator('#feed tr[data-topic="demo"][data-seq="3"]').wait_for(timeout=3000)
    finally:
        assert first.stop() == 0
    page.wait_for_function("window.tether.state === 'reconnecting'", timeout=3000)
    time.sleep(1.5)  # refused retries meanwhile; their delays stay under the cap

    second = ServerProcess(env={"PORT": str(port)}).start()
    try:
        started = time.monotonic()
        new_session = wait_connected(page, other_than=session, timeout=5)
        elapsed = time.monotonic() - started
        # Next retry is at most maxDelay away, plus the connection itself.
        assert elapsed < 1.0 + 1.0, f"reconnected after {elapsed:.2f}s"
        assert second.find("WebSocket client connected")[-1]["data"]["sessionId"] == new_session
        states = page.evaluate("window.tetherStates")
        retries = [s for s in states if s["state"] == "reconnecting"]
        assert len(retries) >= 2
        assert all(0 <= s["delay"] <= 1000 for s in retries), retries
        assert retries[0]["attempt"] == 1

        # The new server numbers topics from 1: the page is told to resync, then
        # gets the new messages (not dropped as duplicates of the old numbering).
        page.locator("#feed tr.resync[data-topic='demo']").wait_for(timeout=3000)
        publish(second.url, {"type": "after", "topic": "demo"})
        row = page.locator('#feed tr.event[data-topic="demo"]').first
        assert wait_until(lambda: "after" in row.inner_text(), timeout=3)
        assert row.get_attribute("data-seq") == "1"
    finally:
        second.stop()


def test_half_open_server_is_detected_by_the_watchdog(page: Page) -> None:
    server = ServerProcess().start()  # heartbeat at its 30 s default: the page must notice
    try:
        session = open_dashboard(
            page, server, "?pingInterval=300&pongTimeout=700&connectTimeout=1000&maxDelay=1000"
        )
        time.sleep(0.5)  # a few answered liveness pings: no false alarm while healthy
        assert page.evaluate("window.tether.state") == "connected"
        page.evaluate(  # what the page shows, every change (a retry may start at once)
            """() => {
              window.shown = [];
              const el = document.getElementById('state');
              new MutationObserver(() => window.shown.push(el.textContent))
                .observe(el, {childList: true, characterData: true, subtree: true});
            }"""
        )
        server.signal(signal.SIGSTOP)  # the kernel keeps the TCP connection: half-open
        stopped = time.monotonic()
        page.wait_for_function("window.tether.state === 'reconnecting'", timeout=4000)
        detected = time.monotonic() - stopped
        assert detected < 0.3 + 0.7 + 1.0, f"detected after {detected:.2f}s"
        last = page.evaluate("window.tetherStates.filter(s => s.state === 'reconnecting')[0]")
        assert last["reason"] == "liveness timeout"
        assert page.evaluate("window.shown")[0] == "reconnecting (attempt 1)"
        time.sleep(1.5)  # retries meanwhile hang on the stopped server and time out
        assert page.evaluate("window.tether.state") != "connected"
        server.signal(signal.SIGCONT)
        new_session = wait_connected(page, other_than=session, timeout=6)
        assert new_session != session
        assert page.inner_text("#state") == "connected"
    finally:
        server.stop()


def test_resume_after_forced_reconnect_leaves_no_gap(page: Page, server: ServerProcess) -> None:
    open_dashboard(page, server, "?topics=orders")
    for _ in range(10):
        publish(server.url, {"type": "order", "topic": "orders"})
    page.locator('#feed tr[data-topic="orders"][data-seq="10"]').wait_for(timeout=3000)

    # A gap for sure: offline while 20 are published, then a forced reconnect.
    page.evaluate("window.tether.disconnect()")
    for _ in range(20):
        publish(server.url, {"type": "order", "topic": "orders"})
    publish(server.url, {"type": "other", "topic": "elsewhere"})
    page.evaluate("window.tether.forceReconnect()")
    page.locator('#feed tr[data-topic="orders"][data-seq="30"]').wait_for(timeout=3000)
    assert health(server)["messages"]["replayed"] >= 20

    # And forced reconnects in the middle of a live stream.
    def publish_stream() -> None:
        for _ in range(120):
            publish(server.url, {"type": "order", "topic": "orders"})
            time.sleep(0.004)

    publisher = threading.Thread(target=publish_stream)
    publisher.start()
    for _ in range(4):
        time.sleep(0.12)
        page.evaluate("window.tether.forceReconnect()")
    publisher.join()
    page.locator('#feed tr[data-topic="orders"][data-seq="150"]').wait_for(timeout=5000)
    assert feed_seqs(page, "orders") == list(range(1, 151)), "every seq exactly once"
    assert page.locator("#feed tr.gap").count() == 0
    assert feed_seqs(page, "elsewhere") == []
    assert health(server)["messages"]["resumes"] >= 5
