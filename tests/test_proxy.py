"""tether behind Debian's nginx, run from the shipped deploy/nginx.conf (issue 16).

The configuration is rendered from `deploy/nginx.conf` with only what a test must
change (ports, paths, one upstream, `proxy_read_timeout 2s`); every edit must match
the template exactly once, so the file users copy is the file tested. nginx cuts a
WebSocket when nothing came from upstream for proxy_read_timeout:

* tether's heartbeat (500 ms) keeps a silent WebSocket open through it for 10 s;
* with the heartbeat off, nginx cuts it at ~2 s, and the browser client (Chromium)
  reconnects through nginx and resumes with nothing lost or repeated;
* `/api/connections` shows the client's address from X-Forwarded-For only when
  the proxy is in TRUSTED_PROXIES.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.sync_api import Page

from tests.aio import eventually, post_event
from tests.browser.conftest import browser, page  # noqa: F401 - the Chromium fixtures
from tests.support import ROOT, ServerProcess, free_port, publish, wait_until
from tests.test_proxies import open_ws

pytestmark = pytest.mark.nginx

NGINX = Path("/usr/sbin/nginx")
TEMPLATE = ROOT / "deploy" / "nginx.conf"
READ_TIMEOUT = 2.0  # seconds: the proxy_read_timeout of the rendered configuration
# nginx moves a timer only when the new deadline is at least 300 ms past the old one
# (NGX_TIMER_LAZY_DELAY, src/event/ngx_event_timer.h): messages less than 300 ms after
# the last reset do not postpone the cut, which comes 1.7 to 2.0 s after the last one.
NGINX_LAZY = 0.3


def render(template: str, work: Path, listen_port: int, upstream_port: int) -> str:
    """The shipped configuration with a test's ports, paths and read timeout."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    temp = "".join(f"\n    {kind}_temp_path {work}/{kind};"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    edits = [
        ("user www-data;", f"user {user};\ndaemon off;"),  # the user: only when root
        ("worker_processes auto;", "worker_processes 1;"),
        ("pid /run/nginx.pid;", f"pid {work}/nginx.pid;"),
        ("error_log /var/log/nginx/error.log warn;", f"error_log {work}/error.log info;"),
        ("worker_rlimit_nofile 65536;", ""),  # a test runner may not raise its limit
        ("access_log /var/log/nginx/access.log;", f"access_log {work}/access.log;{temp}"),
        ("server 10.0.0.11:4011 max_fails=2 fail_timeout=10s;\n"
         "        server 10.0.0.12:4011 max_fails=2 fail_timeout=10s;",
         f"server 127.0.0.1:{upstream_port} max_fails=2 fail_timeout=10s;"),
        ("listen 80;\n        listen [::]:80;", f"listen 127.0.0.1:{listen_port};"),
        ("proxy_read_timeout 75s;", f"proxy_read_timeout {READ_TIMEOUT:g}s;"),
    ]
    text = template
    for old, new in edits:
        assert text.count(old) == 1, f"deploy/nginx.conf changed: {old!r} is not there once"
        text = text.replace(old, new)
    return text


class Nginx:
    """`nginx -c CONF -p DIR` in the foreground, in front of one tether; stopped by PID."""

    def __init__(self, work: Path, upstream_port: int) -> None:
        self.work = work
        self.port = free_port()
        self.conf = work / "nginx.conf"
        self.conf.write_text(render(TEMPLATE.read_text(), work, self.port, upstream_port))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> Nginx:
        with open(self.work / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([str(NGINX), "-c", str(self.conf), "-p", str(self.work)],
                                         stdout=err, stderr=subprocess.STDOUT)
        if not wait_until(self._ready, timeout=10, interval=0.05):
            self.stop()
            raise AssertionError(f"nginx did not serve /health:\n{self.log()}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited ({self.proc.returncode}):\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as res:
                return bool(res.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in (self.work / "stderr.log", self.work / "error.log")
                         if p.exists())

    def stop(self) -> None:
        """SIGTERM (fast shutdown: a graceful one waits for open WebSockets)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Stack:
    server: ServerProcess
    proxy: Nginx


@contextlib.contextmanager
def stack(work: Path, env: dict[str, str]) -> Iterator[Stack]:
    if not NGINX.exists():
        pytest.fail(f"{NGINX} is missing: run scripts/system-deps.sh (Debian nginx-light)",
                    pytrace=False)
    server = ServerProcess(env=env).start()
    proxy: Nginx | None = None
    try:
        proxy = Nginx(work, server.port).start()
        yield Stack(server, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


@pytest.fixture(scope="module")
def beat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Heartbeat every 500 ms; no proxy trusted."""
    env = {"WS_HEARTBEAT_INTERVAL": "500", "TRUSTED_PROXIES": ""}
    with stack(tmp_path_factory.mktemp("nginx-beat"), env) as s:
        yield s


@pytest.fixture(scope="module")
def silent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No heartbeat; nginx (127.0.0.1) and an outer proxy at 127.0.0.4 are trusted."""
    env = {"WS_HEARTBEAT_INTERVAL": "0", "TRUSTED_PROXIES": "127.0.0.1, 127.0.0.4"}
    with stack(tmp_path_factory.mktemp("nginx-silent"), env) as s:
        yield s


def session_lines(server: ServerProcess, message: str, session: str) -> list[dict[str, Any]]:
    return [x for x in server.find(message) if x["data"].get("sessionId") == session]


@pytest.mark.slow
async def test_heartbeat_keeps_a_silent_websocket_open_through_nginx(beat: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(beat.proxy.ws_url)  # answers pings by itself
        session = (await ws.receive_json())["sessionId"]
        got: list[aiohttp.WSMessage] = []

        async def read() -> None:
            async for msg in ws:
                got.append(msg)

        reader = asyncio.create_task(read())
        try:
            await asyncio.sleep(10)  # five proxy_read_timeouts without application traffic
            assert not ws.closed and not got, (got, beat.proxy.log())
            # The pings did it: tether measured this client's pongs all along.
            assert len(session_lines(beat.server, "Received pong", session)) >= 10
            # And the connection still carries messages both ways.
            assert (await post_event(beat.proxy.url, {"type": "still-there"})).status == 202
            assert await eventually(lambda: bool(got), 3)
            assert json.loads(got[0].data)["type"] == "still-there"
            assert not session_lines(beat.server, "WebSocket client disconnected", session)
        finally:
            await ws.close()
            await reader


async def test_without_heartbeat_nginx_cuts_a_silent_websocket_at_read_timeout(
    silent: Stack,
) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(silent.proxy.ws_url)
        session = (await ws.receive_json())["sessionId"]
        last_traffic = time.monotonic()  # the greeting: nothing comes from tether after it
        msg = await asyncio.wait_for(ws.receive(), READ_TIMEOUT * 3)
        cut_after = time.monotonic() - last_traffic
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE), msg
        assert ws.close_code == 1006  # a TCP close with no close frame: the proxy, not tether
        assert 0.9 * READ_TIMEOUT <= cut_after <= 1.5 * READ_TIMEOUT, cut_after
    # nginx closed its side to tether too, and tether freed the connection.
    assert await eventually(
        lambda: bool(session_lines(silent.server, "WebSocket client disconnected", session)),
        3), silent.server.text()[-3000:]


async def connections(base_url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/api/connections") as r:
        body = await r.json()
    return {c["sessionId"]: c["remote"] for c in body["connections"]}


async def test_api_connections_shows_the_forwarded_client_only_from_trusted_proxies(
    beat: Stack, silent: Stack
) -> None:
    # The test's clients connect from other loopback addresses than nginx (127.0.0.1),
    # so "the client", "the proxy" and "a trusted outer proxy" are told apart.
    cases = [
        # nginx is trusted: the client address it appended; the client's own
        # X-Forwarded-For ("203.0.113.7", a spoof) is left of it and ignored.
        (silent.proxy.port, "127.0.0.3", "203.0.113.7", "127.0.0.3"),
        # An outer proxy at 127.0.0.4 (trusted) forwarded 203.0.113.7: believed.
        (silent.proxy.port, "127.0.0.4", "203.0.113.7", "203.0.113.7"),
        # No TRUSTED_PROXIES: the peer, which is nginx.
        (beat.proxy.port, "127.0.0.3", "203.0.113.7", "127.0.0.1"),
        # Straight to tether, not through a trusted proxy: the header is ignored.
        (silent.server.port, "127.0.0.3", "203.0.113.7", "127.0.0.3"),
    ]
    opened = []
    try:
        expected = {}
        for port, source, xff, remote in cases:
            session, ws, status, sid = await open_ws(port, source, xff)
            opened.append((session, ws))
            assert ws is not None and status == 101
            expected[sid] = remote
        seen = {**await connections(silent.proxy.url), **await connections(beat.proxy.url)}
        logged = {x["data"]["sessionId"]: x["data"]["remote"]
                  for server in (silent.server, beat.server)
                  for x in server.find("WebSocket client connected")}
        # Each client with the expected address, in the API and in the log line.
        assert {sid: seen.get(sid) for sid in expected} == expected
        assert {sid: logged.get(sid) for sid in expected} == expected
    finally:
        for session, ws in opened:
            if ws is not None:
                await ws.close()
            await session.close()


# Last in the module: the Chromium fixture (module-scoped) keeps Playwright's event loop
# running in this thread until the module ends, and no asyncio test can run after it.
@pytest.mark.browser
def test_browser_client_resumes_through_nginx_after_the_cut(page: Page, silent: Stack) -> None:  # noqa: F811
    page.goto(f"{silent.proxy.url}/health")  # any page of the proxy's origin
    page.evaluate(
        """async () => {
          const { TetherClient } = await import('/tether.js');
          window.got = [];
          window.states = [];
          // The first retry after the cut comes exactly 1.5 s later (random() = 1):
          // the gap the test publishes into. No liveness ping in this test's time.
          const client = new TetherClient({ topics: ['proxied'], baseDelay: 1500,
                                            random: () => 1, pingInterval: 60000 });
          client.on('message', (m) => window.got.push({ topic: m.topic, seq: m.seq,
                                                        type: m.type, at: Date.now() }));
          client.on('state', (s) => window.states.push({ ...s, at: Date.now() }));
          window.client = client;
          client.connect();
        }"""
    )
    page.wait_for_function("window.client.state === 'connected'", timeout=5000)
    first = page.evaluate("window.client.sessionId")

    def wait_got(n: int) -> None:
        page.wait_for_function(
            "(n) => window.got.filter((m) => m.topic === 'proxied').length >= n", arg=n,
            timeout=5000)

    def seq_of(kind: str) -> int:
        return int(publish(silent.proxy.url, {"type": kind, "topic": "proxied"})["seq"])

    seqs = [seq_of("before") for _ in range(3)]
    wait_got(3)
    # Silence now: nginx cuts the WebSocket READ_TIMEOUT (less NGINX_LAZY) after it.
    page.wait_for_function("window.client.state === 'reconnecting'",
                           timeout=(READ_TIMEOUT * 2 + 1) * 1000)
    seqs += [seq_of("gap") for _ in range(3)]
    assert page.evaluate("window.client.state") == "reconnecting"  # published in the gap
    page.wait_for_function(
        "(old) => window.client.state === 'connected' && window.client.sessionId !== old",
        arg=first, timeout=5000)
    seqs += [seq_of("after") for _ in range(3)]
    wait_got(9)
    time.sleep(0.2)  # a duplicate would arrive right behind

    assert seqs == list(range(1, 10))
    got = page.evaluate("window.got.filter((m) => m.topic === 'proxied')")
    assert [m["seq"] for m in got] == seqs  # in order, each once, none missing
    assert [m["type"] for m in got] == ["before"] * 3 + ["gap"] * 3 + ["after"] * 3
    assert page.evaluate("window.client.duplicates") == 0  # the server resent none
    states = page.evaluate("window.states")
    cut = next(s for s in states if s["state"] == "reconnecting")
    assert cut["code"] == 1006  # the proxy closed TCP; tether sent no close frame
    silence = (cut["at"] - got[2]["at"]) / 1000
    assert READ_TIMEOUT - NGINX_LAZY - 0.1 <= silence <= 1.5 * READ_TIMEOUT, (silence, states)
    # The second connection came through nginx and resumed: the gap was replayed.
    second = page.evaluate("window.client.sessionId")
    assert session_lines(silent.server, "WebSocket client connected", second)
    with urllib.request.urlopen(f"{silent.proxy.url}/health", timeout=5) as res:
        messages = json.loads(res.read())["messages"]
    assert (messages["resumes"], messages["replayed"]) == (1, 3), messages
