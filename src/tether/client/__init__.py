"""The Python client: stays connected, resumes by seq, surfaces resync (SPEC §4, §7, §9).

```python
async with Client("ws://localhost:4011/ws", topics=["orders"]) as client:
    async for msg in client:  # published messages, and {"type": "resync", ...}
        print(msg["topic"], msg["seq"], msg)
```

`logic.py` holds its decisions (pure, tested without sleeping); `driver.py` the
aiohttp driver, `Client`.
"""

from tether.client.driver import Client, State, StateChange, Token
from tether.client.logic import (
    Backoff,
    Kind,
    Liveness,
    SeqTracker,
    Verdict,
    classify,
    connect_url,
    http_url,
    overslept,
    refresh_delay,
    since_param,
    ws_url,
)

__all__ = [
    "Backoff",
    "Client",
    "Kind",
    "Liveness",
    "SeqTracker",
    "State",
    "StateChange",
    "Token",
    "Verdict",
    "classify",
    "connect_url",
    "http_url",
    "overslept",
    "refresh_delay",
    "since_param",
    "ws_url",
]
