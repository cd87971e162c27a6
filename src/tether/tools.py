"""What the `tether publish` command does (the CLI only parses arguments).

A publish carries an `Idempotency-Key`, made once per logical publish, so that
it can be retried safely: on 502/503/504 (the backplane was unavailable and the
event may or may not have been published) and when the connection failed or
timed out, it is sent again with the same key, after a jittered backoff, a
bounded number of times. The server answers a repeat with the original seq
(`"duplicate": true`) and delivers nothing again.
"""

from __future__ import annotations

import asyncio
import random
import shlex
import ssl as _ssl
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

# Answers after which the event may or may not have been published: retried.
RETRY_STATUSES = frozenset({502, 503, 504})
ATTEMPTS = 5
BACKOFF_BASE = 0.5  # seconds: the ceiling of the first wait, doubling (0.5, 1, 2, 4: ~7.5 s)
BACKOFF_CAP = 8.0


def new_key() -> str:
    """A fresh idempotency key (a random UUID)."""
    return str(uuid.uuid4())


def event_url(url: str) -> str:
    """Where to POST: `url` is the server's http(s):// or ws(s):// URL, with or without a path.

    `ws://host:4011/ws` publishes to `http://host:4011/event`, `https://host`
    to `https://host/event`. ValueError for any other scheme.
    """
    u = URL(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    if scheme not in ("http", "https") or not u.host:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {url!r}")
    path = u.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    if not path.endswith("/event"):
        path += "/event"
    return str(u.with_scheme(scheme).with_path(path).with_query(None).with_fragment(None))


async def publish_event(
    url: str, event: dict[str, Any], token: str | None = None, timeout: float = 10.0,
    key: str | None = None, *, ssl: _ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST one event to the server at `url` (see `event_url`), once; (status, JSON reply).

    `ssl`: the TLS context for an https URL, e.g. trusting a private CA
    (`tls.client_context`); None: aiohttp's default verification.
    """
    target = event_url(url)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None:
        headers["Idempotency-Key"] = key
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session, session.post(
        target, data=orjson.dumps(event), headers=headers,
        ssl=True if ssl is None else ssl,  # True: aiohttp's default (ssl=None is deprecated)
    ) as resp:
        body = await resp.read()
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            reply = {"error": body.decode(errors="replace")[:200]}
        return resp.status, reply if isinstance(reply, dict) else {"reply": reply}


@dataclass(frozen=True, slots=True)
class Retry:
    """One failed attempt about to be repeated: for a log line or a message."""

    attempt: int  # the attempt that failed, from 1
    attempts: int
    delay: float  # seconds until the next one
    reason: str
    key: str


def retry_delay(attempt: int, rand: Callable[[], float] = random.random,
                base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """The wait after failed attempt `attempt` (from 1): half its ceiling, plus jitter.

    The ceiling doubles from `base` up to `cap`; the wait is uniform in
    [ceiling/2, ceiling), so publishers failed together spread out, and none
    comes back at once.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 32))
    return ceiling * (0.5 + min(max(rand(), 0.0), 1.0) / 2)


async def publish_retrying(
    url: str,
    event: dict[str, Any],
    token: str | None = None,
    *,
    key: str | None = None,
    attempts: int = ATTEMPTS,
    timeout: float = 10.0,
    on_retry: Callable[[Retry], Awaitable[None] | None] | None = None,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ssl: _ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any], str]:
    """Publish with an idempotency key, retrying while the outcome is unknown.

    Returns (status, reply, key) of the last attempt. Raises the last
    connection error or timeout when every attempt failed that way, and a
    certificate error at once (nothing was sent; a retry cannot change it).
    `ssl`: the TLS context for an https URL (None: aiohttp's default verification).
    """
    key = key if key is not None else new_key()
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            status, reply = await publish_event(url, event, token, timeout, key, ssl=ssl)
        except aiohttp.ClientConnectorCertificateError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if attempt == attempts:
                raise
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if status not in RETRY_STATUSES or attempt == attempts:
                return status, reply, key
            reason = f"HTTP {status}: {reply.get('error', reply)}"
        delay = retry_delay(attempt, rand)
        if on_retry is not None:
            result = on_retry(Retry(attempt, attempts, delay, reason, key))
            if result is not None:
                await result
        await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def publish(
    url: str, raw: str, topic: str | None, priority: str | None, token: str | None,
    key: str | None = None, attempts: int = ATTEMPTS, ca_file: str | None = None,
) -> int:
    """`tether publish`: 0 when accepted, 1 when refused or unreachable, 2 bad arguments.

    The reason goes to stderr in one line (and the key to retry with, when the
    event may have been published).
    """
    from tether.tls import client_context

    try:
        url = event_url(url)
    except ValueError as exc:
        print(f"tether publish: --url {exc}", file=sys.stderr)
        return 2
    try:
        ctx = client_context(ca_file) if ca_file else None
    except ValueError as exc:
        print(f"tether publish: --ca-file {exc}", file=sys.stderr)
        return 2
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        print(f"tether publish: the event is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(event, dict):
        print("tether publish: the event must be a JSON object", file=sys.stderr)
        return 2
    if topic:
        event["topic"] = topic
    if priority:
        event["priority"] = priority

    def said(retry: Retry) -> None:
        print(f"tether publish: attempt {retry.attempt} of {retry.attempts} failed "
              f"({retry.reason}); retrying in {retry.delay:.1f} s with Idempotency-Key "
              f"{retry.key}", file=sys.stderr)

    key = key if key is not None else new_key()
    try:
        status, reply, key = asyncio.run(publish_retrying(
            url, event, token, key=key, attempts=attempts, on_retry=said, ssl=ctx))
    except aiohttp.ClientConnectorCertificateError as exc:
        print(f"tether publish: the certificate of {url} is not trusted "
              f"({exc.certificate_error}); for a private CA, pass --ca-file", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"tether publish: cannot reach {url}: {exc}", file=sys.stderr)
        print(f"tether publish: to retry without a duplicate: --key {shlex.quote(key)}",
              file=sys.stderr)
        return 1
    if status != 202:
        print(f"tether publish: refused with HTTP {status}: {reply.get('error', reply)}",
              file=sys.stderr)
        if status in RETRY_STATUSES:
            print(f"tether publish: to retry without a duplicate: --key {shlex.quote(key)}",
                  file=sys.stderr)
        return 1
    print(orjson.dumps(reply).decode())
    return 0
