"""`Client.publish`: `POST /event`, retried under one idempotency key (SPEC §6).

The retrying is `tools.publish_retrying`'s (shared with `tether publish`); here
a refusal becomes a `PublishError` whose kind the HTTP status gives, and each
retry is a log line.
"""

from __future__ import annotations

import ssl as _ssl

from tether.client.logic import JSON
from tether.errors import PublishError, Refusal
from tether.logs import get_logger
from tether.tools import Retry, publish_retrying

log = get_logger("client")

# What the server's HTTP status says about a refused publish.
REFUSALS = {400: Refusal.INVALID, 413: Refusal.TOO_LARGE, 422: Refusal.KEY_REUSED}


async def publish(
    base: str, event: JSON, bearer: str | None, *, topic: str | None, priority: str | None,
    key: str | None, attempts: int, ssl: _ssl.SSLContext | None,
) -> JSON:
    """Publish `event` to the server at `base` (its HTTP URL); the reply, or PublishError."""
    body = dict(event)
    if topic is not None:
        body["topic"] = topic
    if priority is not None:
        body["priority"] = priority
    status, reply, _ = await publish_retrying(
        base, body, bearer, key=key, attempts=attempts, on_retry=_log_retry, ssl=ssl)
    if status != 202:
        raise PublishError(REFUSALS.get(status, Refusal.REFUSED),
                           str(reply.get("error", reply)), status)
    return reply


def _log_retry(retry: Retry) -> None:
    log.warn("Publish failed, retrying with the same key", attempt=retry.attempt,
             attempts=retry.attempts, retryInMs=round(retry.delay * 1000), reason=retry.reason,
             key=retry.key)
