"""The event loop `tether serve` runs on: uvloop where it installs, asyncio's own otherwise.

`EVENT_LOOP` chooses: `auto` (uvloop when it imports, else asyncio's loop),
`uvloop` (a configuration error where it cannot be imported: never a silent
fallback), or `asyncio`. Only uvloop's public API is used
(`uvloop.new_event_loop` as an `asyncio.Runner` loop factory); tether itself
uses only asyncio's public loop and transport API, which uvloop implements.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def uvloop_factory() -> LoopFactory | None:
    """uvloop's `new_event_loop`, or None where uvloop is not installed (or cannot load)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def parse(raw: str) -> str:
    """The parser of EVENT_LOOP: `auto`, `uvloop` (only where it imports) or `asyncio`."""
    value = raw.strip().lower()
    if value not in CHOICES:
        raise ValueError(f"must be one of {', '.join(CHOICES)}, got {raw!r}")
    if value == "uvloop" and uvloop_factory() is None:
        raise ValueError("is uvloop, which cannot be imported here (pip install uvloop; "
                         "it needs CPython, not Windows), or set auto or asyncio")
    return value


def resolve(choice: str) -> str:
    """The loop a choice names: `uvloop` or `asyncio` (`auto`: uvloop when it imports)."""
    if choice == "auto":
        return "uvloop" if uvloop_factory() is not None else "asyncio"
    return choice


def asyncio_loop() -> asyncio.AbstractEventLoop:
    """A new loop of asyncio's own, whatever event loop policy is installed."""
    if sys.platform == "win32":
        return asyncio.ProactorEventLoop()
    return asyncio.SelectorEventLoop()


def factory(name: str) -> LoopFactory:
    """The loop factory of a resolved name, `uvloop` or `asyncio`."""
    if name == "asyncio":
        return asyncio_loop
    made = uvloop_factory()
    if made is None:
        raise RuntimeError("uvloop cannot be imported")
    return made


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """Run `main` to completion on a new loop of `choice`, as `asyncio.run` does."""
    with asyncio.Runner(loop_factory=factory(resolve(choice))) as runner:
        return runner.run(main)


def name_of(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`: which loop `loop` is (for the `Server ready` line)."""
    return "uvloop" if type(loop).__module__.partition(".")[0] == "uvloop" else "asyncio"
