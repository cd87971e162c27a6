"""What `async for msg in client` reads: a bounded buffer of messages (SPEC §6, §7).

When it holds `size` messages, `put` waits for the reader, so the client stops
reading its connection: the server eventually drops a client that slow, and
resume catches up. The end of the client, and the error that stopped it if
any, come after the messages already held.
"""

from __future__ import annotations

import asyncio

from tether.client.logic import JSON

_END = object()


class Inbox:
    """The iterator's buffer: at most `size` messages, then the writer waits."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False  # the client is closing: the writer no longer waits
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, msg: JSON) -> None:
        """Add a message, after waiting for room (unless closed)."""
        while self.queue.qsize() >= self.size and not self.closed:
            self._room.clear()
            await self._room.wait()
        self.queue.put_nowait(msg)

    def close(self) -> None:
        """Release a writer waiting for room: the client is closing."""
        self.closed = True
        self._room.set()

    def fail(self, error: BaseException) -> None:
        """The reader gets `error` after the messages held."""
        self.queue.put_nowait(error)

    def end(self) -> None:
        """The reader stops after the messages held (StopAsyncIteration)."""
        self.queue.put_nowait(_END)

    async def get(self) -> JSON:
        """The next message; raises the error the client stopped with, then StopAsyncIteration."""
        item = await self.queue.get()
        if self.queue.qsize() < self.size:
            self._room.set()
        if item is _END:
            self.queue.put_nowait(_END)  # later calls end too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, dict)
        return item
