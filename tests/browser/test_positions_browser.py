"""In Chromium: a page that saw seq N of a server that then restarted (memory backplane)
gets `resync` from the new server, never the new run's seqs as if they continued the old."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page

from tests.support import HttpClient, ServerProcess

pytestmark = pytest.mark.browser

PAGE = """
import { TetherClient } from "/tether.js";
window.seen = [];
window.resyncs = [];
const client = new TetherClient({ topics: ["t"], baseDelay: 200, maxDelay: 500 });
client.on("message", (m) => { if (m.topic === "t") window.seen.push(m.seq); });
client.on("resync", (r) => window.resyncs.push(r));
window.client = client;
client.connect();
"""


def test_a_page_gets_resync_after_a_restart_not_the_new_numbering(page: Page) -> None:
    first = ServerProcess().start()
    port = first.port
    try:
        page.goto(f"{first.url}/health")
        page.add_script_tag(type="module", content=PAGE)
        page.wait_for_function("window.client && window.client.state === 'connected'")
        with HttpClient(first.url) as http:
            for i in range(100):
                assert http.post_event({"type": "x", "topic": "t", "payload": i}).status == 202
        page.wait_for_function("window.seen.length === 100", timeout=5000)
        old_epoch = page.evaluate("window.client.epoch")
        # The page goes away for a while (a closed laptop); the server restarts.
        page.evaluate("window.client.disconnect()")
    finally:
        assert first.stop() == 0

    second = ServerProcess(env={"PORT": str(port)}).start()
    try:
        with HttpClient(second.url) as http:
            for i in range(171):  # more than the page saw, before it comes back
                assert http.post_event({"type": "y", "topic": "t", "payload": i}).status == 202
            page.evaluate("window.client.connect()")
            page.wait_for_function("window.resyncs.some((r) => r.topic === 't')", timeout=5000)
            # Every position the page held is of the old epoch: t, and the broadcast
            # topic it was told at connect.
            resyncs = page.evaluate("window.resyncs")
            assert sorted(resyncs, key=str) == sorted(
                [{"topic": "t", "seq": 171}, {"topic": "*", "seq": 0}], key=str)
            assert page.evaluate("window.client.epoch") not in (None, old_epoch)
            assert http.post_event({"type": "y", "topic": "t"}).status == 202
            page.wait_for_function("window.seen.length === 101", timeout=5000)
        # seqs 1-100 of the first run, then 172: nothing of the new run's 101-171.
        assert page.evaluate("window.seen") == [*range(1, 101), 172]
    finally:
        second.stop()
