"""`tether serve --workers N`: N full hubs on one port, supervised by a parent (SPEC §8).

Each worker is an ordinary `tether serve` process on the Redis backplane; they
share the port through SO_REUSEPORT, so the kernel spreads new connections over
them. The parent holds no connections: it starts the workers, waits until each
is listening (a byte on a pipe, written by `ready()`), restarts one that dies,
and on SIGINT/SIGTERM forwards the signal once to each and waits for them.

The parent also makes a private directory (0700) for the workers' unix
sockets, on which each serves its own operator views to its siblings
(`workerviews.py`), and removes it when they are gone.

Workers run in their own process group, so a Ctrl+C in a terminal reaches the
parent only and each worker gets exactly one signal (a second one would force
its exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping

from tether import loops
from tether.config import Settings
from tether.errors import ListenError
from tether.lifecycle import SHUTDOWN_TIMEOUT
from tether.logs import get_logger

log = get_logger("workers")

WORKER_ENV = "TETHER_WORKER"  # set in each worker: its index
READY_FD_ENV = "TETHER_READY_FD"  # the pipe a worker writes to once it listens
PARENT_ENV = "TETHER_SUPERVISOR_PID"  # the supervisor's pid, as it set it
DIR_ENV = "TETHER_WORKER_DIR"  # the private directory of the workers' view sockets
START_TIMEOUT = 30.0
RESTART_DELAY = 1.0
PARENT_POLL = 0.5  # seconds between checks that the parent lives


def supervising(settings: Settings) -> bool:
    """True in the parent of `--workers N` (N > 1); False in a worker or a single process."""
    return settings.workers > 1 and WORKER_ENV not in os.environ


def ready() -> None:
    """Tell the supervising parent, if any, that this worker is listening."""
    raw = os.environ.pop(READY_FD_ENV, None)
    if raw is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fd = int(raw)
        os.write(fd, b"1")
        os.close(fd)


def watch_parent(stop: Callable[[str], None]) -> asyncio.Task[None] | None:
    """In a worker: stop when the supervising parent is gone (it was SIGKILLed)."""
    if WORKER_ENV not in os.environ:
        return None
    # The pid the supervisor wrote, not getppid() now: a supervisor killed right
    # after this worker said it was ready has already left it to pid 1.
    try:
        parent = int(os.environ[PARENT_ENV])
    except (KeyError, ValueError):
        parent = os.getppid()

    async def poll() -> None:
        while True:
            await asyncio.sleep(PARENT_POLL)
            if os.getppid() != parent:
                break
        log.error("Supervisor gone, stopping this worker", parent=parent)
        stop("supervisor-exit")

    return asyncio.create_task(poll(), name="watch-parent")


def run(settings: Settings, overrides: Mapping[str, str | None]) -> int:
    """Run the workers until a signal; the exit status (non-zero if one failed to start)."""
    # The parent holds no connection, so it stays on asyncio's own loop (uvloop's
    # subprocess_exec has no `process_group`); each worker runs on EVENT_LOOP's.
    return loops.run(Supervisor(settings, overrides).run(), "asyncio")


def reserve_port(host: str, port: int = 0) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on `port` (0: a free one), held by the parent.

    Workers bind the same port with SO_REUSEPORT; only listening sockets get
    connections, and holding this one keeps other programs off the port. A
    port taken by another program, or a HOST that is not this machine's, fails
    here, in the parent, as one error before any worker starts.
    """
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


class Worker:
    """One worker process and its readiness pipe."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, ready_fd: int) -> None:
        self.index = index
        self.proc = proc
        self.ready_fd = ready_fd

    async def wait_ready(self, timeout: float) -> bool:
        """True once the worker wrote its byte; False if it exited or timed out first."""
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bool] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(self.ready_fd)
            try:
                data = os.read(self.ready_fd, 1)
            except OSError:
                data = b""
            if not got.done():
                got.set_result(bool(data))

        loop.add_reader(self.ready_fd, readable)
        try:
            async with asyncio.timeout(timeout):
                return await got
        except TimeoutError:
            loop.remove_reader(self.ready_fd)
            return False
        finally:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)


class Supervisor:
    """Starts, watches and stops the workers of one `tether serve --workers N`."""

    def __init__(self, settings: Settings, overrides: Mapping[str, str | None]) -> None:
        self.settings = settings
        self.env = dict(os.environ)
        for name, raw in overrides.items():
            if raw is not None:
                self.env[name] = raw  # flags become the workers' environment
        self.workers: dict[int, Worker] = {}
        self.stopping: str | None = None
        self._stop = asyncio.Event()
        self._reserved: socket.socket | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        port = self.settings.port
        try:
            self._reserved = reserve_port(self.settings.host, port)
        except OSError as exc:
            error = ListenError.of(self.settings.host, port, exc)
            log.error("Cannot listen", host=error.host, port=error.port, error=error.reason)
            return 2
        directory = tempfile.mkdtemp(prefix="tether-workers-")  # 0700, this user's
        self.env[DIR_ENV] = directory
        try:
            port = int(self._reserved.getsockname()[1])
            self.env["PORT"] = str(port)
            log.info("Starting workers", count=self.settings.workers, port=port)
            started = await asyncio.gather(
                *(self._start(i) for i in range(self.settings.workers))
            )
            failed = [code for code in started if code is not None]
            if failed or self.stopping:
                await self._stop_all(signal.SIGTERM)
                return max(failed) if failed else 0
            log.info("Workers ready", count=len(self.workers), port=port,
                     pids=[w.proc.pid for w in self.workers.values()])
            return await self._supervise()
        except OSError as exc:
            log.error("Cannot start workers", host=self.settings.host, port=port, error=str(exc))
            await self._stop_all(signal.SIGTERM)
            return 2
        finally:
            if self._reserved is not None:
                self._reserved.close()
            shutil.rmtree(directory, ignore_errors=True)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping is not None:
            log.error("Second signal, forcing the workers' exit", signal=sig.name)
        self.stopping = sig.name
        for worker in self.workers.values():
            if worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)
        self._stop.set()

    async def _start(self, index: int) -> int | None:
        """Start worker `index` and wait until it listens; None, or its failing status."""
        read_fd, write_fd = os.pipe()
        env = {**self.env, WORKER_ENV: str(index), READY_FD_ENV: str(write_fd),
               PARENT_ENV: str(os.getpid())}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tether", "serve", env=env, pass_fds=(write_fd,),
                process_group=0,
            )
        finally:
            os.close(write_fd)
        worker = self.workers[index] = Worker(index, proc, read_fd)
        if await worker.wait_ready(START_TIMEOUT):
            log.debug("Worker ready", index=index, pid=proc.pid)
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        code = await proc.wait()
        if self.stopping:
            return None
        log.error("Worker failed to start", index=index, pid=proc.pid, status=code)
        # 2 is tether's "could not start" status, whatever the worker's own status
        # (asyncio may report 255 for a child it could not reap itself).
        return 2

    async def _supervise(self) -> int:
        """Until a signal: restart a worker that dies; then wait for all of them."""
        waits = {asyncio.ensure_future(w.proc.wait()): i for i, w in self.workers.items()}
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                done, _ = await asyncio.wait({stop, *waits}, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    if fut is stop:
                        continue
                    index = waits.pop(fut)
                    if self._stop.is_set():
                        continue
                    log.error("Worker exited, restarting it", index=index,
                              pid=self.workers[index].proc.pid, status=fut.result())
                    await asyncio.sleep(RESTART_DELAY)
                    if self._stop.is_set():
                        continue
                    code = await self._start(index)
                    if code is not None:
                        await self._stop_all(signal.SIGTERM)
                        return code
                    waits[asyncio.ensure_future(self.workers[index].proc.wait())] = index
        finally:
            stop.cancel()
            for fut in waits:
                fut.cancel()
        return await self._wait_all()

    async def _wait_all(self) -> int:
        """Wait for every worker after the signal; 0 when each shut down cleanly."""
        status = 0
        for worker in self.workers.values():
            try:
                code = await asyncio.wait_for(worker.proc.wait(), SHUTDOWN_TIMEOUT + 5)
            except TimeoutError:
                log.error("Worker did not stop, killing it", pid=worker.proc.pid)
                worker.proc.kill()
                code = await worker.proc.wait()
            if code != 0:
                status = 1
        log.info("Workers stopped", signal=self.stopping, status=status)
        return status

    async def _stop_all(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            if worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)
        for worker in self.workers.values():
            try:
                await asyncio.wait_for(worker.proc.wait(), SHUTDOWN_TIMEOUT + 5)
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
