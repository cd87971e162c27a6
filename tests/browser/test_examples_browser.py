"""The README's web pages, examples/page.html and examples/orders.html, in Chromium (issue 16)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page

from tests.support import ServerProcess, publish, wait_until
from tests.test_examples import EXAMPLES, SECRET, backend, get, shop_publish

pytestmark = pytest.mark.browser


def wait_logged(page: Page, line: str, timeout: float = 10.0) -> None:
    """Until the page's log (its <pre id="log">) has `line`."""
    try:
        page.wait_for_function(
            "(line) => document.getElementById('log').textContent.split('\\n').includes(line)",
            arg=line, timeout=timeout * 1000)
    except PlaywrightError:
        raise AssertionError(f"no {line!r} in the page's log: {logged(page)}") from None


def logged(page: Page) -> list[str]:
    text: str = page.inner_text("#log")
    return text.splitlines()


def get_json(server: ServerProcess, path: str) -> Any:
    return json.loads(get(f"{server.url}{path}"))


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as server:
        yield server


def test_page_example_shows_its_topics_messages_and_state(
    page: Page, server: ServerProcess
) -> None:
    # On tether's origin, as the page says it must be: "/tether.js" and /ws are there. (Written
    # into a page of that origin: a document from page.route() has no address, and Chromium's
    # local network access checks then refuse it a WebSocket to 127.0.0.1.)
    page.goto(f"{server.url}/health")
    page.set_content((EXAMPLES / "page.html").read_text())
    wait_logged(page, "connected 0 ")
    publish(server.url, {"type": "order", "topic": "orders", "payload": {"id": 7}})
    publish(server.url, {"type": "note", "topic": "alerts", "payload": {"not": "asked"}})
    publish(server.url, {"type": "note", "payload": {"to": "all"}})
    wait_logged(page, '* 1 {"to":"all"}')
    # The console line of its last comment: a topic added later is read from then on.
    page.evaluate('client.subscribe(["alerts"])')
    assert wait_until(lambda: [c["topics"] for c in get_json(server, "/api/connections")[
        "connections"]] == [["alerts", "orders"]]), "the page's subscribe did not arrive"
    publish(server.url, {"type": "note", "topic": "alerts", "payload": {"now": "asked"}})
    wait_logged(page, 'alerts 2 {"now":"asked"}')
    assert logged(page) == ["connecting 0 ", "connected 0 ", 'orders 1 {"id":7}',
                            '* 1 {"to":"all"}', 'alerts 2 {"now":"asked"}'], logged(page)


def test_orders_example_reads_the_users_orders_with_the_backends_token(page: Page) -> None:
    with ServerProcess(env={"AUTH_SECRET": SECRET, "ADMIN_TOKEN": "admin-key"}) as tether, \
            backend(tether) as url:
        page.goto(url)
        wait_logged(page, "connected")
        shop_publish(tether, "user.43.orders", {"id": 1})  # another user's: never shown
        shop_publish(tether, "user.42.orders", {"id": 2})
        wait_logged(page, 'user.42.orders 1 {"id":2}')
        assert logged(page) == ["connecting", "connected", 'user.42.orders 1 {"id":2}']
        admin = urllib.request.Request(f"{tether.url}/api/connections",
                                       headers={"Authorization": "Bearer admin-key"})
        (conn,) = json.loads(get(admin))["connections"]
        assert conn["sub"] == "42" and conn["access"] == "token"
        assert conn["topics"] == ["user.42.orders"], conn
