"""Credentials never shown: URLs and error texts as logs, /health and HTTP bodies show them.

redis-py takes a password from a URL's user-info (`redis://user:pw@host`) and
from its query (`?password=pw`, and any other keyword such as `username`), so
both are hidden. A URL that does not parse is not shown at all beyond its
scheme. `redact_text` applies the same to every URL inside a free text (an
exception message), and removes the exact secrets it is given wherever they
appear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"

# Query parameters that carry a secret, and those that name whose it is (matched as
# substrings of the lower-cased name): `password`, `ssl_password`, `token`, ...;
# `username`. Both are masked in a URL; only secrets are searched for in texts.
_SECRET_NAMES = ("pass", "pwd", "secret", "token", "auth", "cred", "key")
_IDENTITY_NAMES = ("user",)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A URL in prose: up to a space or quote, and not its trailing punctuation.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]]")
_PAIR_IN_TEXT = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token)=[^\s&'\"]*[^\s&'\".,;:!?)\]]")


def _is_secret(name: str) -> bool:
    lowered = unquote(name).lower()
    return any(word in lowered for word in _SECRET_NAMES)


def _is_credential(name: str) -> bool:
    lowered = unquote(name).lower()
    return _is_secret(name) or any(word in lowered for word in _IDENTITY_NAMES)


def redact_url(url: str) -> str:
    """`url` with its password and query credentials replaced by `***`.

    `redis://u:pw@h:1/0?password=pw&db=0` → `redis://u:***@h:1/0?password=***&db=0`;
    user-info without a password is hidden whole (`redis://pw@h` is a password
    to many people); a URL that does not parse shows only its scheme.
    """
    match = _SCHEME.match(url)
    if match is None:
        return MASK
    scheme = match.group()[:-3]
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # a bad port or bracket: not a URL redis-py could use either
        return f"{scheme}://{MASK}"
    if "@" in parts.netloc:
        username = parts.username
        userinfo = f"{username}:{MASK}" if username and parts.password is not None else MASK
        host = f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = []
        for item in query.split("&"):
            name, sep, _ = item.partition("=")
            pairs.append(f"{name}={MASK}" if sep and _is_credential(name) else item)
        query = "&".join(pairs)
    shown = f"{scheme}://{host}{parts.path}"
    if query:
        shown += f"?{query}"
    if parts.fragment:  # never used by Redis; may hold the rest of a password with a '#'
        shown += f"#{MASK}"
    return shown


def url_secrets(url: str) -> tuple[str, ...]:
    """The secrets a URL carries (password, query credentials), as given and decoded."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        # User-info without a password is shown as a password would be: hidden.
        value = parts.password if parts.password is not None else parts.username
        if value:
            found.update((value, unquote(value)))
        for name, value in parse_qsl(parts.query):
            if _is_secret(name):
                found.add(value)
        for item in parts.query.split("&"):
            name, sep, value = item.partition("=")
            if sep and value and _is_secret(name):
                found.add(value)
    except ValueError:
        # Unparsable: everything after the scheme may be secret; hide it whole.
        rest = url.split("://", 1)[-1]
        if rest:
            found.add(rest)
    # Longest first, so that a secret containing another is removed whole.
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """A message (an exception's text) with URL credentials and the given secrets masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)
    return _PAIR_IN_TEXT.sub(lambda m: f"{m.group(1)}={MASK}", text)


def redact_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """An exception as one line for a log or /health: its text (or type), redacted."""
    return redact_text(str(exc) or type(exc).__name__, secrets)
