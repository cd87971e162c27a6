"""No secret shown (issue 12, item 4): a Redis password never reaches a log line, /health,
an HTTP body, the start-up error or a configuration error.

Against a real redis-server with `requirepass`, with the password in REDIS_URL in
both forms redis-py reads (`redis://:pw@host` and `?password=pw`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from tests.redis_server import RedisServer, running_redis
from tests.support import ROOT, ServerProcess, free_port
from tether import config
from tether.errors import ConfigError
from tether.redact import redact_error, redact_text, redact_url, url_secrets
from tether.server import UNAVAILABLE

PASSWORD = "hunter2-Zq9"  # distinctive: found only if it leaked


def with_password(port: int, form: str, password: str = PASSWORD) -> str:
    if form == "userinfo":
        return f"redis://:{password}@127.0.0.1:{port}/0"
    return f"redis://127.0.0.1:{port}/0?password={password}"


FORMS = ["userinfo", "query"]


# ---------------------------------------------------------------------------- the functions


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0?password=hunter2", "redis://127.0.0.1:6379/0?password=***"),
    ("redis://:hunter2@h:1/0", "redis://***@h:1/0"),
    ("redis://user:hunter2@h:1/0?db=2", "redis://user:***@h:1/0?db=2"),
    ("redis://hunter2@h", "redis://***@h"),  # a user name alone may well be a password
    ("rediss://[::1]:6380/0?username=bob&password=x&ssl_password=y&socket_timeout=5",
     "rediss://[::1]:6380/0?username=***&password=***&ssl_password=***&socket_timeout=5"),
    ("unix:///run/redis.sock?password=x&db=1", "unix:///run/redis.sock?password=***&db=1"),
    ("redis://:p%40ss@h", "redis://***@h"),
    ("redis://:pa#ss@h:1", "redis://***"),  # '#' unencoded: no valid port, nothing shown
    ("redis://:1234#5678@h", "redis://:1234#***"),  # the part after '#' never shown
    ("redis://u:p@h:notaport", "redis://***"),
    ("redis://[bad", "redis://***"),
    ("hunter2", "***"),  # not a URL at all
    ("redis://h:1", "redis://h:1"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_urls_pairs_and_the_given_secrets() -> None:
    secrets = url_secrets("redis://h:1/0?password=s3cr%2Ft")
    assert set(secrets) == {"s3cr%2Ft", "s3cr/t"}
    text = ("cannot reach redis://:pw@h:1/0: refused (see redis://h:2/0?password=x), "
            "password=abc token=t0k, AUTH s3cr/t failed")
    assert redact_text(text, secrets) == (
        "cannot reach redis://***@h:1/0: refused (see redis://h:2/0?password=***), "
        "password=*** token=***, AUTH *** failed")
    assert redact_error(ValueError()) == "ValueError"
    assert url_secrets("redis://u:pw@h") == ("pw",)  # a user name is not searched for


def test_a_config_error_does_not_echo_the_url() -> None:
    for bad in (f"http://:{PASSWORD}@h:1", f"h:1?password={PASSWORD}", PASSWORD):
        with pytest.raises(ConfigError) as err:
            config.load({"REDIS_URL": bad})
        assert err.value.variable == "REDIS_URL" and PASSWORD not in str(err.value)
    env = {**os.environ, "REDIS_URL": f"http://:{PASSWORD}@127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "tether", "serve"], env=env, cwd=ROOT,
                          capture_output=True, timeout=20)
    assert done.returncode == 2
    assert b"configuration error: REDIS_URL" in done.stderr
    assert PASSWORD.encode() not in done.stdout + done.stderr


# ---------------------------------------------------------------------------- a real Redis


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[RedisServer]:
    with running_redis(password=PASSWORD) as server:
        yield server


def serve(url: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PORT": "0", "LOG_LEVEL": "debug", "REDIS_URL": url}
    return subprocess.run([sys.executable, "-m", "tether", "serve"], env=env, cwd=ROOT,
                          capture_output=True, timeout=30)


@pytest.mark.parametrize("form", FORMS)
def test_the_start_up_error_line_hides_the_password(
    secured_redis: RedisServer, form: str,
) -> None:
    for url in (with_password(free_port(), form),  # nothing listens there
                with_password(secured_redis.port, form, password=PASSWORD[::-1])):  # wrong one
        done = serve(url)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-2000:]
        assert b"Cannot start the backplane" in done.stdout
        secret = url.rsplit("@", 1)[0].rsplit(":", 1)[-1] if form == "userinfo" else \
            url.rsplit("=", 1)[-1]
        assert secret.encode() not in output, output[-2000:]
        assert b"***" in done.stdout  # the URL is shown, redacted


@pytest.mark.parametrize("form", FORMS)
async def test_no_log_line_health_or_503_shows_the_password(form: str) -> None:
    with running_redis(password=PASSWORD) as redis:
        url = with_password(redis.port, form)
        with ServerProcess(env={"REDIS_URL": url, "LOG_LEVEL": "debug"}) as node:
            async with aiohttp.ClientSession() as s:
                connected = node.wait_for("Redis backplane connected")
                assert connected["data"]["url"] == redact_url(url) and "***" in redact_url(url)
                async with s.get(f"{node.url}/health") as r:
                    health = await r.text()
                assert PASSWORD not in health and json.loads(health)["backplane"]["status"] == "up"
                async with s.post(f"{node.url}/event", json={"type": "x"}) as r:
                    assert r.status == 202

                redis.kill()  # a 503 from the publish, with Redis' own error text behind it
                async with s.post(f"{node.url}/event", json={"type": "x"},
                                  headers={"Idempotency-Key": "k"}) as r:
                    body = await r.text()
                    assert r.status == 503
                assert json.loads(body) == UNAVAILABLE
                assert PASSWORD not in body and str(redis.port) not in body
                node.wait_for("Redis connection lost")
                async with s.get(f"{node.url}/health") as r:
                    down = await r.text()
                assert json.loads(down)["backplane"]["status"] == "down"
                assert PASSWORD not in down
        log = node.text()
        assert "Publish failed, backplane unavailable" in log
        assert PASSWORD not in log, [line for line in log.splitlines() if PASSWORD in line]
