"""tether's one exception hierarchy."""

from __future__ import annotations


class TetherError(Exception):
    """Base of every error tether raises on purpose."""


class ConfigError(TetherError):
    """A configuration variable does not parse, is out of range or conflicts."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable} {reason}")
        self.variable = variable
        self.reason = reason


class PublishError(TetherError):
    """A publish was refused; nothing was broadcast. `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BackplaneError(TetherError):
    """The backplane cannot be reached or refused an operation.

    `outcome_unknown`: a publish failed mid-call, so it may have happened; a
    retry with the same idempotency key is safe either way.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown
