"""RFC 6455 framing for the tests, written once, and a minimal client on a plain socket.

`encode` makes a client frame; `decode_frame` reads a server frame sans I/O (it
asks for bytes and is given them), driven from a socket (`read_frame`), an
asyncio stream (`read_frame_async`) or bytes already written (`frames_in`).
`RawWS` is a deliberately minimal client for tests that need control the real
clients hide: stop reading, never answer pings, send bad frames, shrink the
receive buffer.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def text(self) -> str:
        return self.payload.decode()

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


def encode(opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One client frame (masked unless told otherwise, RFC 6455 §5.2)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    # XOR with the key repeated, in one big-int operation (fast for large payloads).
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


def decode_frame() -> Generator[int, bytes, Frame]:
    """One server frame (RFC 6455 §5.2): yields how many bytes it needs, is sent exactly those."""
    b1, b2 = yield 2
    n = b2 & 0x7F
    if n == 126:
        n = struct.unpack("!H", (yield 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", (yield 8))[0]
    if b2 & 0x80:
        raise AssertionError("a server must not mask frames (RFC 6455 §5.1)")
    payload = yield n
    return Frame(b1 & 0x0F, payload, bool(b1 & 0x80))


def read_frame(read_exactly: Callable[[int], bytes]) -> Frame:
    """The next frame, `read_exactly(n)` giving n bytes (or raising when there are none)."""
    decoder = decode_frame()
    need = next(decoder)
    try:
        while True:
            need = decoder.send(read_exactly(need))
    except StopIteration as done:
        return done.value


async def read_frame_async(read_exactly: Callable[[int], Awaitable[bytes]]) -> Frame:
    """`read_frame` for an asyncio stream (`StreamReader.readexactly`)."""
    decoder = decode_frame()
    need = next(decoder)
    try:
        while True:
            need = decoder.send(await read_exactly(need))
    except StopIteration as done:
        return done.value


def frames_in(data: bytes) -> list[Frame]:
    """Every frame in bytes a server wrote (one write may carry several frames)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise AssertionError(f"a frame cut short at byte {pos} of {len(data)}")
        pos += n
        return data[pos - n : pos]

    frames = []
    while pos < len(data):
        frames.append(read_frame(take))
    return frames


class RawWS:
    def __init__(self, host: str, port: int, path: str = "/ws", rcvbuf: int | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> Frame:
        return read_frame(self._read)

    def recv_data(self, timeout: float = 5.0) -> Frame:
        """The next non-control frame (pings and pongs are skipped, not answered)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            f = self.recv()
            if f.opcode not in (0x9, 0xA):
                return f

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
                   rsv: int = 0) -> None:
        self.sock.sendall(encode(opcode, payload, fin, mask, rsv))

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def close(self) -> None:
        self.sock.close()
