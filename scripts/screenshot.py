"""Take docs/dashboard.png: the operator dashboard in Chromium, a few hundred clients connected.

    .venv/bin/python scripts/screenshot.py [--clients 300] [--seconds 45] [--out docs/dashboard.png]

A real run, all on 127.0.0.1. It starts `tether serve` with access control on
(AUTH_SECRET, ADMIN_TOKEN and PUBLISH_TOKEN made up for the run; PUBLIC_TOPICS
`prices,status`), then a helper process (this file, `load`) that holds
`--clients` WebSocket clients and publishes events, and after `--seconds` takes a
full-page screenshot of `GET /` with Debian's Chromium (Playwright, no browser
download), the page holding the operator's tokens in its sessionStorage.

What the clients do, so that each panel has something true to show:
- most sign in with a token of their own user (`user-007`), some read the public
  topics anonymously; each reads one to three of a few shared topics;
- each answers the server's pings after a delay of its own (none for most, up to
  300 ms for a few), standing in for distant networks and busy clients: on
  loopback every round trip would be under a millisecond;
- a fifth come and go: they stay 4 to 30 s, then leave as real clients do (a
  page closed, 1001; a network drop, no close frame, 1006; a normal close, 1000;
  a forced reconnect, 4000; or they stop answering pings and are closed as stale)
  and come back a second later;
- four read their socket slowly (8 KB/s): a burst on the `bulk` topic a few
  seconds before the screenshot leaves bytes buffered for them in the server,
  and pauses them (they skip normal and low priority until they catch up).

The helper's clients are bounded (`--clients`, plus the four slow readers) and
it stops by itself after `--seconds` plus a margin; the script stops it and the
server by their PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's tether, also for the server it starts

TOPICS = ["orders", "orders.eu", "prices", "chat.lobby", "chat.support", "alerts", "deploys",
          "status"]
PUBLIC = ["prices", "status"]
SLOW_READERS = 4
CHURN = 0.2  # the share of clients that come and go
LEAVING = [  # how a leaving client goes, and how often
    ("page closed (1001)", 0.45), ("network drop (1006)", 0.25), ("normal close (1000)", 0.12),
    ("forced reconnect (4000)", 0.12), ("stops answering pings (stale)", 0.06),
]


# ---------------------------------------------------------------- the helper process

def pong_delay(rng: random.Random) -> float:
    """Seconds a client waits before it answers a ping: most at once, a few much later."""
    r = rng.random()
    if r < 0.55:
        return 0.0
    if r < 0.8:
        return rng.uniform(0.001, 0.02)
    if r < 0.95:
        return rng.uniform(0.02, 0.12)
    return rng.uniform(0.12, 0.3)


async def member(i: int, url: str, secret: str, deadline: float, ready: asyncio.Event,
                 joined: list[int]) -> None:
    """One client: connect, read and answer pings, maybe leave and come back, until the deadline."""
    import aiohttp

    from tether.auth import issue_token

    rng = random.Random(i)
    loop = asyncio.get_running_loop()
    churns = rng.random() < CHURN
    anonymous = rng.random() < 0.15
    topics = rng.sample(PUBLIC if anonymous else TOPICS, k=rng.randint(1, 2 if anonymous else 3))
    delay = pong_delay(rng)
    first = True
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            query = f"?topics={','.join(topics)}"
            if not anonymous:
                token = issue_token(secret, sub=f"user-{i:03d}", topics=topics, ttl=3600)
                query += f"&token={token}"
            try:
                ws = await session.ws_connect(url + query, autoping=False, heartbeat=None)
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(1 + rng.random())
                continue
            if first:
                first = False
                joined[0] += 1
                if joined[0] == joined[1]:
                    ready.set()
            answering = [True]

            async def read(ws: aiohttp.ClientWebSocketResponse = ws,
                           answering: list[bool] = answering) -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.PING and answering[0]:
                        if delay:
                            await asyncio.sleep(delay)
                        with contextlib.suppress(ConnectionError, RuntimeError):
                            await ws.pong(msg.data)

            reader = asyncio.ensure_future(read())
            life = rng.uniform(4, 30) if churns else deadline - loop.time()
            stay = max(0.0, min(life, deadline - loop.time()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), stay)
            if loop.time() >= deadline or reader.done():
                reader.cancel()
                await ws.close()
                continue
            how = rng.choices([w for w, _ in LEAVING], [p for _, p in LEAVING])[0]
            if "1006" in how:
                sock = ws.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # FIN, no close frame
            elif "stale" in how:
                answering[0] = False  # the server closes it after K unanswered pings
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), 20)
            else:
                code = {"1001": 1001, "1000": 1000, "4000": 4000}[how.split("(")[1][:4]]
                await ws.close(code=code)
            reader.cancel()
            with contextlib.suppress(Exception):
                await ws.close()
            await asyncio.sleep(rng.uniform(0.5, 1.5))


async def slow_reader(i: int, host: str, port: int, secret: str, deadline: float) -> None:
    """A raw WebSocket that reads 8 KB a second (small receive buffer) and answers pings."""
    from tether.auth import issue_token

    token = issue_token(secret, sub=f"mobile-{i}", topics=["bulk", "status"], ttl=3600)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    writer.write(f"GET /ws?topics=bulk,status&token={token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    buf = b""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        chunk = await reader.read(1024)
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 2:  # server frames are unmasked (RFC 6455 §5.1)
            opcode, n, head = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, head = struct.unpack("!H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, head = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < head + n:
                break
            payload, buf = buf[head:head + n], buf[head + n:]
            if opcode == 0x9:  # ping: a masked pong with the same payload
                mask = os.urandom(4)
                masked = bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
                writer.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
            elif opcode == 0x8:
                return
        await asyncio.sleep(1024 / 8192)
    writer.close()


def event_for(topic: str, n: int, rng: random.Random) -> dict[str, Any]:
    """The `n`th event, on `topic`: what an application of that topic would publish."""
    pick = rng.choice
    if topic.startswith("orders"):
        return {"type": "order.created", "topic": topic,
                "payload": {"id": 4100 + n, "total": round(rng.uniform(5, 400), 2),
                            "currency": "EUR"}}
    if topic == "prices":
        return {"type": "price", "topic": topic, "priority": "low",
                "payload": {"symbol": pick(["ACME", "GLOBX", "INITECH"]),
                            "price": round(rng.uniform(90, 110), 2)}}
    if topic.startswith("chat"):
        return {"type": "message", "topic": topic,
                "payload": {"from": f"user-{rng.randrange(300):03d}",
                            "text": pick(["anyone seen the deploy?", "thanks!",
                                          "ticket #812 is fixed"])}}
    if topic == "alerts":
        return {"type": "alert", "topic": topic, "priority": "high",
                "payload": {"level": pick(["page", "warn"]),
                            "message": pick(["disk 91% on db-2", "p99 latency 2.3 s on api",
                                             "certificate expires in 6 days"])}}
    if topic == "deploys":
        return {"type": "deploy.finished", "topic": topic, "priority": "high",
                "payload": {"service": pick(["api", "web", "billing"]), "version": f"1.{n % 40}.0"}}
    return {"type": "status", "topic": topic,
            "payload": {"healthy": True, "region": pick(["eu-1", "us-2"])}}


async def publisher(base: str, token: str, deadline: float, burst_at: float) -> None:
    """Events to every topic, some high and some low priority, and one burst on `bulk`."""
    import aiohttp

    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {token}"}
    n = 0
    burst_done = False
    async with aiohttp.ClientSession(headers=headers) as http:
        async def post(event: dict[str, Any]) -> None:
            async with http.post(f"{base}/event", json=event) as r:
                await r.read()

        while loop.time() < deadline:
            n += 1
            if not burst_done and loop.time() >= burst_at:
                burst_done = True
                # Enough to pass what the kernel takes on loopback (its send buffer
                # grows to 4 MB): the rest waits in tether, counted as buffered.
                for part in range(80):
                    await post({"type": "export.chunk", "topic": "bulk", "priority": "low",
                                "payload": {"part": part, "rows": "x" * 60000}})
            await post(event_for(rng.choice(TOPICS), n, rng))
            await asyncio.sleep(0.35)


async def load(url: str, clients: int, seconds: float, burst_at: float) -> None:
    loop = asyncio.get_running_loop()
    secret = os.environ["SCREENSHOT_AUTH_SECRET"]
    token = os.environ["SCREENSHOT_PUBLISH_TOKEN"]
    deadline = loop.time() + seconds
    ready = asyncio.Event()
    joined = [0, clients]
    host, port = url.split("//")[1].split("/")[0].split(":")
    tasks = []
    for i in range(clients):
        tasks.append(asyncio.ensure_future(member(i, url, secret, deadline, ready, joined)))
        if i % 25 == 24:
            await asyncio.sleep(0.05)  # connect in waves, as a fleet coming online would
    tasks += [asyncio.ensure_future(slow_reader(i, host, int(port), secret, deadline))
              for i in range(SLOW_READERS)]
    await asyncio.wait_for(ready.wait(), 60)
    print("READY", flush=True)
    base = f"http://{host}:{port}"
    tasks.append(asyncio.ensure_future(publisher(base, token, deadline, loop.time() + burst_at)))
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- the screenshot

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=300, help="WebSocket clients (default 300)")
    parser.add_argument("--seconds", type=float, default=45.0,
                        help="run this long before the screenshot (default 45)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    if not 1 <= args.clients <= 2000:
        parser.error("--clients must be 1 to 2000")

    from playwright.sync_api import sync_playwright

    from tether.auth import issue_token

    secret, admin, publish = (secrets.token_urlsafe(32) for _ in range(3))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PORT": "0", "LOG_FORMAT": "json",
           "LOG_LEVEL": "info", "AUTH_SECRET": secret, "ADMIN_TOKEN": admin,
           "PUBLISH_TOKEN": publish, "PUBLIC_TOPICS": ",".join(PUBLIC),
           "WS_HEARTBEAT_INTERVAL": "5000", "WS_HEARTBEAT_MISSED": "2",
           "SCREENSHOT_AUTH_SECRET": secret, "SCREENSHOT_PUBLISH_TOKEN": publish}
    log = tempfile.NamedTemporaryFile(prefix="tether-screenshot-", suffix=".log")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "tether", "serve"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    helper: subprocess.Popen[str] | None = None
    try:
        url = ready_url(Path(log.name), server)
        ws_url = url.replace("http://", "ws://") + "/ws"
        helper = subprocess.Popen(
            [sys.executable, __file__, "load", ws_url, str(args.clients), str(args.seconds + 20),
             str(max(1.0, args.seconds - 5))],
            env=env, stdout=subprocess.PIPE, text=True)
        assert helper.stdout is not None
        if helper.stdout.readline().strip() != "READY":
            raise SystemExit("the clients did not connect")
        print(f"{args.clients} clients on {url}; {args.seconds:.0f} s to go", flush=True)

        operator = issue_token(secret, sub="operator", topics=["**"], ttl=3600)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            context = browser.new_context(viewport={"width": 1440, "height": 1000},
                                          device_scale_factor=1, color_scheme="light")
            context.add_init_script(
                f"sessionStorage.setItem('tether.token', {json.dumps(operator)});"
                f"sessionStorage.setItem('tether.admin', {json.dumps(admin)});")
            page = context.new_page()
            # A bar of the disconnects chart per 2 s, so that the run fills it; a liveness
            # ping after 300 ms without traffic, so that this page's RTT chart fills too.
            page.goto(f"{url}/?topics=demo&poll=1000&bin=2000&pingInterval=300")
            page.wait_for_function("window.tether.state === 'connected'", timeout=10_000)
            started = time.monotonic()
            page.wait_for_function(
                f"document.querySelectorAll('#clients tr').length >= {args.clients}",
                timeout=20_000)
            page.wait_for_timeout(max(0.0, args.seconds - (time.monotonic() - started)) * 1000)
            # Sorted by bytes buffered, as an operator looking for slow clients would.
            page.click('#clients-head th[data-key="buffered"] button')
            page.wait_for_timeout(1200)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            rows = page.eval_on_selector_all("#clients tr", "r => r.length")
            paused = page.eval_on_selector_all("#clients tr.paused", "r => r.length")
            browser.close()
        print(f"wrote {args.out}: {rows} clients in the table, {paused} paused", flush=True)
        return 0
    finally:
        for proc, sig in ((helper, signal.SIGTERM), (server, signal.SIGINT)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()


def ready_url(log: Path, server: subprocess.Popen[bytes]) -> str:
    """The URL in the server's `Server ready` line, once it is logged."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("message") == "Server ready":
                    return str(record["data"]["url"])
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise SystemExit("the server did not start within 20 s")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "load":
        _, _, ws, n, secs, burst = sys.argv
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(load(ws, int(n), float(secs), float(burst)))
        sys.exit(0)
    sys.exit(main())
