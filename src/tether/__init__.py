"""tether: a real-time WebSocket hub that keeps connections alive and loses no message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether.config import Settings
from tether.errors import BackplaneError, ConfigError, PublishError, ShuttingDown, TetherError
from tether.message import Message, Priority

if TYPE_CHECKING:
    from tether.app import Tether

__all__ = [
    "BackplaneError",
    "ConfigError",
    "Message",
    "Priority",
    "PublishError",
    "Settings",
    "ShuttingDown",
    "Tether",
    "TetherError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `Tether` (aiohttp, asyncio) loads on first use (PEP 562), so importing a pure
    # module of the package pulls in no I/O library.
    if name == "Tether":
        from tether.app import Tether

        return Tether
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
