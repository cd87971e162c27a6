"""Shutdown handlers and signals (SPEC §5).

`on_shutdown(name, handler, priority)` registers a handler; on SIGINT or SIGTERM
they run highest priority first, each awaited, an error logged and the rest
still run. A second signal, or handlers taking longer than the timeout, force
exit status 1; a clean shutdown exits 0.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tether.logs import get_logger

log = get_logger("shutdown")

Handler = Callable[[], Awaitable[None] | None]
SHUTDOWN_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    handler: Handler
    priority: int
    order: int


class Lifecycle:
    """Registered shutdown handlers and the one shutdown that runs them."""

    def __init__(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        self.timeout = timeout
        self._entries: list[_Entry] = []
        self._stop = asyncio.Event()
        self.signal_name: str | None = None
        self._done = False

    def on_shutdown(self, name: str, handler: Handler, priority: int = 0) -> None:
        """Run `handler` at shutdown; higher priority runs earlier, ties in registration order."""
        self._entries.append(_Entry(name, handler, priority, len(self._entries)))

    def _ordered(self) -> list[_Entry]:
        return sorted(self._entries, key=lambda e: (-e.priority, e.order))

    def request_stop(self, signal_name: str) -> None:
        """Begin shutdown (first call); a second call while stopping forces exit 1."""
        if self._stop.is_set():
            log.error("Second signal, forcing exit", signal=signal_name)
            _force_exit(1)
        self.signal_name = signal_name
        self._stop.set()

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig.name)

    async def wait(self) -> str:
        """Until a signal (or `request_stop`) asks to stop; returns its name."""
        await self._stop.wait()
        return self.signal_name or "unknown"

    async def shutdown(self, signal_name: str) -> bool:
        """Run every handler within the timeout; False when the timeout cut it short."""
        if self._done:
            return True
        self._done = True
        entries = self._ordered()
        log.info("Shutdown initiated", signal=signal_name, handlerCount=len(entries))
        try:
            async with asyncio.timeout(self.timeout):
                for entry in entries:
                    await self._run(entry)
        except TimeoutError:
            log.error("Shutdown timed out", timeoutMs=round(self.timeout * 1000))
            return False
        log.info("Shutdown complete", signal=signal_name, handlerCount=len(entries))
        return True

    async def _run(self, entry: _Entry) -> None:
        log.debug("Running shutdown handler", name=entry.name, priority=entry.priority)
        try:
            result = entry.handler()
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("Shutdown handler failed", name=entry.name, error=repr(exc))


def _force_exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
