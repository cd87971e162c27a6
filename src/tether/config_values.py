"""How each configuration variable's text becomes a value (the parsers of config.OPTIONS).

Each takes the raw string and returns the value, or raises ValueError with the
reason; `config.load` adds the variable's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tether.redact import redact_url

if TYPE_CHECKING:
    from tether.auth import PublicKey

LOG_LEVELS = ("debug", "info", "warn", "error")



def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if lo is not None and value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"must be <= {hi}, got {value}")
        return value

    return parse


def level(raw: str) -> str:
    value = raw.strip().lower()
    if value == "warning":
        value = "warn"
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


def log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("auto", "json", "text"):
        raise ValueError(f"must be one of auto, json, text, got {raw!r}")
    return value


def host(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def optional(raw: str) -> str | None:
    value = raw.strip()
    return value or None


def redis_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        # The value may hold a password: show it only as redacted.
        shown = redact_url(value)
        raise ValueError(f"must start with redis://, rediss:// or unix://, got {shown!r}")
    return value


def origins(raw: str) -> tuple[str, ...]:
    items = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in items:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"each origin must look like scheme://host[:port], got {origin!r}")
    return items


# The auth parsers import tether.auth (PyJWT, cryptography) only when the
# variable is set: `tether publish` and `tether watch` start without them.


def auth_secret(raw: str) -> str | None:
    from tether.auth import check_secret

    return check_secret(raw) if raw.strip() else None


def public_key(raw: str) -> PublicKey | None:
    from tether.auth import load_public_key

    return load_public_key(raw) if raw.strip() else None


def patterns(raw: str) -> tuple[str, ...]:
    from tether.auth import parse_patterns

    return parse_patterns(raw)


# TLS: each file is read and checked alone here (the error names its variable);
# config checks that the key is the certificate's.


def tls_cert(raw: str) -> str | None:
    from tether.tls import check_cert

    return check_cert(raw)


def tls_key(raw: str) -> str | None:
    from tether.tls import check_key

    return check_key(raw)


def event_loop(raw: str) -> str:
    # tether.loops imports asyncio (and tries uvloop): only when EVENT_LOOP is set.
    from tether.loops import parse

    return parse(raw)
