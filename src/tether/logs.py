"""JSON log lines on top of the standard `logging` module (SPEC §3).

One object per line: {"timestamp", "level", "module", "message", "data"}; `data`
is omitted when empty. Loggers are module-scoped (`get_logger("heartbeat")`) and
filtered by LOG_LEVEL. Each line is flushed as it is written, so a log file read
by an operator or a test is never behind.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

ROOT = "tether"
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


class JsonFormatter(logging.Formatter):
    """Formats a record as tether's one-line JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        module = name[len(ROOT) + 1 :] if name.startswith(ROOT + ".") else name
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "module": module,
            "message": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if record.exc_info and record.exc_info[1] is not None:
            data = dict(data or {})
            data["error"] = repr(record.exc_info[1])
        if data:
            line["data"] = data
        return orjson.dumps(line, default=str).decode()


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


def setup(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send tether's logs, as JSON lines, to `stream` (stdout by default)."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)  # flushes after every record
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    root.propagate = False
    # aiohttp's access log would be plain text among our JSON lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
