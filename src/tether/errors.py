"""tether's one exception hierarchy."""

from __future__ import annotations

import errno
import socket
from enum import Enum


class TetherError(Exception):
    """Base of every error tether raises on purpose."""


class ConfigError(TetherError):
    """A configuration variable does not parse, is out of range or conflicts."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable} {reason}")
        self.variable = variable
        self.reason = reason


class ListenError(TetherError, OSError):
    """The server cannot listen: its port is taken, or HOST is not an address of this machine.

    An OSError too, as the bind error it stands for (kept as `__cause__`);
    `reason` says it in words, `host` and `port` where.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason

    @classmethod
    def of(cls, host: str, port: int, exc: OSError) -> ListenError:
        """The error of a failed bind or listen, in words."""
        if isinstance(exc, socket.gaierror):
            reason = f"HOST {host!r} is not an IP address or a name that resolves ({exc.strerror})"
        elif exc.errno == errno.EADDRINUSE:
            reason = f"port {port} is already in use (another server?)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = f"HOST {host} is not an address of this machine"
        elif exc.errno == errno.EACCES and 0 < port < 1024:
            reason = f"port {port} needs root or CAP_NET_BIND_SERVICE (ports below 1024)"
        else:
            reason = exc.strerror or str(exc)
        return cls(host, port, reason)


class Refusal(Enum):
    """Why a publish was refused (the HTTP edge maps each to a status: server.py)."""

    INVALID = "invalid"  # the event, or a header, is not acceptable
    TOO_LARGE = "too large"  # over WS_MAX_MESSAGE
    KEY_REUSED = "key reused"  # the idempotency key was used for another event
    REFUSED = "refused"  # any other refusal a server answered (the client's view)


class PublishError(TetherError):
    """A publish was refused; nothing was broadcast.

    `status` is set only where an HTTP answer was read (the clients): the HTTP
    status the server gave.
    """

    def __init__(self, refusal: Refusal, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message
        self.status = status


class ShuttingDown(TetherError):
    """The server is shutting down: a publish is refused before anything is published."""


class BackplaneError(TetherError):
    """The backplane cannot be reached or refused an operation.

    `outcome_unknown`: a publish failed mid-call, so it may have happened; a
    retry with the same idempotency key is safe either way.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown
