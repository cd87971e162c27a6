"""The examples and the README's blocks, run as a user runs them (issue 16).

Every fenced block of the README is one of three kinds, or the inventory test fails:
- `<!-- example: examples/X -->` above it: the block is that file, verbatim, and a test here
  (or in tests/browser/test_examples_browser.py) runs the file against a real server;
- `<!-- shell: ID -->` above it: a test here runs its commands, each line as written but for
  the port (4011 → the test server's free port);
- listed in NOT_RUN, with the reason.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import jwt
import pytest
from aiohttp import web

from tests.aio import run, serve_event_route
from tests.support import OUTPUT, ROOT, ServerProcess, free_port, post_event, wait_until
from tether.auth import issue_token
from tether.client import Client

EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
SECRET = "examples-secret-" + "e" * 40

# The README blocks no test runs, by (language, start of the first line), and why.
NOT_RUN = {
    ("sh", "make run"): "`make test` is the suite itself; CI runs it from a fresh clone",
    ("nginx", "map $http_upgrade"): "a digest of deploy/nginx.conf, which tests/test_proxy.py runs",
    ("", ""): "a diagram of the architecture",
    ("sh", "TLS_CERT=/etc/letsencrypt"): "needs a real certificate and port 443; tests/test_tls.py "
                                         "serves TLS the same way with a certificate it makes",
}
SHELL_BLOCKS = ("try-it", "cli", "tokens")  # each run by a test below


class Block(NamedTuple):
    """One fenced block of the README: where, its language, the marker above it, its text."""

    line: int
    lang: str
    marker: str | None
    text: str


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = re.fullmatch(r"```(\w*)", lines[i])
        if opening is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        above = lines[i - 1] if i else ""
        marker = re.fullmatch(r"<!-- ((?:example|shell): \S+) -->", above)
        blocks.append(Block(i + 1, opening.group(1), marker and marker.group(1),
                            "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def shell_block(name: str) -> list[str]:
    """The commands of the README block marked `shell: name`, continuation lines joined."""
    found = [b for b in readme_blocks() if b.marker == f"shell: {name}"]
    assert len(found) == 1, f"README has {len(found)} blocks marked 'shell: {name}'"
    return found[0].text.replace("\\\n", " ").strip().split("\n")


# ---------------------------------------------------------------------------- the README


def test_each_example_block_is_its_file_verbatim() -> None:
    shown: dict[str, Block] = {}
    for block in readme_blocks():
        if block.marker and block.marker.startswith("example: "):
            path = block.marker.removeprefix("example: ")
            assert path not in shown, f"{path} shown twice in the README"
            shown[path] = block
            assert block.text == (ROOT / path).read_text(), (
                f"README line {block.line} differs from {path}: copy the file into the block")
    files = {f"examples/{f.name}" for f in EXAMPLES.iterdir() if f.suffix in (".py", ".html")}
    assert set(shown) == files, "each example file is shown in the README once"


def unrun(blocks: list[Block]) -> list[str]:
    """The blocks that are no example, no shell block run here, and not in NOT_RUN."""
    found = []
    for block in blocks:
        first = block.text.split("\n", 1)[0]
        if block.marker is None:
            known = any(block.lang == lang and (first.startswith(start) if lang else True)
                        for lang, start in NOT_RUN)
        else:
            kind, _, name = block.marker.partition(": ")
            known = kind == "example" or name in SHELL_BLOCKS
        if not known:
            found.append(f"line {block.line} ({block.lang or 'no language'}): {first}")
    return found


def test_every_readme_block_is_an_example_or_run_here_or_says_why_not() -> None:
    found = unrun(readme_blocks())
    assert not found, f"README blocks that no test runs: {found}"
    # ... and the check can fail: an unmarked block, or a shell block no test runs.
    text = README.read_text()
    assert unrun(readme_blocks(text + "\n```python\nprint(1)\n```\n")) == [
        f"line {text.count(chr(10)) + 2} (python): print(1)"]
    assert len(unrun(readme_blocks(text + "\n<!-- shell: new -->\n```sh\nls\n```\n"))) == 1


# ---------------------------------------------------------------------------- programs


class Program:
    """A program as a user starts it, its stdout and stderr in files read as they grow."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        OUTPUT.mkdir(exist_ok=True)
        stem = OUTPUT / f"example-{os.getpid()}-{time.monotonic_ns()}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=user_env(env), cwd=cwd,
                                     stdout=self._out, stderr=self._err)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        """Until `text` is in the output (fails at once if the program ends first)."""
        if not wait_until(lambda: text in self.out() or self.proc.poll() is not None, timeout):
            raise AssertionError(f"no {text!r} within {timeout}s:\n{self.out()}\n{self.err()}")
        assert text in self.out(), f"exited {self.proc.returncode}:\n{self.out()}\n{self.err()}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        return int(self.proc.returncode)


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user's shell: the venv's bin first on PATH, unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PUBLISH_TOKEN", "TETHER_URL", "AUTH_SECRET", "ADMIN_TOKEN", "PORT")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


def example(name: str, *args: str, env: dict[str, str] | None = None) -> Program:
    """`.venv/bin/python examples/NAME ARGS`, from the checkout."""
    return Program([sys.executable, str(EXAMPLES / name), *args], env)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A directory in which `.venv/bin/...` and `examples/` are what a fresh clone has."""
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "examples").symlink_to(EXAMPLES)
    return tmp_path


def shell(line: str, port: int, clone: Path, env: dict[str, str] | None = None) -> Program:
    """Commands of a README block in bash, as written but for the port.

    bash runs a lone simple command by exec, so a signal to the Program reaches it.
    """
    return Program(["bash", "-c", line.replace("4011", str(port))], env, cwd=clone)


def shell_output(line: str, port: int, clone: Path, env: dict[str, str] | None = None) -> str:
    """What `line` printed; it must succeed."""
    prog = shell(line, port, clone, env)
    code = prog.proc.wait(30)
    prog.stop()
    assert code == 0, f"{line}\nexited {code}:\n{prog.out()}\n{prog.err()}"
    return prog.out()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as server:
        yield server


def watched(prog: Program) -> list[dict[str, Any]]:
    """The messages `tether watch` printed."""
    return [json.loads(line.split(" message ", 1)[1]) for line in prog.out().splitlines()
            if " message " in line]


# ---------------------------------------------------------------------------- examples/client.py


def test_client_example_receives_its_own_publish_then_the_others(server: ServerProcess) -> None:
    client = example("client.py", server.ws_url)
    try:
        client.wait_for("orders 1 {'id': 7}\n")  # its own, published once it was subscribed
        post_event(server.url, {"type": "order", "topic": "orders", "payload": {"id": 8}})
        post_event(server.url, {"type": "note", "topic": "elsewhere"})
        post_event(server.url, {"type": "note", "payload": {"to": "all"}})
        client.wait_for("* 1 {'to': 'all'}\n")
    finally:
        code = client.stop(signal.SIGINT)
    assert client.out() == "orders 1 {'id': 7}\norders 2 {'id': 8}\n* 1 {'to': 'all'}\n"
    assert code == 0 and client.err() == ""  # Ctrl+C ends it without a traceback


# ---------------------------------------------------------------------------- examples/embed.py


def embedded(env: dict[str, str] | None = None) -> ServerProcess:
    """examples/embed.py under ServerProcess (which reads `Server ready` for the port)."""
    script = (f"import os, sys; os.execve(sys.executable, [sys.executable, "
              f"{str(EXAMPLES / 'embed.py')!r}], os.environ)")
    return ServerProcess(env=user_env({"PORT": "0", **(env or {})}), script=script)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_embed_example_serves_publishes_and_its_handler_says_goodbye_first(
    sig: signal.Signals,
) -> None:
    prog = embedded().start()
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{prog.ws_url}?topics=ticks") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "connected"
            prices = [await ws.receive_json(timeout=5) for _ in range(2)]
            assert [(m["type"], m["payload"]["n"], m["seq"]) for m in prices] == [
                ("price", 1, 1), ("price", 2, 2)]
            prog.signal(sig)
            got = []
            while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
                got.append(json.loads(msg.data))
            # The application's handler (60) ran while the clients were still connected:
            # they got its last word, then tether's shutdown close (50).
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001, msg
            assert ws.close_code == 1001
        assert got, "nothing between the signal and the close: the handler ran too late"
        *more, end = got
        assert all(m["type"] == "price" for m in more)
        last = prices[-1]["payload"]["n"] + len(more)
        assert end["type"] == "end" and end["payload"] == {"prices": last}, got
        assert end["seq"] == last + 1
        assert prog.proc is not None and prog.proc.wait(15) == 0  # one signal: a clean exit
    finally:
        prog.stop()
    text = prog.text()
    stopped = text.index(f"\nprices stopped after {last}\n")
    assert stopped < text.index("Stopping WebSocket heartbeat")
    assert prog.lines()[-1]["message"] == "Shutdown complete"
    assert prog.find("Shutdown initiated")[0]["data"]["signal"] == sig.name


def test_embed_example_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, str(EXAMPLES / "embed.py")],
                             env=user_env({"PORT": str(port)}), cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert run.returncode == 2, run
    assert run.stderr.startswith("cannot listen: ") and run.stderr.count("\n") == 1, run.stderr
    assert f"127.0.0.1:{port}" in run.stderr and "in use" in run.stderr


# ---------------------------------------------------------------------------- examples/publish.py


def test_publish_example_sends_the_token_and_is_refused_without_it() -> None:
    with ServerProcess(env={"PUBLISH_TOKEN": "operator-key"}) as server:
        refused = example("publish.py", server.url)
        assert refused.proc.wait(30) == 1
        refused.stop()
        assert refused.out() == ""
        assert refused.err().startswith('refused: HTTP 401 {"error"'), refused.err()

        sent = example("publish.py", server.url, env={"PUBLISH_TOKEN": "operator-key"})
        assert sent.proc.wait(30) == 0, sent.err()
        sent.stop()
        assert json.loads(sent.out()) == {"accepted": True, "topic": "orders", "seq": 1}
        assert sent.err() == ""


class LosingProxy:
    """`POST /event` passed on to tether, whose first answer is lost: the socket is cut instead."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.keys: list[str | None] = []
        self.answers: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.keys.append(request.headers.get("Idempotency-Key"))
        headers = {k: v for k, v in request.headers.items()
                   if k in ("Content-Type", "Idempotency-Key", "Authorization")}
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.target}/event", data=await request.read(), headers=headers) as reply:
            answer = await reply.json()
        self.answers.append(answer)
        if len(self.keys) == 1:  # published, but the publisher never hears of it
            assert request.transport is not None
            request.transport.abort()
        return web.json_response(answer, status=reply.status)

    async def __aenter__(self) -> LosingProxy:
        self.runner, self.url = await serve_event_route(self.handle)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_publish_example_retries_a_lost_answer_with_its_key_and_is_delivered_once(
    server: ServerProcess,
) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"{server.ws_url}?topics=orders") as ws, LosingProxy(server.url) as proxy:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / "publish.py"), proxy.url, env=user_env(), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        key = proxy.keys[0]
        assert key is not None and str(uuid.UUID(key)) == key and proxy.keys == [key, key]
        assert err.decode().startswith("attempt 1 of 5 failed: "), err
        assert json.loads(out) == {"accepted": True, "topic": "orders", "seq": 1,
                                   "duplicate": True}
        first = await ws.receive_json(timeout=5)
        assert (first["type"], first["seq"], first["payload"]) == ("order", 1, {"id": 7})
        with pytest.raises(asyncio.TimeoutError):  # the retry delivered nothing again
            await ws.receive_json(timeout=0.5)


# ---------------------------------------------------------------------------- examples/backend.py


@pytest.fixture
def auth_server() -> Iterator[ServerProcess]:
    with ServerProcess(env={"AUTH_SECRET": SECRET, "ADMIN_TOKEN": "admin-key"}) as server:
        yield server


@contextlib.contextmanager
def backend(tether: ServerProcess) -> Iterator[str]:
    """examples/backend.py beside `tether`; its URL."""
    port = free_port()
    prog = example("backend.py", env={"AUTH_SECRET": SECRET, "TETHER_URL": tether.url,
                                      "BACKEND_PORT": str(port)})
    try:
        prog.wait_for(f"Running on http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        assert prog.stop() == 0, prog.err()


def docstring_commands(name: str) -> list[str]:
    """The commands that an example's docstring gives (its indented lines)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()), clean=False) or ""
    return [line.strip() for line in doc.splitlines() if line.startswith("    ")]


def get(url: str | urllib.request.Request) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: bytes = reply.read()
        return body


def shop_publish(tether: ServerProcess, topic: str, payload: dict[str, Any]) -> int:
    """As the backend's docstring publishes: a token whose `publish` claim grants user.*."""
    token = issue_token(SECRET, sub="shop", publish=["user.*"])
    reply = post_event(tether.url, {"type": "order", "topic": topic, "payload": payload},
                       headers={"Authorization": f"Bearer {token}"})
    assert reply.status == 202, reply
    seq: int = reply.body["seq"]
    return seq


async def test_backend_example_gives_a_token_that_reads_only_its_users_topics(
    auth_server: ServerProcess, clone: Path,
) -> None:
    with backend(auth_server) as url:
        session = json.loads(get(f"{url}/api/tether-token"))
        assert session["user"] == "42" and session["url"] == auth_server.ws_url
        claims = jwt.decode(session["token"], SECRET, algorithms=["HS256"])
        assert claims["sub"] == "42" and claims["topics"] == ["news", "user.42.*"]
        assert 890 < claims["exp"] - time.time() <= 900
        assert get(f"{url}/") == (EXAMPLES / "orders.html").read_bytes()
        assert get(f"{url}/tether.js") == get(f"{auth_server.url}/tether.js")

        async def fresh_token() -> str:  # as the page's getToken does
            async with aiohttp.ClientSession() as http, http.get(
                    f"{url}/api/tether-token") as reply:
                token: str = (await reply.json())["token"]
                return token

        refused: list[str] = []
        async with Client(session["url"], topics=["user.42.orders", "user.43.orders"],
                          token=fresh_token,
                          on_control=lambda m: refused.append(m.get("topic", ""))) as client:
            await client.wait_connected(10)
            assert client.sub == "42"
            shop_publish(auth_server, "user.43.orders", {"id": 1})
            # The last two commands of backend.py's docstring: a token that may publish to
            # user.*, and a publish with it to user 42.
            run = docstring_commands("backend.py")[-2:]
            assert run[0].startswith("export SHOP=") and " --topic user.42.orders " in run[1]
            reply = json.loads(shell_output("\n".join(run), auth_server.port, clone, {
                "AUTH_SECRET": SECRET, "TETHER_URL": auth_server.url}))
            assert reply == {"accepted": True, "topic": "user.42.orders", "seq": 1}
            msg = await asyncio.wait_for(anext(client), 5)
            assert msg == {"type": "order", "topic": "user.42.orders", "seq": 1}
            assert "user.43.orders" in refused


def test_backend_example_without_the_secret_says_what_it_needs() -> None:
    prog = example("backend.py")
    assert prog.proc.wait(30) == 1
    prog.stop()
    assert prog.err() == "set AUTH_SECRET: tether's secret, too\n"


# ---------------------------------------------------------------------------- shell blocks


@pytest.mark.parametrize(("block", "reply", "event"), [
    ("try-it", {"accepted": True, "topic": "demo", "seq": 1},
     {"type": "hello", "topic": "demo", "payload": {"x": 1}, "seq": 1}),
    ("cli", {"accepted": True, "topic": "orders", "seq": 1},
     {"type": "order", "topic": "orders", "priority": "high", "seq": 1}),
])
def test_readme_watch_and_publish_block(server: ServerProcess, clone: Path, block: str,
                                        reply: dict[str, object], event: dict[str, object]) -> None:
    """The README's block as written: its `watch` line sees what its publish line sends."""
    watch_line, publish_line = sorted(shell_block(block), key=lambda line: "watch" not in line)
    watch = shell(watch_line, server.port, clone)
    try:
        watch.wait_for(" connected session=")
        assert json.loads(shell_output(publish_line, server.port, clone)) == reply
        assert wait_until(lambda: watched(watch), 5), watch.out()
    finally:
        assert watch.stop() == 0
    assert watched(watch) == [event]


def test_readme_tokens_block(clone: Path) -> None:
    lines = shell_block("tokens")
    assert len(lines) == 5, lines
    exports, (serve, mint, watch_line) = lines[:2], lines[2:]
    printed = shell_output("\n".join([*exports, 'echo "$AUTH_SECRET" "$ADMIN_TOKEN"']), 0, clone)
    secret, admin = printed.split()
    assert len(secret) >= 32 and len(admin) >= 32, printed
    env = {"AUTH_SECRET": secret, "ADMIN_TOKEN": admin}

    script = f"import os; os.execvp('bash', ['bash', '-c', {serve!r}])"
    with ServerProcess(env=user_env(env), script=script) as tether:
        token = shell_output(mint, tether.port, clone, env).strip()
        claims = jwt.decode(token, secret, algorithms=["HS256"])
        assert (claims["sub"], claims["topics"], claims["publish"]) == (
            "alice", ["orders", "user.42.*"], ["orders"])
        assert 3590 < claims["exp"] - time.time() <= 3600

        watch = shell(watch_line, tether.port, clone, env)
        try:
            watch.wait_for(" connected session=")
            assert " authenticated sub=alice " in watch.out()
            # alice's development token may publish to orders (its `publish` claim).
            reply = post_event(tether.url, {"type": "order", "topic": "orders"},
                               headers={"Authorization": f"Bearer {token}"})
            assert reply.status == 202, reply
            assert wait_until(lambda: watched(watch), 5), watch.out()
            connections = urllib.request.Request(f"{tether.url}/api/connections",
                                                 headers={"Authorization": f"Bearer {admin}"})
            assert [c["sub"] for c in json.loads(get(connections))["connections"]] == ["alice"]
            # PUBLIC_TOPICS=news: read without a token, and nothing else.
            assert run(refused_without_token(tether, ["news", "orders"])) == ["orders"]
        finally:
            assert watch.stop() == 0
        assert watched(watch) == [{"type": "order", "topic": "orders", "seq": 1}]


async def refused_without_token(tether: ServerProcess, topics: list[str]) -> list[str]:
    """The topics refused to a WebSocket without a token that asks for `topics`."""
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"{tether.ws_url}?topics={','.join(topics)}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        await ws.send_json({"type": "ping", "id": "end"})
        refused = []
        while (msg := await ws.receive_json(timeout=5))["type"] != "pong":
            if msg["type"] == "error":
                refused.append(msg["topic"])
        return refused
