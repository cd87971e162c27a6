"""What the Python client tells the application: its states, and its callbacks.

`State` and `StateChange` (given to `on_state`), the callbacks' types, and
`call`, which runs one (sync or async) and logs its errors instead of raising:
an application's bug must not break the connection.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tether.client.logic import JSON
from tether.logs import get_logger

log = get_logger("client")


class State(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"  # closed by the application: final
    UNAUTHORIZED = "unauthorized"  # the server refused the token (4003): final


@dataclass(frozen=True, slots=True)
class StateChange:
    """A connection state event, given to `on_state`.

    On `reconnecting`, `reason` says why the last connection or attempt ended
    and `up_for` how long that connection had stayed up (None when it never
    opened); `delay` is the wait before attempt number `attempt`.
    """

    state: State
    attempt: int = 0
    delay: float | None = None
    reason: str | None = None
    up_for: float | None = None
    session_id: str | None = None


MessageCallback = Callable[[JSON], Awaitable[None] | None]
StateCallback = Callable[[StateChange], Awaitable[None] | None]
RttCallback = Callable[[float], Awaitable[None] | None]


async def call(callback: Callable[[Any], Awaitable[None] | None] | None, arg: Any) -> None:
    """Run an application callback (sync or async); its errors are logged, not raised."""
    if callback is None:
        return
    try:
        result = callback(arg)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("Callback failed", callback=getattr(callback, "__name__", repr(callback)))
