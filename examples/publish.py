"""Publish one event from any Python program: `POST /event`, the standard library alone.

    .venv/bin/python examples/publish.py [http://localhost:4011]
    PUBLISH_TOKEN=... .venv/bin/python examples/publish.py      # when the server requires one

The event carries an Idempotency-Key and is retried with the same key while its outcome is
unknown (no answer, or 503 when Redis is away): it is delivered once, however often it is sent.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

URL = (sys.argv[1] if len(sys.argv) > 1 else "http://localhost:4011") + "/event"


def publish(event: dict, attempts: int = 5) -> dict:
    """POST `event`; the server's reply: {"accepted", "topic", "seq"} (+ "duplicate")."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())}
    if os.environ.get("PUBLISH_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['PUBLISH_TOKEN']}"
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(URL, json.dumps(event).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            if exc.code != 503:  # 400, 401, 413...: sending it again would not help
                sys.exit(f"refused: HTTP {exc.code} {exc.read().decode()}")
            why = "HTTP 503"
        except OSError as exc:  # no answer: it may or may not have been published
            why = str(exc)
        print(f"attempt {attempt} of {attempts} failed: {why}", file=sys.stderr)
        if attempt < attempts:
            time.sleep(0.25 * 2**attempt)  # then again, with the same key
    sys.exit(f"not published after {attempts} attempts")


if __name__ == "__main__":
    print(json.dumps(publish({"type": "order", "topic": "orders", "payload": {"id": 7}})))
