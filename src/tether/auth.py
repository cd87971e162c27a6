"""Who may read what: signed connection tokens, topic patterns and grants (pure, no I/O).

A connection token is a JWT (RFC 7519) that the application's backend signs:
HS256 with a shared secret (`AUTH_SECRET`), or RS256/ES256 with a private key
whose public half tether reads from a PEM file (`AUTH_PUBLIC_KEY`). Its claims:

    sub      required  the user: shown in /api/connections and the connect/disconnect logs
    exp      required  expiry, Unix seconds: the connection is closed 4001 at that time
    topics   optional  patterns of the topics the holder may read (default: none)
    publish  optional  patterns of the topics it may publish to with `POST /event`
    nbf, iat optional  not valid before (checked with LEEWAY seconds of clock skew)

Topic patterns, in a token and in `PUBLIC_TOPICS`:

    orders      exactly the topic `orders`
    user.42.*   every topic whose name starts with `user.42.` (a prefix and a final `*`)
    *           exactly the broadcast topic `*` (events published without a topic)
    **          every topic, the broadcast topic included

A `*` anywhere else (`a*b`, `*x`, `***`) is not a pattern and is refused, and
`message.check_topic` refuses topic names holding a `*` other than the broadcast
topic itself, so no name can be read two ways.

Verification takes `now` from the caller (the hub's clock), so expiry is tested
without sleeping: PyJWT checks the signature, the algorithm and that `sub` and
`exp` are present; the times are checked here against `now`. The allowed
algorithm is fixed by the configured key, never taken from the token
(RFC 8725 §2.1, §3.1): `none` and a key used with another algorithm are refused.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tether.errors import TetherError
from tether.message import BROADCAST_TOPIC, check_topic

EVERY_TOPIC = "**"
# A token is refused before any decoding past this size: a JWT with a few dozen
# patterns fits in 2 KB, and a URL line (for `?token=`) holds 8 KB in aiohttp.
MAX_TOKEN_BYTES = 8192
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
HMAC_MIN_BYTES = 32
MIN_RSA_BITS = 2048
# Clock skew allowed for `nbf` and `iat` (a backend whose clock runs a little ahead).
# `exp` gets none: the connection is closed at `exp`, so it must not be let in after it.
LEEWAY = 5.0
MAX_SUB_LENGTH = 200
HS256, RS256, ES256 = "HS256", "RS256", "ES256"


class AuthError(TetherError):
    """A token was refused. `expired`: it was valid once (close 4001, fetch a fresh one)."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


# ---------------------------------------------------------------- topic patterns


def check_pattern(pattern: object) -> str:
    """A topic pattern (see the module docstring), or ValueError saying why not."""
    if not isinstance(pattern, str):
        raise ValueError("a topic pattern must be a string")
    if pattern in (EVERY_TOPIC, BROADCAST_TOPIC):
        return pattern
    name = pattern[:-1] if pattern.endswith("*") else pattern
    if "*" in name:
        raise ValueError(
            f"bad topic pattern {pattern[:60]!r}: '*' may only end a prefix "
            "('user.42.*'), or be '*' (the broadcast topic) or '**' (every topic)")
    try:
        check_topic(name)
    except TetherError as exc:
        raise ValueError(f"bad topic pattern {pattern[:60]!r}: {exc}") from None
    return pattern


def parse_patterns(raw: str) -> tuple[str, ...]:
    """A comma list of patterns (`PUBLIC_TOPICS`, `tether token --topics`); ValueError."""
    return tuple(check_pattern(p.strip()) for p in raw.split(",") if p.strip())


class Patterns:
    """A set of topic patterns, matched in O(1) for exact names, O(prefixes) for the rest."""

    __slots__ = ("every", "exact", "prefixes", "source")

    def __init__(self, patterns: Iterable[object] = ()) -> None:
        self.source: tuple[str, ...] = tuple(dict.fromkeys(check_pattern(p) for p in patterns))
        self.every = EVERY_TOPIC in self.source
        self.exact = frozenset(p for p in self.source if p == BROADCAST_TOPIC or not
                               p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in self.source
                              if p.endswith("*") and p not in (BROADCAST_TOPIC, EVERY_TOPIC))

    def matches(self, topic: str) -> bool:
        if self.every or topic in self.exact:
            return True
        return any(topic.startswith(p) for p in self.prefixes)

    def __or__(self, other: Patterns) -> Patterns:
        return Patterns(self.source + other.source)

    def __bool__(self) -> bool:
        return bool(self.source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Patterns) and set(self.source) == set(other.source)

    def __hash__(self) -> int:
        return hash(frozenset(self.source))

    def __repr__(self) -> str:
        return f"Patterns({list(self.source)!r})"


NOTHING = Patterns()
EVERYTHING = Patterns([EVERY_TOPIC])


@dataclass(frozen=True, slots=True)
class Grant:
    """What one connection (or one publisher) may do: read and publish by topic pattern.

    `sub` is None for an anonymous reader of PUBLIC_TOPICS and on a server
    without auth; `exp` (Unix seconds) is None when nothing expires.
    """

    sub: str | None
    exp: float | None
    read: Patterns = field(default=NOTHING)
    publish: Patterns = field(default=NOTHING)

    def can_read(self, topic: str) -> bool:
        return self.read.matches(topic)

    def can_publish(self, topic: str) -> bool:
        return self.publish.matches(topic)

    @property
    def reads_broadcast(self) -> bool:
        return self.read.matches(BROADCAST_TOPIC)


# A server without AUTH_SECRET or AUTH_PUBLIC_KEY: every connection reads every topic.
OPEN = Grant(None, None, EVERYTHING, EVERYTHING)


def anonymous(public: Patterns) -> Grant:
    """A connection without a token, where PUBLIC_TOPICS lets it read some topics."""
    return Grant(None, None, public, NOTHING)


# ---------------------------------------------------------------- keys


def check_secret(raw: str) -> str:
    """An HS256 secret (`AUTH_SECRET`): at least HMAC_MIN_BYTES bytes; ValueError.

    The value is never part of the error: it is a secret.
    """
    value = raw.strip()
    size = len(value.encode())
    if size < HMAC_MIN_BYTES:
        raise ValueError(
            f"must be at least {HMAC_MIN_BYTES} bytes for HS256 (RFC 7518 §3.2), got {size}; "
            "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
    return value


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verified PEM public key (`AUTH_PUBLIC_KEY`) and the one algorithm it verifies."""

    path: str
    algorithm: str
    key: Any = field(compare=False, repr=False)


def load_public_key(path: str) -> PublicKey:
    """Read and check a PEM public key: RSA (>= 2048 bits) → RS256, EC P-256 → ES256.

    Raises ValueError with a one-line reason (the file, not its content).
    """
    path = path.strip()
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path!r} is not a PEM public key ({first[:120]})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path!r}: an RSA key needs at least {MIN_RSA_BITS} bits, "
                             f"got {key.key_size}")
        return PublicKey(path, RS256, key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path!r}: ES256 needs a P-256 (secp256r1) key, "
                             f"got {key.curve.name}")
        return PublicKey(path, ES256, key)
    raise ValueError(f"{path!r}: must be an RSA (RS256) or EC P-256 (ES256) public key, "
                     f"got {type(key).__name__}")


# ---------------------------------------------------------------- verification


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthError(f"claim {name!r} must be a number of seconds")
    return float(value)


def _patterns(claims: Mapping[str, Any], name: str) -> Patterns:
    value = claims.get(name)
    if value is None:
        return NOTHING
    if not isinstance(value, list):
        raise AuthError(f"claim {name!r} must be a list of topic patterns")
    try:
        return Patterns(value)
    except ValueError as exc:
        raise AuthError(f"claim {name!r}: {exc}") from None


class Verifier:
    """Checks connection tokens with one key and one algorithm; gives each token's Grant."""

    def __init__(self, key: Any, algorithm: str, public: Patterns = NOTHING) -> None:
        self.key = key
        self.algorithms = [algorithm]  # fixed by the key, never read from the token
        self.public = public

    @classmethod
    def hmac(cls, secret: str, public: Patterns = NOTHING) -> Verifier:
        return cls(check_secret(secret), HS256, public)

    @classmethod
    def public_key(cls, key: PublicKey, public: Patterns = NOTHING) -> Verifier:
        return cls(key.key, key.algorithm, public)

    def verify(self, token: object, now: float) -> Grant:
        """The Grant of a valid token at Unix time `now`, or AuthError.

        The holder reads its `topics` and PUBLIC_TOPICS, and publishes to `publish`.
        """
        if not isinstance(token, str) or not token:
            raise AuthError("token must be a non-empty string")
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            # Refused before decoding: its size or bytes alone say it is no JWT of ours.
            raise AuthError(f"token is not an ASCII string of at most {MAX_TOKEN_BYTES} bytes")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                # Times are checked below against the hub's clock, not PyJWT's.
                options={"require": ["sub", "exp"], "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_LENGTH or not sub.isprintable():
            raise AuthError(f"claim 'sub' must be printable text of 1 to {MAX_SUB_LENGTH} "
                            "characters")
        exp = _number(claims, "exp")
        assert exp is not None  # required above
        for name in ("nbf", "iat"):
            moment = _number(claims, name)
            if moment is not None and moment > now + LEEWAY:
                raise AuthError(f"token not yet valid ({name} is in the future)")
        read = _patterns(claims, "topics")
        publish = _patterns(claims, "publish")
        if exp <= now:
            raise AuthError("token expired", expired=True)
        return Grant(sub, exp, read | self.public, publish)


# ---------------------------------------------------------------- issuing


_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_ttl(raw: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `7d`, `500ms` → seconds (> 0); ValueError."""
    match = _TTL.match(raw)
    if match is None:
        raise ValueError(f"a duration looks like 90s, 15m, 1h or 7d, got {raw[:40]!r}")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= 10 * 366 * 86400:
        raise ValueError(f"a duration must be more than 0 and at most 10 years, got {raw!r}")
    return seconds


def issue_token(
    key: str | bytes | Any,
    *,
    sub: str,
    topics: Iterable[str] = (),
    ttl: float = 3600.0,
    publish: Iterable[str] = (),
    algorithm: str = HS256,
    now: float | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed connection token, for development and for backends written in Python.

    `key` is the AUTH_SECRET for HS256, or a PEM private key (or a
    `cryptography` private key) for RS256/ES256. `topics` and `publish` are
    topic patterns (see the module docstring), checked here; `ttl` is in
    seconds from `now` (default: the time now); `claims` adds or overrides any.

        token = issue_token(os.environ["AUTH_SECRET"], sub="alice",
                            topics=["orders", "user.42.*"], ttl=3600)
    """
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
        raise ValueError(f"sub must be a string of 1 to {MAX_SUB_LENGTH} characters")
    if not ttl > 0:
        raise ValueError("ttl must be more than 0 seconds")
    if algorithm == HS256:
        secret = key.decode() if isinstance(key, bytes) else key
        if not isinstance(secret, str):
            raise ValueError("HS256 needs the AUTH_SECRET string as its key")
        key = check_secret(secret)
    elif algorithm not in (RS256, ES256):
        raise ValueError(f"algorithm must be {HS256}, {RS256} or {ES256}, got {algorithm!r}")
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": sub,
        "iat": math.floor(issued),
        "exp": math.floor(issued + ttl),
        "topics": list(Patterns(topics).source),
    }
    granted = list(Patterns(publish).source)
    if granted:
        payload["publish"] = granted
    payload.update(claims or {})
    return jwt.encode(payload, key, algorithm=algorithm)
