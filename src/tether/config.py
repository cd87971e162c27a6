"""Settings from environment variables and `tether serve` flags (SPEC §2).

Every variable is parsed and range-checked here. A bad value raises
`ConfigError` naming the variable; the CLI turns it into one line on stderr and
exit status 2. There is never a silent fallback to the default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tether import config_values as values
from tether.errors import ConfigError
from tether.idempotency import DEFAULT_WINDOW_MS
from tether.proxies import Network, parse_trusted

if TYPE_CHECKING:
    from tether.auth import PublicKey

LOG_LEVELS = values.LOG_LEVELS


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated configuration of one tether process.

    Durations are kept in milliseconds, as the variables give them; the hub
    converts them to seconds where it schedules work.
    """

    port: int = 4011
    host: str = "127.0.0.1"
    log_level: str = "info"
    log_format: str = "auto"
    heartbeat_interval_ms: int = 30_000
    heartbeat_missed: int = 2
    close_timeout_ms: int = 5_000
    backpressure_high: int = 65_536
    backpressure_low: int = 16_384
    max_buffer: int = 8_388_608
    max_message: int = 65_536
    history_size: int = 1_000
    redis_url: str | None = None
    idempotency_window_ms: int = DEFAULT_WINDOW_MS
    publish_token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    workers: int = 1
    max_connections: int = 10_000
    message_rate: int = 100
    ping_rate: int = 10
    handshake_timeout_ms: int = 10_000
    max_topics: int = 100
    max_per_address: int = 1_000
    frame_rate: int = 1_000
    auth_secret: str | None = None  # HS256 connection tokens (auth.py)
    auth_public_key: PublicKey | None = None  # RS256/ES256 connection tokens
    public_topics: tuple[str, ...] = ()  # topic patterns readable without a token
    admin_token: str | None = None  # bearer token of /api/connections, /metrics, full /health
    tls_cert: str | None = None  # PEM path: serve https:// and wss:// (with tls_key)
    tls_key: str | None = None
    event_loop: str = "auto"  # auto, uvloop or asyncio: the loop `tether serve` runs on (loops.py)

    @property
    def heartbeat_enabled(self) -> bool:
        return self.heartbeat_interval_ms > 0

    @property
    def auth_enabled(self) -> bool:
        """Every WebSocket client needs a token (but for PUBLIC_TOPICS)."""
        return self.auth_secret is not None or self.auth_public_key is not None

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def is_loopback(self) -> bool:
        return host_is_loopback(self.host)


def host_is_loopback(host: str) -> bool:
    """True when `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration variable: its env name, Settings field and parser."""

    env: str
    field: str
    parse: Callable[[str], Any]
    flag: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("PORT", "port", values.int_in(0, 65535), "--port",
           "HTTP + WebSocket port (0 = any free)"),
    Option("HOST", "host", values.host, "--host", "bind address"),
    Option("LOG_LEVEL", "log_level", values.level, "--log-level", "debug, info, warn, error"),
    Option("LOG_FORMAT", "log_format", values.log_format, "--log-format",
           "json, text, or auto (text on a terminal, JSON otherwise)"),
    Option(
        "WS_HEARTBEAT_INTERVAL",
        "heartbeat_interval_ms",
        values.int_in(None, 3_600_000),
        "--heartbeat-interval",
        "ms between pings to one client; <= 0 disables the heartbeat",
    ),
    Option(
        "WS_HEARTBEAT_MISSED",
        "heartbeat_missed",
        values.int_in(1, 100),
        "--heartbeat-missed",
        "unanswered pings in a row before a client is stale",
    ),
    Option(
        "WS_CLOSE_TIMEOUT",
        "close_timeout_ms",
        values.int_in(0, 600_000),
        "--close-timeout",
        "ms to wait for a close handshake before aborting",
    ),
    Option(
        "WS_BACKPRESSURE_HIGH",
        "backpressure_high",
        values.int_in(1),
        "--backpressure-high",
        "buffered bytes above which a client is paused",
    ),
    Option(
        "WS_BACKPRESSURE_LOW",
        "backpressure_low",
        values.int_in(0),
        "--backpressure-low",
        "buffered bytes below which a paused client resumes",
    ),
    Option(
        "WS_MAX_BUFFER",
        "max_buffer",
        values.int_in(1),
        "--max-buffer",
        "buffered bytes above which a client is closed as too slow (1013)",
    ),
    Option(
        "WS_MAX_MESSAGE",
        "max_message",
        values.int_in(16, 64 * 1024 * 1024),
        "--max-message",
        "largest inbound message or POST body in bytes",
    ),
    Option(
        "HISTORY_SIZE",
        "history_size",
        values.int_in(0, 10_000_000),
        "--history-size",
        "messages kept per topic for resume",
    ),
    Option("REDIS_URL", "redis_url", values.redis_url, "--redis-url",
           "use the Redis backplane (unset: the in-memory one)"),
    Option(
        "IDEMPOTENCY_WINDOW",
        "idempotency_window_ms",
        values.int_in(1_000, 604_800_000),
        "--idempotency-window",
        "ms a publish's Idempotency-Key is remembered (repeats are not delivered again)",
    ),
    Option(
        "PUBLISH_TOKEN",
        "publish_token",
        values.optional,
        "--publish-token",
        "bearer token required by POST /event (required when HOST is not loopback, unless "
        "AUTH_SECRET or AUTH_PUBLIC_KEY is set)",
    ),
    Option(
        "ALLOWED_ORIGINS",
        "allowed_origins",
        values.origins,
        "--allowed-origins",
        "comma list of Origins allowed to open a WebSocket (* = any; unset: the same origin "
        "and localhost pages)",
    ),
    Option(
        "TRUSTED_PROXIES",
        "trusted_proxies",
        parse_trusted,
        "--trusted-proxies",
        "comma list of proxy IPs/CIDRs whose X-Forwarded-For is believed (unset: none)",
    ),
    Option("TETHER_WORKERS", "workers", values.int_in(1, 64), "--workers", "processes on one port"),
    Option(
        "WS_MAX_CONNECTIONS",
        "max_connections",
        values.int_in(1, 1_000_000),
        "--max-connections",
        "WebSocket clients at once; more get 503 at upgrade",
    ),
    Option(
        "WS_MESSAGE_RATE",
        "message_rate",
        values.int_in(1, 1_000_000),
        "--message-rate",
        "inbound messages a second per client (then refused, then closed 1008)",
    ),
    Option(
        "WS_PING_RATE",
        "ping_rate",
        values.int_in(1, 100_000),
        "--ping-rate",
        "client ping and pong frames a second per client (extra ones are ignored)",
    ),
    Option(
        "WS_HANDSHAKE_TIMEOUT",
        "handshake_timeout_ms",
        values.int_in(100, 600_000),
        "--handshake-timeout",
        "ms a new TCP connection may take to send its request",
    ),
    Option(
        "WS_MAX_TOPICS",
        "max_topics",
        values.int_in(1, 100_000),
        "--max-topics",
        "topics one client may read at once (subscribe, ?topics=, ?since=, resume)",
    ),
    Option(
        "WS_MAX_PER_ADDRESS",
        "max_per_address",
        values.int_in(0, 1_000_000),
        "--max-per-address",
        "WebSocket clients from one address at once (0 = no limit); more get 429",
    ),
    Option(
        "WS_FRAME_RATE",
        "frame_rate",
        values.int_in(1, 10_000_000),
        "--frame-rate",
        "inbound frames a second per client, of every kind (a flood is closed 1008)",
    ),
    Option(
        "AUTH_SECRET",
        "auth_secret",
        values.auth_secret,
        "--auth-secret",
        "HS256 secret (>= 32 bytes) of connection tokens; set: every client needs a token",
    ),
    Option(
        "AUTH_PUBLIC_KEY",
        "auth_public_key",
        values.public_key,
        "--auth-public-key",
        "PEM file of the RSA (RS256) or EC P-256 (ES256) key that verifies connection tokens",
    ),
    Option(
        "PUBLIC_TOPICS",
        "public_topics",
        values.patterns,
        "--public-topics",
        "comma list of topic patterns anyone may read without a token (needs auth on)",
    ),
    Option(
        "ADMIN_TOKEN",
        "admin_token",
        values.optional,
        "--admin-token",
        "bearer token of /api/connections, /metrics and the full /health",
    ),
    Option("TLS_CERT", "tls_cert", values.tls_cert, "--tls-cert",
           "PEM certificate (chain) file: serve https:// and wss:// (needs TLS_KEY)"),
    Option("TLS_KEY", "tls_key", values.tls_key, "--tls-key",
           "PEM private key file of TLS_CERT, without a passphrase"),
    Option("EVENT_LOOP", "event_loop", values.event_loop, "--event-loop",
           "auto (uvloop where it imports, else asyncio's own loop), uvloop or asyncio"),
)


def default_text(option: Option) -> str:
    """The default of `option` as `tether serve --help` shows it: the Settings field's."""
    value = _DEFAULTS[option.field]
    if value is None or value == ():
        return "unset"
    return str(value)


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}


def load(env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None) -> Settings:
    """Build Settings from `env`, with `overrides` (keyed by env name) winning.

    Raises ConfigError naming the first variable that does not parse or whose
    value is out of range, or that conflicts with another.
    """
    values: dict[str, Any] = {}
    merged: dict[str, str] = {o.env: env[o.env] for o in OPTIONS if o.env in env}
    for name, raw in (overrides or {}).items():
        if raw is not None:
            merged[name] = raw
    for option in OPTIONS:
        if option.env not in merged:
            continue
        try:
            values[option.field] = option.parse(merged[option.env])
        except ValueError as exc:
            raise ConfigError(option.env, str(exc)) from None
    settings = Settings(**values)
    _check_relations(settings)
    return settings


def _check_relations(s: Settings) -> None:
    if s.backpressure_low > s.backpressure_high:
        raise ConfigError(
            "WS_BACKPRESSURE_LOW",
            f"must be <= WS_BACKPRESSURE_HIGH ({s.backpressure_high}), got {s.backpressure_low}",
        )
    if s.max_buffer < s.backpressure_high:
        raise ConfigError(
            "WS_MAX_BUFFER",
            f"must be >= WS_BACKPRESSURE_HIGH ({s.backpressure_high}), got {s.max_buffer}",
        )
    if s.auth_secret is not None and s.auth_public_key is not None:
        raise ConfigError(
            "AUTH_PUBLIC_KEY",
            "cannot be set with AUTH_SECRET: tokens are verified with one key (choose one)",
        )
    if s.public_topics and not s.auth_enabled:
        raise ConfigError(
            "PUBLIC_TOPICS",
            "needs AUTH_SECRET or AUTH_PUBLIC_KEY: without them every topic is public already",
        )
    if not s.is_loopback and not s.publish_token and not s.auth_enabled:
        raise ConfigError(
            "PUBLISH_TOKEN",
            f"is required when HOST is not a loopback address (HOST={s.host}), "
            "unless AUTH_SECRET or AUTH_PUBLIC_KEY is set",
        )
    if (s.tls_cert is None) != (s.tls_key is None):
        given, missing = ("TLS_CERT", "TLS_KEY") if s.tls_key is None else ("TLS_KEY", "TLS_CERT")
        raise ConfigError(missing, f"must be set with {given} (both PEM files, or neither)")
    if s.tls_cert is not None and s.tls_key is not None:
        from tether.tls import server_context

        server_context(s.tls_cert, s.tls_key)  # ConfigError when the key is not the cert's
    if s.workers > 1 and not s.redis_url:
        raise ConfigError("REDIS_URL", f"is required with --workers {s.workers} (> 1)")
