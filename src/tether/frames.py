"""Server-to-client WebSocket frames, encoded once and written to many (RFC 6455 §5.2).

Frames from a server are never masked (§5.1), so the same bytes are valid on
every connection: a broadcast encodes its frame once and writes it to each
client's transport. Only uncompressed connections may receive these frames
(tether opens every WebSocket with permessage-deflate off).
"""

from __future__ import annotations

import struct

from tether import codes

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


def unmask_control(data: bytes | bytearray | memoryview, start: int, end: int) -> bytes:
    """The payload of the masked control frame at data[start:end] (§5.3)."""
    key = data[start + 2 : start + 6]
    return bytes(b ^ key[i & 3] for i, b in enumerate(data[start + 6 : end]))


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


class MaskCheck:
    """Follows a client's byte stream frame by frame, reading only the headers (RFC 6455 §5.2).

    aiohttp's parser accepts unmasked client frames; a server MUST close the
    connection on one (§5.1). And a control frame's length must fit the 7-bit
    field (§5.5: at most 125 bytes; §5.2: the minimal length encoding): a pong
    written with the 16- or 64-bit form would otherwise slip past aiohttp's check
    here, where whole pongs are taken out of the stream. `feed` reads only the
    frame headers (at most 14 bytes each), skips payloads by their length, and
    counts the frames, so that every frame kind can be held to a rate.
    """

    __slots__ = ("_head", "_skip", "error", "frames", "pongs")

    def __init__(self) -> None:
        self._head = bytearray()  # header bytes of the frame being read
        self._skip = 0  # payload bytes of the current frame still to pass over
        # (start, end) of each whole pong frame in the last chunk fed, so the
        # caller can answer it without the full parser (see server.py).
        self.pongs: list[tuple[int, int]] = []
        self.frames = 0  # frame headers read; the caller resets it
        self.error: tuple[int, str] | None = None  # close code and reason of a bad frame

    def lone_pong(self, data: bytes) -> int | None:
        """When `data` is exactly one masked pong with an 8-byte payload, that payload as an int.

        This is what a heartbeat round brings back from each client (our pings
        carry 8 bytes), so it is recognised before the general scan; the stream
        position does not move (the frame is whole). The caller counts the frame.
        """
        if (len(data) == 14 and data[0] == 0x8A and data[1] == 0x88
                and not self._skip and not self._head):
            return int.from_bytes(data[6:14], "big") ^ int.from_bytes(data[2:6] * 2, "big")
        return None

    def _bad(self, b1: int, b2: int) -> bool:
        """Whether a header starting with bytes b1, b2 is refused (sets `error`)."""
        if not b2 & 0x80:
            self.error = codes.UNMASKED_FRAME
            return True
        if b1 & 0x08 and b2 & 0x7F > 125:  # a control frame (opcode 0x8-0xF)
            self.error = codes.LONG_CONTROL_FRAME
            return True
        return False

    def feed(self, data: bytes | bytearray | memoryview) -> int | None:
        """Where the first refused frame starts in `data` (0 if in an earlier chunk), else None."""
        pos, end = 0, len(data)
        pongs = self.pongs
        if pongs:
            pongs.clear()
        while pos < end:
            if self._skip:  # inside a payload
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            if not self._head and end - pos >= 14:
                # Fast path: a whole header (at most 14 bytes) is in this chunk.
                b1, b2 = data[pos], data[pos + 1]
                if self._bad(b1, b2):
                    return pos
                self.frames += 1
                size = b2 & 0x7F
                if size == 126:
                    size, header = int.from_bytes(data[pos + 2 : pos + 4], "big"), 8
                elif size == 127:
                    size, header = int.from_bytes(data[pos + 2 : pos + 10], "big"), 14
                else:
                    header = 6
                if b1 == 0x8A and pos + header + size <= end:
                    pongs.append((pos, pos + header + size))  # FIN + pong, all here
                pos += header
                self._skip = size
                continue
            # Slow path: the header is cut by the end of the chunk.
            head = self._head
            start = pos - len(head)
            head.append(data[pos])
            pos += 1
            if len(head) < 2:
                continue
            if len(head) == 2:
                if self._bad(head[0], head[1]):
                    return max(0, start)
                self.frames += 1
            size = head[1] & 0x7F
            extra = 2 if size == 126 else 8 if size == 127 else 0
            if len(head) < 2 + extra + 4:  # length, then the 4-byte masking key
                continue
            if extra:
                size = int.from_bytes(head[2 : 2 + extra], "big")
            self._skip = size
            head.clear()
        return None
