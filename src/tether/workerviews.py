"""`--workers N` seen as one server: the operator views gathered from every worker (SPEC §8, §9).

Without this, `GET /health`, `/metrics` and `/api/connections` answer from
whichever worker the kernel gave the connection, so each shows a share of the
clients. Here each worker also serves its own raw views on a unix socket in a
directory the supervisor made private (0700; no TCP port, the filesystem keeps
other users out), and the worker that got the request asks its siblings there,
all at once, waits at most `TIMEOUT`, and merges their answers with its own. A
worker that did not answer in time is named as such; the answer still comes.
Nothing here runs outside those three routes.

Merging: clients and counters are summed; uptime and event-loop lag are the
largest; settings every worker shares are kept; a text that differs between
workers (a process's own id) is left out; each worker's own document is listed
under `workers`. /metrics keeps every worker's samples apart, labelled
`worker="i"` (see `metrics.merge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from tether import metrics
from tether.logs import get_logger
from tether.workers import DIR_ENV, PARENT_ENV, WORKER_ENV

if TYPE_CHECKING:
    from tether.hub import Hub

log = get_logger("workers")

TIMEOUT = 1.0  # seconds a sibling has to answer: above a busy worker's stall, short for a person
MAX_RULES = frozenset({"uptime", "loop.lagMs", "loop.maxLagMs", "backplane.downMs"})
SAME_RULES = frozenset({"heartbeat.intervalMs", "heartbeat.missed"})  # settings: one value


@dataclass(frozen=True, slots=True)
class Missing:
    """A worker that gave no answer: why, in words."""

    error: str


Answers = dict[int, Any]  # worker index → its document, or Missing


def socket_path(directory: str, index: int) -> str:
    """Where worker `index` serves its views."""
    return os.path.join(directory, f"worker-{index}.sock")


def _merge(values: list[Any], path: str) -> Any:
    """One value for several workers' values at `path` (dotted); None to leave it out."""
    first = values[0]
    if isinstance(first, dict):
        out: dict[str, Any] = {}
        for key in dict.fromkeys(k for v in values if isinstance(v, dict) for k in v):
            inner = [v[key] for v in values if isinstance(v, dict) and key in v]
            merged = _merge(inner, f"{path}.{key}" if path else key)
            if merged is not None:
                out[key] = merged
        return out
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numbers and path in MAX_RULES:
        return max(values)
    if numbers and path not in SAME_RULES:
        return round(sum(values), 3) if any(isinstance(v, float) for v in values) else sum(values)
    if path == "backplane.status":  # the worst: one worker cut off from Redis is news
        return next((v for v in values if v != "up"), first)
    return first if all(v == first for v in values) else None


def _workers(answers: Answers, entry: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """The `workers` list: each worker's entry, or why it is missing."""
    out = []
    for index, answer in sorted(answers.items()):
        if isinstance(answer, Missing):
            out.append({"worker": index, "status": "unresponsive", "error": answer.error})
        else:
            out.append({"worker": index, **entry(answer)})
    return out


def merge_health(answers: Answers, answered_by: int, pid: int) -> dict[str, Any]:
    """The whole server's /health from each worker's (`pid`: the supervisor's, the server's).

    `status` is `shutting_down` once a worker is, else `degraded` while one did
    not answer, else `ok`; the totals are over the workers that answered.
    """
    docs = [a for a in answers.values() if not isinstance(a, Missing)]
    status = "ok"
    if any(d["status"] == "shutting_down" for d in docs):
        status = "shutting_down"
    elif len(docs) < len(answers):
        status = "degraded"
    totals = _merge([{k: v for k, v in d.items() if k not in ("status", "pid")} for d in docs], "")
    return {"status": status, "pid": pid, "worker": answered_by, **totals,
            "workers": _workers(answers, lambda doc: doc)}


def minimal_health(merged: dict[str, Any]) -> dict[str, Any]:
    """What a load balancer gets without the admin token: status, uptime, clients."""
    return {k: merged[k] for k in ("status", "uptime", "clients")}


def merge_connections(answers: Answers, answered_by: int) -> dict[str, Any]:
    """The whole server's /api/connections: every worker's list, each connection's `worker` said."""
    listed: list[dict[str, Any]] = []
    for index, answer in sorted(answers.items()):
        if not isinstance(answer, Missing):
            for conn in answer["connections"]:  # fresh dicts: labelled in place, not copied
                conn["worker"] = index
            listed.extend(answer["connections"])

    def worker(answer: dict[str, Any]) -> dict[str, Any]:
        return {"pid": answer["pid"], "status": answer["status"],
                "count": len(answer["connections"])}

    return {"count": len(listed), "worker": answered_by, "connections": listed,
            "workers": _workers(answers, worker)}


class WorkerViews:
    """One worker's side: serve its own views to its siblings, gather theirs when asked."""

    def __init__(self, hub: Hub, index: int, count: int, directory: str,
                 supervisor: int, timeout: float = TIMEOUT) -> None:
        self.hub = hub
        self.index = index
        self.count = count
        self.directory = directory
        self.supervisor = supervisor
        self.timeout = timeout
        self._runner: web.AppRunner | None = None
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    @classmethod
    def from_env(cls, hub: Hub) -> WorkerViews | None:
        """This worker's views when the `--workers` supervisor started it; else None."""
        directory = os.environ.get(DIR_ENV)
        index = os.environ.get(WORKER_ENV)
        count = hub.settings.workers
        if directory is None or index is None or count < 2:
            return None
        try:
            supervisor = int(os.environ.get(PARENT_ENV, ""))
        except ValueError:
            supervisor = os.getppid()
        return cls(hub, int(index), count, directory, supervisor)

    # ---- this worker's own views, on its socket

    async def start(self, _app: web.Application | None = None) -> None:
        """Serve this worker's views on its socket; never fails the worker (it logs why)."""
        for i in range(self.count):
            if i != self.index:
                connector = aiohttp.UnixConnector(socket_path(self.directory, i), force_close=True)
                self._sessions[i] = aiohttp.ClientSession(connector=connector)
        path = socket_path(self.directory, self.index)
        try:
            self._check_private()
            app = web.Application()
            app.router.add_get("/health", self._health)
            app.router.add_get("/connections", self._connections)
            app.router.add_get("/metrics", self._metrics)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            self._runner = runner
            await web.UnixSite(runner, path).start()
            os.chmod(path, 0o600)
        except OSError as exc:
            # The worker still serves its clients; its siblings show it as unresponsive.
            log.error("Worker views unavailable", worker=self.index, path=path,
                      error=exc.strerror or str(exc))

    def _check_private(self) -> None:
        """The directory is this user's alone (0700, not a link): else PermissionError."""
        info = os.lstat(self.directory)
        if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
                or info.st_mode & 0o077):
            raise PermissionError(f"{self.directory} is not a directory of this user's "
                                  "alone (0700)")

    async def stop(self, _app: web.Application | None = None) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.hub.health()), content_type="application/json")

    async def _connections(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self._own_connections()),
                            content_type="application/json")

    def _own_connections(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "status": "shutting_down" if self.hub.shutting_down else "ok",
                "connections": self.hub.connections()}

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.hub, str(self.index)),
                            content_type="text/plain")

    # ---- the whole server's views, for the public routes

    async def _ask(self, index: int, view: str) -> Any:
        """Sibling `index`'s raw `view`, or Missing."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._sessions[index].get(f"http://worker{index}/{view}") as reply:
                    if reply.status != 200:
                        return Missing(f"answered {reply.status}")
                    body = await reply.read()
        except TimeoutError:
            return Missing(f"no answer within {round(self.timeout * 1000)} ms")
        except (OSError, aiohttp.ClientError) as exc:
            return Missing(f"not reachable: {exc.__class__.__name__}")
        if view == "metrics":
            return body
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(body)
        return Missing("answered what is not JSON")

    async def _gather(self, view: str, own: Any) -> Answers:
        """Every worker's `view`: the siblings' asked at once, this worker's read after."""
        siblings = sorted(self._sessions)
        got = await asyncio.gather(*(self._ask(i, view) for i in siblings))
        answers: Answers = dict(zip(siblings, got, strict=True))
        answers[self.index] = own()
        return answers

    async def health(self) -> dict[str, Any]:
        """The whole server's /health document."""
        answers = await self._gather("health", self.hub.health)
        return merge_health(answers, self.index, self.supervisor)

    async def minimal_health(self) -> dict[str, Any]:
        """The whole server's /health without the admin token."""
        return minimal_health(await self.health())

    async def connections(self) -> dict[str, Any]:
        """The whole server's /api/connections document."""
        answers = await self._gather("connections", self._own_connections)
        return merge_connections(answers, self.index)

    async def metrics(self) -> bytes:
        """The whole server's /metrics page: every worker's samples, labelled by worker."""
        answers = await self._gather("metrics", lambda: metrics.render(self.hub, str(self.index)))
        pages = [a for _, a in sorted(answers.items()) if not isinstance(a, Missing)]
        up = {str(i): not isinstance(a, Missing) for i, a in sorted(answers.items())}
        return metrics.merge([*pages, metrics.workers_up(up)])
