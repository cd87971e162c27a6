"""An asyncio raw-socket WebSocket client for tests that misbehave on purpose.

Like `tests/wsraw.RawWS` (hand-written RFC 6455 framing), but on asyncio streams,
so hundreds of them run in one test without threads: send any frame (bad opcode,
RSV bits, unmasked, fragmented control, invalid UTF-8, oversize), flood, stop
reading, or open TCP and never finish the handshake.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import orjson

from tests.wsraw import Frame, encode, read_frame_async


def request(port: int, path: str = "/ws", headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


class Raw:
    """One raw WebSocket connection; `status` is the HTTP status of the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 status: int, head: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.head = head

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None,
                      rcvbuf: int | None = None, limit: int = 2**24,
                      timeout: float = 5.0) -> Raw:
        """Handshake; a small `limit` (and `rcvbuf`) makes a client that stops reading."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window is small too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        writer.write(request(port, path, headers))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        return cls(reader, writer, status, head)

    def send(self, opcode: int, payload: bytes, **kw: Any) -> None:
        self.writer.write(encode(opcode, payload, **kw))

    def send_json(self, obj: Any) -> None:
        self.send(0x1, orjson.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> Frame:
        return await asyncio.wait_for(read_frame_async(self.reader.readexactly), timeout)

    async def recv_data(self, timeout: float = 5.0) -> Frame:
        """The next text, binary or close frame (pings and pongs are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            f = await self.recv(max(0.01, deadline - loop.time()))
            if f.opcode not in (0x9, 0xA):
                return f

    async def recv_json(self, timeout: float = 5.0) -> Any:
        f = await self.recv_data(timeout)
        assert f.opcode == 0x1, f"expected text, got opcode {f.opcode} {f.payload[:80]!r}"
        return orjson.loads(f.payload)

    async def close_code(self, timeout: float = 5.0) -> tuple[int | None, list[Frame]]:
        """Read until the server's close frame: its code (None: dropped without one)."""
        seen: list[Frame] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                f = await self.recv(max(0.01, deadline - loop.time()))
                if f.opcode == 0x8:
                    return f.close_code, seen
                seen.append(f)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None, seen

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the TCP connection (EOF or reset) within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
            return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


async def open_tcp(port: int, data: bytes = b"") -> tuple[asyncio.StreamReader,
                                                           asyncio.StreamWriter]:
    """A TCP connection that sends `data` (maybe nothing) and then nothing more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
    return reader, writer


async def dropped(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server ends the connection within `timeout` without answering."""
    try:
        async with asyncio.timeout(timeout):
            got = await reader.read(65536)
        return got == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False
