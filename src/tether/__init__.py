"""tether: a real-time WebSocket hub that keeps connections alive and loses no message."""

from tether.app import Tether
from tether.config import Settings
from tether.errors import BackplaneError, ConfigError, PublishError, TetherError
from tether.message import Message, Priority

__all__ = [
    "BackplaneError",
    "ConfigError",
    "Message",
    "Priority",
    "PublishError",
    "Settings",
    "Tether",
    "TetherError",
]
__version__ = "0.1.0"
