"""Server-to-client WebSocket frames, encoded once and written to many (RFC 6455 §5.2).

(What clients send is read by `wire.py`.)

Frames from a server are never masked (§5.1), so the same bytes are valid on
every connection: a broadcast encodes its frame once and writes it to each
client's transport. Only uncompressed connections may receive these frames
(tether opens every WebSocket with permessage-deflate off).
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_FIN = 0x80


def frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """One final, unmasked frame carrying `payload` (§5.2 length encoding)."""
    n = len(payload)
    if n < 126:
        header = bytes((_FIN | opcode, n))
    elif n < 65536:
        header = struct.pack("!BBH", _FIN | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, n)
    return header + payload


def text(payload: bytes) -> bytes:
    """A text frame; `payload` must be UTF-8 (JSON from orjson always is)."""
    return frame(OP_TEXT, payload)


def binary(payload: bytes) -> bytes:
    """A binary frame."""
    return frame(OP_BINARY, payload)


def ping(payload: bytes) -> bytes:
    """A ping frame (§5.5.2); control payloads are at most 125 bytes."""
    if len(payload) > 125:
        raise ValueError("a control frame payload is at most 125 bytes (§5.5)")
    return frame(OP_PING, payload)


PING8_HEAD = bytes((_FIN | OP_PING, 8))  # the header of a ping with an 8-byte payload


def pong(payload: bytes | bytearray) -> bytes:
    """The pong that answers a ping, echoing its payload (§5.5.3)."""
    return frame(OP_PONG, bytes(payload[:125]))


def close(code: int, reason: str) -> bytes:
    """A close frame with a status code and a reason of at most 123 bytes (§5.5.1)."""
    body = struct.pack("!H", code) + reason.encode()[:123]
    return frame(OP_CLOSE, body)
