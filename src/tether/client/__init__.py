"""The Python client: stays connected, resumes by seq, surfaces resync (SPEC §4, §7, §9).

```python
async with Client("ws://localhost:4011/ws", topics=["orders"]) as client:
    async for msg in client:  # published messages, and {"type": "resync", ...}
        print(msg["topic"], msg["seq"], msg)
```

`logic.py` holds its decisions (pure, tested without sleeping); `driver.py` the
`Client` (lifecycle, reconnect loop); `session.py` one connection's conversation
(and `Token`); `inbox.py` the iterator's buffer; `events.py` the states and
callbacks; `publishing.py` `POST /event`; `urls.py` its URLs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether.client.logic import (
    Backoff,
    Kind,
    Liveness,
    SeqTracker,
    Verdict,
    classify,
    overslept,
    refresh_delay,
    since_param,
)

if TYPE_CHECKING:
    from tether.client.driver import Client
    from tether.client.events import State, StateChange
    from tether.client.session import Token
    from tether.client.urls import connect_url, http_url, ws_url

# The driver (aiohttp) and the URL helpers (yarl) load on first use (PEP 562), so
# importing the pure logic pulls in no I/O library.
_LAZY = {"Client": "driver", "State": "events", "StateChange": "events", "Token": "session",
         "connect_url": "urls", "http_url": "urls", "ws_url": "urls"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tether.client' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"tether.client.{module}"), name)


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
