"""WebSocket close codes tether sends, and their reasons, in one place (RFC 6455 §7.4)."""

from __future__ import annotations

from enum import IntEnum


class Close(IntEnum):
    NORMAL = 1000  # §7.4.1: normal closure (also used for "Heartbeat timeout", as in SEED.md)
    GOING_AWAY = 1001  # §7.4.1: server going down
    PROTOCOL_ERROR = 1002  # §7.4.1: malformed frame
    UNSUPPORTED_DATA = 1003  # §7.4.1: binary where only text is accepted
    NO_STATUS = 1005  # §7.4.1: reserved, never sent: the client's close frame had no code
    ABNORMAL = 1006  # §7.4.1: reserved, never sent: the connection dropped with no close frame
    INVALID_DATA = 1007  # §7.4.1: invalid UTF-8 in a text message
    POLICY_VIOLATION = 1008  # §7.4.1: rate limits
    MESSAGE_TOO_BIG = 1009  # §7.4.1: inbound message over WS_MAX_MESSAGE
    INTERNAL_ERROR = 1011  # §7.4.1: unexpected condition
    TRY_AGAIN_LATER = 1013  # IANA registry: slow consumer, resume later
    # §7.4.2: 4000-4999 are for applications. tether's own (auth.py):
    TOKEN_EXPIRED = 4001  # the connection's token reached `exp`: fetch a fresh one, reconnect
    FORBIDDEN = 4003  # no token, or a bad one: retrying with the same token cannot help


REASONS: dict[Close, str] = {
    Close.NORMAL: "Normal closure",
    Close.GOING_AWAY: "Server shutting down",
    Close.PROTOCOL_ERROR: "Protocol error",
    Close.UNSUPPORTED_DATA: "Unsupported data",
    Close.INVALID_DATA: "Invalid UTF-8",
    Close.POLICY_VIOLATION: "Rate limit exceeded",
    Close.MESSAGE_TOO_BIG: "Message too big",
    Close.INTERNAL_ERROR: "Internal error",
    Close.TRY_AGAIN_LATER: "Too slow: buffer limit exceeded",
    Close.TOKEN_EXPIRED: "Token expired",
    Close.FORBIDDEN: "Forbidden",
}

HEARTBEAT_TIMEOUT = (Close.NORMAL, "Heartbeat timeout")
SHUTTING_DOWN = (Close.GOING_AWAY, REASONS[Close.GOING_AWAY])
SLOW_CONSUMER = (Close.TRY_AGAIN_LATER, REASONS[Close.TRY_AGAIN_LATER])
UNMASKED_FRAME = (Close.PROTOCOL_ERROR, "Protocol error: unmasked client frame")
LONG_CONTROL_FRAME = (Close.PROTOCOL_ERROR, "Protocol error: control frame length")
INVALID_CLOSE_CODE = (Close.PROTOCOL_ERROR, "Protocol error: invalid close code")
FLOODING = (Close.POLICY_VIOLATION, REASONS[Close.POLICY_VIOLATION])
INTERNAL = (Close.INTERNAL_ERROR, REASONS[Close.INTERNAL_ERROR])
TOKEN_EXPIRED = (Close.TOKEN_EXPIRED, REASONS[Close.TOKEN_EXPIRED])
FORBIDDEN = (Close.FORBIDDEN, REASONS[Close.FORBIDDEN])


class ClientClose(IntEnum):
    """Codes the browser client (static/tether.js) closes its own socket with.

    The server logs them in `WebSocket client disconnected`; they never collide
    with the server's codes above.
    """

    FORCE_RECONNECT = 4000  # forceReconnect(): a new connection at once
    LIVENESS_TIMEOUT = 4002  # its liveness ping went unanswered (SPEC §4)
    CONNECT_TIMEOUT = 4008  # the socket did not open and greet it within connectTimeout

# Codes a peer may put in a close frame (RFC 6455 §7.4.1, §7.4.2, and the IANA
# registry): 1004-1006 and 1015 are reserved and must never be sent, 1016-2999
# are reserved for future RFCs, 3000-4999 belong to libraries and applications,
# and nothing is defined below 1000 or from 5000 on.
_PEER_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def valid_close_code(code: int) -> bool:
    """Whether a client's close frame may carry `code` (else: close 1002)."""
    return code in _PEER_CODES or 3000 <= code <= 4999
