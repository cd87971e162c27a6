"""What the `tether publish` command does (the CLI only parses arguments)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import orjson


async def publish_event(
    url: str, event: dict[str, Any], token: str | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """POST one event to `url` (`.../event` is added when missing); (status, JSON reply)."""
    target = url.rstrip("/")
    if not target.endswith("/event"):
        target += "/event"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session, session.post(
        target, data=orjson.dumps(event), headers=headers
    ) as resp:
        body = await resp.read()
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            reply = {"error": body.decode(errors="replace")[:200]}
        return resp.status, reply if isinstance(reply, dict) else {"reply": reply}


def publish(
    url: str, raw: str, topic: str | None, priority: str | None, token: str | None
) -> int:
    """`tether publish`: 0 when accepted, 1 when refused or unreachable (message on stderr)."""
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
    try:
        status, reply = asyncio.run(publish_event(url, event, token))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"tether publish: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if status != 202:
        print(f"tether publish: refused with HTTP {status}: {reply.get('error', reply)}",
              file=sys.stderr)
        return 1
    print(orjson.dumps(reply).decode())
    return 0
