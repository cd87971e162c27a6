"""Log lines on top of the standard `logging` module (SPEC §3): JSON, or text for people.

JSON (the interface: files, pipes, `LOG_FORMAT=json`): one object per line,
{"timestamp", "level", "module", "message", "data"}; `data` is omitted when
empty. Text (a terminal, or `LOG_FORMAT=text`): one line per event, time, level
and module aligned, then the message and `data` as key=value pairs. Loggers are
module-scoped (`get_logger("heartbeat")`) and filtered by LOG_LEVEL. Each line is
flushed as it is written, so a log file read by an operator or a test is never
behind.

The libraries tether runs on log through the same handler, level and format:
aiohttp (`aiohttp.server`, `aiohttp.web`, `aiohttp.access`, `aiohttp.internal`)
and asyncio (`asyncio`, which also carries the event loop's exception handler).
Their `module` is the logger's name; a multi-line message keeps its first line as
`message` and the rest in `data.detail`; an exception is one line in
`data.error` (its type and message), never a traceback.

Repeated lines (`RepeatLimiter`): a flood of one error must not drown the log
(near the open-file limit asyncio logs `socket.accept() out of system resource`
on every loop pass). Every record except tether's own debug, info and warn lines
(which are an interface, counted by operators) is keyed by its logger and the
first line of its message template. Of each key, the first `burst` (5) records
of a `window` (10 s) are written and the rest only counted; once the window is
over, one line `Repeated log lines suppressed` at the same level, data `module`,
`message`, `count`, `windowMs`, says how many were left out. It is written before
the next line of the log, or when the handler closes (at exit).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import orjson

ROOT = "tether"
# The libraries whose own records join tether's log (their child loggers too).
FOREIGN = ("aiohttp", "asyncio")
SUPPRESSED = "Repeated log lines suppressed"
_MAX_TEXT = 300  # characters of a foreign detail or an error kept in a line
WARN = logging.WARNING
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "error": logging.ERROR}


def _one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) as one space, cut short."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


class JsonFormatter(logging.Formatter):
    """Formats a record as tether's one-line JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        ours = name.startswith(ROOT + ".")
        message = record.getMessage()
        data = getattr(record, "data", None)
        if not ours and "\n" in message:  # asyncio's exception handler: lines of context
            message, _, rest = message.partition("\n")
            data = {**(data or {}), "detail": _one_line("; ".join(rest.splitlines()))}
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "module": name[len(ROOT) + 1 :] if ours else name,
            "message": message,
        }
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:  # its type and message on one line, never the traceback
            data = dict(data or {})
            data["error"] = _one_line(f"{type(exc).__name__}: {exc}")
        if data:
            line["data"] = data
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """Formats a record as one line for a person: `12:03:04.120 warn  heartbeat  message  k=v`."""

    def __init__(self) -> None:
        super().__init__()
        self._json = JsonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        line = orjson.loads(self._json.format(record))
        stamp = line["timestamp"][11:23]  # hh:mm:ss.mmm (UTC)
        text = f"{stamp} {line['level']:<5} {line['module']:<10} {line['message']}"
        data = line.get("data")
        if data:
            text += "  " + " ".join(f"{k}={_plain(v)}" for k, v in data.items())
        return text


def _plain(value: Any) -> str:
    """A value of `data` as a person reads it: strings bare unless they hold spaces."""
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else repr(value)
    return orjson.dumps(value).decode()


@dataclass(slots=True)
class _Window:
    start: float
    level: int
    written: int = 0
    suppressed: int = 0


@dataclass(frozen=True, slots=True)
class Suppressed:
    """`count` records of one key were left out of the log in the window that ended."""

    logger: str
    message: str
    level: int
    count: int


class RepeatLimiter:
    """Decides which records of a run of identical ones are written (pure; injected clock).

    A key (logger name, first line of the message template) may write `burst`
    records per `window` seconds; the rest of that window are counted. `admit`
    says whether a record is written, and hands back the counts of windows that
    have ended, to be written first. At most `max_keys` keys are tracked: past
    that, windows that ended are forgotten, and a new key is let through untracked.
    """

    def __init__(self, burst: int = 5, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._windows: dict[tuple[str, str], _Window] = {}
        self._suppressing: set[tuple[str, str]] = set()  # keys with a count to report

    def admit(self, logger: str, message: str, level: int) -> tuple[bool, list[Suppressed]]:
        """Whether this record is written, and the counts to write before it."""
        now = self.clock()
        report = self.due(now)
        key = (logger, message)
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window:
            if window is None and len(self._windows) >= self.max_keys:
                self._forget(now)
                if len(self._windows) >= self.max_keys:
                    return True, report
            window = self._windows[key] = _Window(now, level)
        if window.written < self.burst:
            window.written += 1
            return True, report
        window.suppressed += 1
        window.level = max(window.level, level)
        self._suppressing.add(key)
        return False, report

    def due(self, now: float | None = None) -> list[Suppressed]:
        """The counts of windows that have ended (each reported once)."""
        if not self._suppressing:  # the common case, on every line written
            return []
        now = self.clock() if now is None else now
        ended = [k for k in self._suppressing if now - self._windows[k].start >= self.window]
        return [self._report(k) for k in ended]

    def drain(self) -> list[Suppressed]:
        """Every count not yet reported, ended or not (when the log closes)."""
        return [self._report(k) for k in list(self._suppressing)]

    def _report(self, key: tuple[str, str]) -> Suppressed:
        self._suppressing.discard(key)
        window = self._windows[key]
        count, window.suppressed = window.suppressed, 0
        return Suppressed(key[0], key[1], window.level, count)

    def _forget(self, now: float) -> None:
        for key in [k for k, w in self._windows.items()
                    if now - w.start >= self.window and k not in self._suppressing]:
            del self._windows[key]


def _limited(record: logging.LogRecord) -> bool:
    """Every record but tether's own debug, info and warn lines goes through the limiter."""
    return record.levelno >= logging.ERROR or not record.name.startswith(ROOT + ".")


class JsonHandler(logging.StreamHandler[IO[str]]):
    """Writes log lines (JSON unless told `text`) to a stream, leaving out repeats."""

    def __init__(self, stream: IO[str], limiter: RepeatLimiter, text: bool = False) -> None:
        super().__init__(stream)
        self.limiter = limiter
        self.setFormatter(TextFormatter() if text else JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        limiter = self.limiter
        if _limited(record):
            message = str(record.msg).partition("\n")[0]
            write, report = limiter.admit(record.name, message, record.levelno)
        else:
            write, report = True, limiter.due()
        for suppressed in report:
            self._report(suppressed)
        if write:
            super().emit(record)

    def close(self) -> None:
        stream = self.stream
        if stream is not None and not getattr(stream, "closed", False):
            for suppressed in self.limiter.drain():
                self._report(suppressed)
        super().close()

    def _report(self, s: Suppressed) -> None:
        record = logging.LogRecord(f"{ROOT}.logs", s.level, __file__, 0, SUPPRESSED, None, None)
        module = s.logger[len(ROOT) + 1 :] if s.logger.startswith(ROOT + ".") else s.logger
        record.data = {"module": module, "message": s.message, "count": s.count,
                       "windowMs": round(self.limiter.window * 1000)}
        super().emit(record)


class Logger:
    """A module-scoped logger: `log.info("Server ready", url=...)`.

    Keyword arguments become the `data` object. Callers on hot paths check
    `log.debug_enabled` first so that no dict is built for a filtered line.
    """

    __slots__ = ("_logger",)

    def __init__(self, module: str) -> None:
        self._logger = logging.getLogger(f"{ROOT}.{module}")

    @property
    def debug_enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.DEBUG)

    def _log(self, level: int, message: str, data: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, message, extra={"data": data}, stacklevel=3)

    def debug(self, message: str, **data: Any) -> None:
        self._log(logging.DEBUG, message, data)

    def info(self, message: str, **data: Any) -> None:
        self._log(logging.INFO, message, data)

    def warn(self, message: str, **data: Any) -> None:
        self._log(logging.WARNING, message, data)

    def error(self, message: str, **data: Any) -> None:
        self._log(logging.ERROR, message, data)

    def exception(self, message: str, **data: Any) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._logger.error(message, exc_info=True, extra={"data": data}, stacklevel=2)


def get_logger(module: str) -> Logger:
    """The logger of one module of tether (`module` appears in every line)."""
    return Logger(module)


FORMATS = ("auto", "json", "text")


def setup(level: str = "info", stream: IO[str] | None = None,
          limiter: RepeatLimiter | None = None, form: str = "json") -> None:
    """Send tether's logs and its libraries' to `stream` (stdout by default).

    `form`: "json", "text", or "auto" (text when the stream is a terminal).
    """
    stream = stream or sys.stdout
    text = form == "text" or (form == "auto" and stream.isatty())
    handler = JsonHandler(stream, limiter or RepeatLimiter(), text)  # flushes each line
    replaced: set[logging.Handler] = set()
    for name in (ROOT, *FOREIGN):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if name == ROOT or isinstance(old, JsonHandler):
                logger.removeHandler(old)
                replaced.add(old)
        logger.addHandler(handler)
        logger.setLevel(_LEVELS[level])
        logger.propagate = False  # not also to the root logger's handlers (plain text)
    for old in replaced:
        old.close()  # a JsonHandler writes the counts it has not reported yet
