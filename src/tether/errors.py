"""tether's one exception hierarchy."""

from __future__ import annotations

from enum import Enum


class TetherError(Exception):
    """Base of every error tether raises on purpose."""


class ConfigError(TetherError):
    """A configuration variable does not parse, is out of range or conflicts."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable} {reason}")
        self.variable = variable
        self.reason = reason


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
