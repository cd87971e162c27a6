"""Bytes from a client in, events out: the server side of RFC 6455 framing, with no I/O.

After the upgrade, every byte a client sends goes through one `FrameReader`
(sans-I/O, in the manner of python-websockets and h11): `feed(data)` returns the
events that data completed, in order, and says when the client broke the
protocol, with the close code that says how (this is the one place inbound
bytes are mapped to close codes):

* 1002 (protocol error): reserved bits set (no extension is negotiated, §5.2),
  an unknown opcode, an unmasked frame (§5.1), a control frame that is
  fragmented or longer than 125 bytes or whose length is not in the 7-bit
  field (§5.5), a continuation with no message, a new message inside a
  fragmented one (§5.4), a close frame with a 1-byte body or a code no
  endpoint may send (§7.4).
* 1007 (invalid data): a text message, or a close reason, that is not UTF-8
  (§8.1). Fragmented text is decoded as it arrives, so it fails at the first
  bad fragment, not at the end.
* 1009 (too big): a message (all its fragments) longer than `max_message`
  bytes; refused from the frame header, before its payload is buffered.

Events are tuples: (TEXT, str), (BINARY, bytes), (PING, bytes), (PONG, bytes),
(CLOSE, (code, reason)); a close frame with no code is reported as 1005. After a
close frame nothing more is read (§5.5.1: it is the client's last frame).
"""

from __future__ import annotations

import codecs
from typing import Any

from tether import codes

TEXT, BINARY, PING, PONG, CLOSE = 0x1, 0x2, 0x9, 0xA, 0x8
_CONTINUATION = 0x0

Event = tuple[int, Any]
Failure = tuple[int, str]

_UTF8 = codecs.getincrementaldecoder("utf-8")


def unmask(payload: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR `payload` with the 4-byte masking key repeated (§5.3), as one big-int operation."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class FrameReader:
    """One client's inbound frames, reassembled into messages and checked (see the module)."""

    __slots__ = ("_buf", "_decoder", "_op", "_parts", "_size", "closed", "failure", "frames",
                 "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        # Made when first needed: most clients never send a frame in pieces.
        self._buf: bytearray | None = None  # bytes of a frame not yet complete
        self._op = 0  # opcode of the fragmented message under way (0: none)
        self._parts: list[Any] | None = None  # its fragments: str (decoded as they came), bytes
        self._size = 0  # its bytes so far
        self._decoder: codecs.IncrementalDecoder | None = None
        self.frames = 0  # frame headers read; the caller resets it (for rate limits)
        self.failure: Failure | None = None  # set once the client broke the protocol
        self.closed = False  # the client's close frame was read (nothing more is)

    @property
    def at_boundary(self) -> bool:
        """No frame is half-read: the next byte starts a frame."""
        return not self._buf

    def lone_pong(self, data: bytes) -> int | None:
        """When `data` is exactly one masked pong with an 8-byte payload, that payload as an int.

        This is what a heartbeat round brings back from each client (tether's pings
        carry 8 bytes), so the caller tries it before `feed`: a pong then costs one
        call and two integer operations. Inside a frame under way the same bytes are
        data, so it answers only at a frame boundary.
        """
        if len(data) == 14 and data[0] == 0x8A and data[1] == 0x88 and not self._buf:
            return int.from_bytes(data[6:14], "big") ^ int.from_bytes(data[2:6] * 2, "big")
        return None

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes; after a failure or a close, nothing more is read."""
        if self.failure is not None or self.closed:
            return []
        buf = self._buf
        if buf:  # a frame under way: gather (a big one arrives in many reads)
            buf += data
            data = buf  # type: ignore[assignment]  # parsed in place, bytes or bytearray
        events: list[Event] = []
        pos, end = 0, len(data)
        while end - pos >= 2:
            b1, b2 = data[pos], data[pos + 1]
            n = b2 & 0x7F
            failure = self._header(b1, b2, n)  # refused as soon as its first 2 bytes are in
            if failure is not None:
                self.failure = failure
                return events
            head = 6 if n < 126 else 8 if n == 126 else 14
            if end - pos < head:
                break
            if n == 126:
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif n == 127:
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
            op = b1 & 0x0F
            if op < 8 and self._size + n > self.max_message:
                self.failure = (codes.Close.MESSAGE_TOO_BIG, "Message too big")
                return events
            if end - pos < head + n:
                break
            self.frames += 1
            payload = unmask(data[pos + head : pos + head + n], data[pos + head - 4 : pos + head])
            pos += head + n
            event = self._frame(op, bool(b1 & 0x80), payload)
            if self.failure is not None:
                return events
            if event is not None:
                events.append(event)
                if op == CLOSE:  # the client's last frame: what follows is ignored
                    self.closed = True
                    return events
        if buf is not None and data is buf:
            del buf[:pos]
        elif pos < end:
            if buf is None:
                self._buf = bytearray(data[pos:])
            else:
                buf += data[pos:]
        return events

    def _header(self, b1: int, b2: int, n: int) -> Failure | None:
        """What is wrong with a frame header, if anything (before its length is read)."""
        if b1 & 0x70:
            return (codes.Close.PROTOCOL_ERROR, "Protocol error: reserved bits set")
        if not b2 & 0x80:
            return codes.UNMASKED_FRAME
        op = b1 & 0x0F
        if op >= 8:
            if op not in (CLOSE, PING, PONG):
                return (codes.Close.PROTOCOL_ERROR, "Protocol error: unknown opcode")
            if not b1 & 0x80:
                return (codes.Close.PROTOCOL_ERROR, "Protocol error: fragmented control frame")
            if n > 125:
                return codes.LONG_CONTROL_FRAME
            return None
        if op not in (_CONTINUATION, TEXT, BINARY):
            return (codes.Close.PROTOCOL_ERROR, "Protocol error: unknown opcode")
        if op == _CONTINUATION and not self._op:
            return (codes.Close.PROTOCOL_ERROR, "Protocol error: continuation with no message")
        if op != _CONTINUATION and self._op:
            return (codes.Close.PROTOCOL_ERROR, "Protocol error: message inside a message")
        return None

    def _frame(self, op: int, fin: bool, payload: bytes) -> Event | None:
        """One whole, checked frame: an event, or None while a message is still in pieces."""
        if op in (PONG, PING):
            return (op, payload)
        if op == CLOSE:
            return self._close(payload)
        if op != _CONTINUATION:  # the first frame of a message
            if fin:  # the common case: the whole message in one frame
                if op == BINARY:
                    return (BINARY, payload)
                try:
                    return (TEXT, payload.decode("utf-8"))
                except UnicodeDecodeError:
                    self.failure = (codes.Close.INVALID_DATA, "Invalid UTF-8")
                    return None
            self._op = op
            self._decoder = _UTF8() if op == TEXT else None
        self._size += len(payload)
        parts = self._parts
        if parts is None:
            parts = self._parts = []
        if self._decoder is not None:
            try:
                parts.append(self._decoder.decode(payload, final=fin))
            except UnicodeDecodeError:
                self.failure = (codes.Close.INVALID_DATA, "Invalid UTF-8")
                return None
        else:
            parts.append(payload)
        if not fin:
            return None
        kind = self._op
        self._op, self._parts, self._size, self._decoder = 0, None, 0, None
        return (TEXT, "".join(parts)) if kind == TEXT else (BINARY, b"".join(parts))

    def _close(self, payload: bytes) -> Event | None:
        if not payload:  # no code: reported as 1005 (§7.4.1), never sent
            return (CLOSE, (codes.Close.NO_STATUS, ""))
        if len(payload) == 1:
            self.failure = (codes.Close.PROTOCOL_ERROR, "Protocol error: close frame of 1 byte")
            return None
        code = int.from_bytes(payload[:2], "big")
        if not codes.valid_close_code(code):
            self.failure = codes.INVALID_CLOSE_CODE
            return None
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self.failure = (codes.Close.INVALID_DATA, "Invalid UTF-8")
            return None
        return (CLOSE, (code, reason))
