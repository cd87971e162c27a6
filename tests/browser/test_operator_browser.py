"""The dashboard's operator view in a real Chromium against real server processes (issue 16).

The clients table and its sorting, the RTT histogram and the disconnects chart
(from `/api/connections` and `/health`), the operator token, the server counters
greyed while the server is down, high-priority events marked, and the "all
topics" feed with its topic filter. Other clients are a separate process
(`tests/peers.py`), so that they are real WebSocket clients, not the page.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.redis_server import running_redis
from tests.support import ROOT, ServerProcess, publish, wait_until

pytestmark = pytest.mark.browser

ADMIN = "operator-secret"


class Peers:
    """`python -m tests.peers URL N`: N clients that read and answer pings, in their own process."""

    def __init__(self, server: ServerProcess, n: int, query: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.peers", f"{server.ws_url}{query}", str(n)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.sessions: list[str] = []
        for line in self.proc.stdout:
            if line.strip() == "READY":
                break
            self.sessions.append(json.loads(line)["sessionId"])
        assert len(self.sessions) == n, f"{len(self.sessions)} of {n} peers connected"

    def kill(self) -> None:
        """SIGKILL: the kernel closes their sockets with no close frame (1006)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def peers() -> Iterator[list[Peers]]:
    started: list[Peers] = []
    yield started
    for p in started:
        p.kill()


def open_dashboard(page: Page, server: ServerProcess, query: str = "?poll=300") -> str:
    page.goto(f"{server.url}/{query}")
    page.wait_for_function("window.tether && window.tether.state === 'connected'", timeout=5000)
    session: str = page.evaluate("window.tether.sessionId")
    return session


def table_rows(page: Page) -> int:
    count: int = page.eval_on_selector_all("#clients tr", "rows => rows.length")
    return count


def wait_rows(page: Page, n: int, timeout: float = 3.0) -> None:
    page.wait_for_function(f"document.querySelectorAll('#clients tr').length === {n}",
                           timeout=timeout * 1000)


def style(page: Page, selector: str, prop: str) -> str:
    """A computed style of the first element `selector` finds."""
    value: str = page.eval_on_selector(selector, f"e => getComputedStyle(e).{prop}")
    return value


def column(page: Page, key: str) -> list[str]:
    """A column of the clients table, top to bottom (for `session`: the full ids)."""
    index: int = page.eval_on_selector_all(
        "#clients-head th", f"ths => ths.findIndex(th => th.dataset.key === {json.dumps(key)})")
    assert index >= 0, key
    if key == "session":
        ids: list[str] = page.eval_on_selector_all(
            "#clients tr", "rows => rows.map(r => r.dataset.session)")
        return ids
    cells: list[str] = page.eval_on_selector_all(
        "#clients tr", f"rows => rows.map(r => r.cells[{index}].textContent)")
    return cells


def sort_by(page: Page, key: str) -> str:
    """Click a heading; returns its aria-sort once the table is drawn that way."""
    page.click(f'#clients-head th[data-key="{key}"] button')
    state: str = page.get_attribute(f'#clients-head th[data-key="{key}"]', "aria-sort") or ""
    return state


def test_clients_table_lists_every_client_sorts_and_charts_them(
    page: Page, server: ServerProcess, peers: list[Peers]
) -> None:
    alpha = Peers(server, 12, "?topics=alpha")
    peers.append(alpha)
    beta = Peers(server, 6, "?topics=beta,gamma")
    peers.append(beta)
    me = open_dashboard(page, server, "?poll=300&follow=0")

    wait_rows(page, 19, timeout=5)
    assert sorted(column(page, "session")) == sorted([*alpha.sessions, *beta.sessions, me])
    assert page.text_content("#clients-count") == "19"
    assert page.locator("#clients-notice").is_hidden()
    # Its own row is marked; the others read what they asked for.
    assert page.get_attribute(f'#clients tr[data-session="{me}"]', "class") == "self"
    assert style(page, '#clients-head th[data-key="worker"]', "display") == "none"  # one process
    topics = column(page, "topics")
    assert topics.count("alpha") == 12 and topics.count("beta, gamma") == 6

    # Every client answers the 200 ms heartbeat: each has an RTT, in the histogram too.
    page.wait_for_function(
        "[...document.querySelectorAll('#rtt-hist .col')]"
        ".reduce((n, c) => n + Number(c.dataset.count), 0) === 19", timeout=5000)
    assert "19 clients" in page.inner_text("#dist-summary")

    # Sorting: by any heading, both ways, and it stays sorted across refreshes.
    assert sort_by(page, "session") == "ascending"
    ids = column(page, "session")
    assert ids == sorted(ids) and len(ids) == 19
    assert sort_by(page, "session") == "descending"
    assert column(page, "session") == sorted(ids, reverse=True)
    assert sort_by(page, "topics") == "ascending"
    topics = column(page, "topics")
    assert topics == sorted(topics) and topics[0] == "alpha" and topics[-1] == "demo"
    assert sort_by(page, "rtt") == "descending"
    page.wait_for_timeout(700)  # two refreshes
    rtts = [float(v) for v in column(page, "rtt")]
    assert rtts == sorted(rtts, reverse=True)
    # A filter narrows the rows (by topic here) without losing the sort.
    page.fill("#clients-filter", "gamma")
    assert wait_until(lambda: table_rows(page) == 6, timeout=3)
    assert page.text_content("#clients-count") == "6 of 19"
    page.fill("#clients-filter", "")
    assert wait_until(lambda: table_rows(page) == 19, timeout=3)

    # The 12 alpha clients drop (no close frame): gone from the table, and counted
    # as 1006 in the disconnects chart, whose bars come from /health's counters.
    alpha.kill()
    wait_rows(page, 7, timeout=5)
    recent = page.locator('#drops-legend [data-code="1006"] .recent')
    recent.wait_for(timeout=10_000)
    assert wait_until(lambda: recent.inner_text() == "12", timeout=3), recent.inner_text()
    bars: int = page.eval_on_selector_all(
        "#drops-chart .n", "ns => ns.reduce((s, n) => s + Number(n.textContent || 0), 0)")
    assert bars == 12


def test_operator_token_opens_the_views_and_a_refusal_is_said_plainly(page: Page) -> None:
    with ServerProcess(env={"ADMIN_TOKEN": ADMIN}) as server:
        open_dashboard(page, server)
        notice = page.locator("#clients-notice")
        notice.wait_for(state="visible", timeout=10_000)
        assert "401 Unauthorized" in notice.inner_text()
        assert "needs the operator token" in notice.inner_text()
        assert table_rows(page) == 0
        assert "ADMIN_TOKEN" in page.inner_text("#drops-help")

        page.fill("#admin-token", "wrong")
        page.click("#btn-admin")
        assert wait_until(lambda: "token was refused" in notice.inner_text(), timeout=3)

        page.fill("#admin-token", ADMIN)
        page.click("#btn-admin")
        wait_rows(page, 1)
        assert notice.is_hidden()
        assert page.evaluate("sessionStorage.getItem('tether.admin')") == ADMIN
        # The full /health too: its counters and the disconnects legend.
        page.wait_for_function("document.getElementById('h-pinged').textContent !== '–'",
                               timeout=10_000)
        assert "No disconnects yet" in page.inner_text("#drops-legend")
        # Kept for this tab: a reload still shows the table.
        page.reload()
        wait_rows(page, 1, timeout=5)


def test_server_counters_grey_out_while_the_server_is_unreachable(page: Page) -> None:
    first = ServerProcess(env={"WS_HEARTBEAT_INTERVAL": "200"}).start()
    port = first.port
    try:
        open_dashboard(page, first, "?poll=200&maxDelay=500")
        page.wait_for_function("document.getElementById('h-clients').textContent === '1'",
                               timeout=10_000)
        wait_rows(page, 1)
        assert style(page, "#server-card .data", "opacity") == "1"
    finally:
        assert first.stop() == 0

    page.wait_for_function("document.getElementById('main').classList.contains('server-offline')",
                           timeout=10_000)
    assert "unreachable since" in page.inner_text("#health-status")
    # The last values stay, greyed: dimmed and without colour.
    assert page.inner_text("#h-clients") == "1"
    for card in ("#server-card", "#clients-card", "#dist-card", "#drops-card"):
        page.wait_for_function(  # once the .3 s transition is over
            f"getComputedStyle(document.querySelector('{card} .data')).filter === 'grayscale(1)'",
            timeout=2000)
        assert float(style(page, f"{card} .data", "opacity")) < 0.5, card
    assert table_rows(page) == 1  # the last list, kept
    assert "unreachable" in page.inner_text("#clients-status")

    second = ServerProcess(env={"PORT": str(port)}).start()
    try:
        page.wait_for_function(
            "!document.getElementById('main').classList.contains('server-offline')", timeout=5000)
        page.wait_for_function(
            "Number(getComputedStyle(document.querySelector('#server-card .data')).opacity) === 1",
            timeout=2000)
        assert "unreachable" not in page.inner_text("#health-status")
    finally:
        second.stop()


def row_style(page: Page, selector: str) -> dict[str, Any]:
    style: dict[str, Any] = page.eval_on_selector(
        selector, "r => ({bg: getComputedStyle(r.cells[0]).backgroundColor,"
                  " edge: getComputedStyle(r.cells[0]).boxShadow,"
                  " badge: r.cells[3].textContent})")
    return style


def test_high_priority_events_are_marked(page: Page, server: ServerProcess) -> None:
    open_dashboard(page, server)
    publish(server.url, {"type": "order", "topic": "demo"})
    publish(server.url, {"type": "page", "topic": "demo", "priority": "high",
                         "payload": {"message": "disk 91%"}})
    publish(server.url, {"type": "tick", "topic": "demo", "priority": "low"})
    page.locator('#feed tr[data-topic="demo"][data-seq="3"]').wait_for(timeout=10_000)
    page.wait_for_timeout(1600)  # the new-row highlight has faded

    normal = row_style(page, '#feed tr[data-seq="1"]')
    high = row_style(page, '#feed tr[data-seq="2"]')
    low = row_style(page, '#feed tr[data-seq="3"]')
    assert page.get_attribute('#feed tr[data-seq="2"]', "data-priority") == "high"
    assert high["badge"] == "HIGH" and normal["badge"] == "" and low["badge"] == "low"
    assert high["bg"] != normal["bg"], "a high row has a background of its own"
    assert "inset" in high["edge"] and "inset" not in normal["edge"], "and a red edge"
    assert style(page, '#feed tr[data-seq="2"] .prio', "backgroundColor") == "rgb(209, 67, 67)"


def feed_topics(page: Page, visible_only: bool = True) -> list[str]:
    hidden = ":not([hidden])" if visible_only else ""
    topics: list[str] = page.eval_on_selector_all(
        f"#feed tr.event{hidden}", "rows => rows.map(r => r.dataset.topic)")
    return topics


def test_all_topics_feed_follows_the_clients_topics_and_filters(
    page: Page, server: ServerProcess, peers: list[Peers]
) -> None:
    peers.append(Peers(server, 3, "?topics=orders,chat.lobby"))
    open_dashboard(page, server)  # reads demo; follows what clients read
    page.wait_for_function(
        "window.tether.topics.has('orders') && window.tether.topics.has('chat.lobby')",
        timeout=5000)
    assert "following 2" in page.inner_text("#follow-status")
    page.wait_for_function("window.tether.state === 'connected'", timeout=10_000)

    for event in ({"type": "order", "topic": "orders"}, {"type": "msg", "topic": "chat.lobby"},
                  {"type": "note", "topic": "demo"}, {"type": "lost", "topic": "nobody"},
                  {"type": "all"}, {"type": "order", "topic": "orders"}):
        publish(server.url, event)
    page.locator('#feed tr[data-topic="orders"][data-seq="2"]').wait_for(timeout=10_000)
    page.wait_for_function("document.querySelectorAll('#feed tr.event').length === 5",
                           timeout=10_000)
    assert sorted(feed_topics(page)) == ["*", "chat.lobby", "demo", "orders", "orders"]
    assert "nobody" not in feed_topics(page, visible_only=False), "no client reads it"

    # Filter by a name, by a prefix pattern, by a list, by clicking a topic chip.
    page.fill("#topic-filter", "orders")
    assert feed_topics(page) == ["orders", "orders"]
    assert "2 shown" in page.inner_text("#feed-shown")
    page.fill("#topic-filter", "chat.*")
    assert feed_topics(page) == ["chat.lobby"]
    page.fill("#topic-filter", "demo, *")
    assert sorted(feed_topics(page)) == ["*", "demo"]
    page.fill("#topic-filter", "")
    page.click('#seen-topics .chip.seen[data-topic="demo"]')
    assert feed_topics(page) == ["demo"]
    assert page.get_attribute('#seen-topics .chip[data-topic="demo"]', "class") == "chip seen on"
    # An event arriving while filtered is filtered too.
    publish(server.url, {"type": "order", "topic": "orders"})
    arrived = page.locator('#feed tr[data-topic="orders"][data-seq="3"]')
    arrived.wait_for(state="attached", timeout=10_000)
    assert feed_topics(page) == ["demo"]
    page.click('#seen-topics .chip.seen[data-topic="demo"]')  # again: every topic
    assert len(feed_topics(page)) == 6 and page.inner_text("#feed-shown") == ""

    # Taking a followed topic away sticks; turning follow off drops the rest.
    page.click('#topics .chip.sub:has-text("chat.lobby") button')
    page.wait_for_timeout(700)  # two refreshes: it is not followed again
    assert page.evaluate("window.tether.topics.has('chat.lobby')") is False
    page.uncheck("#follow-all")
    assert page.evaluate("[...window.tether.topics]") == ["demo"]
    publish(server.url, {"type": "order", "topic": "orders"})
    publish(server.url, {"type": "note", "topic": "demo"})
    page.locator('#feed tr[data-topic="demo"][data-seq="2"]').wait_for(timeout=10_000)
    assert page.locator('#feed tr[data-topic="orders"][data-seq="4"]').count() == 0


def test_with_workers_the_table_names_each_clients_worker(
    page: Page, peers: list[Peers]
) -> None:
    """`--workers 2`: the table lists every worker's clients, each with its worker."""
    with running_redis() as redis, ServerProcess(env={
            "REDIS_URL": redis.url, "TETHER_WORKERS": "2", "LOG_LEVEL": "info",
            "WS_HEARTBEAT_INTERVAL": "200"}) as server:
        group = Peers(server, 16)
        peers.append(group)
        # poll 1 s: each reading may wait the 1 s a stopped worker is given (below).
        me = open_dashboard(page, server, "?poll=1000&follow=0")
        wait_rows(page, 17, timeout=8)
        assert sorted(column(page, "session")) == sorted([*group.sessions, me])
        assert page.text_content("#clients-count") == "17"
        assert style(page, '#clients-head th[data-key="worker"]', "display") != "none"
        workers = column(page, "worker")
        # 17 connections spread by the kernel: both workers hold some (all on one: 2^-16).
        assert sorted(set(workers)) == ["0", "1"], workers
        assert sort_by(page, "worker") == "ascending"
        assert column(page, "worker") == sorted(workers)
        group.kill()
        wait_rows(page, 1, timeout=8)
        # The 16 drops (1006) are counted once, summed over the workers, and a worker
        # that misses a few readings (stopped: /health says it is unresponsive) neither
        # takes its share away nor brings it back as a burst.
        recent = page.locator('#drops-legend [data-code="1006"] .recent')
        recent.wait_for(timeout=10_000)
        assert wait_until(lambda: recent.inner_text() == "16", timeout=5), recent.inner_text()
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:
            stopped = json.load(r)["workers"][0]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            # The page reads /health from the live worker: the stopped one is missing.
            page.wait_for_function(
                "document.getElementById('health-status').textContent.startsWith('degraded')",
                timeout=15_000)
            page.wait_for_timeout(2500)
        finally:
            os.kill(stopped, signal.SIGCONT)
        page.wait_for_function(  # readings from both workers again
            "document.getElementById('health-status').textContent.startsWith('ok')",
            timeout=15_000)
        page.wait_for_timeout(2500)
        assert recent.inner_text() == "16"
