"""Log lines for people on a terminal, JSON for everything else (LOG_FORMAT)."""

from __future__ import annotations

import io
import os
import pty

import orjson
import pytest

from tether import config, logs
from tether.errors import ConfigError


def _log_lines(form: str, stream: io.TextIOBase) -> None:
    logs.setup("info", stream, form=form)  # type: ignore[arg-type]
    log = logs.get_logger("heartbeat")
    log.warn("Closing stale connection", sessionId="s-1", missedMs=2003, note="two words")
    log.info("Heartbeat stopped")


def test_text_lines_align_level_and_module_and_show_data_as_key_value() -> None:
    stream = io.StringIO()
    _log_lines("text", stream)
    first, second = stream.getvalue().splitlines()
    assert first[12:] == (" warn  heartbeat  Closing stale connection  "
                          "sessionId=s-1 missedMs=2003 note='two words'")
    assert first[2] == first[5] == ":" and first[8] == "."  # hh:mm:ss.mmm
    assert second[12:] == " info  heartbeat  Heartbeat stopped"


def test_json_stays_the_interface_when_not_a_terminal() -> None:
    stream = io.StringIO()
    _log_lines("auto", stream)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "Closing stale connection"
    assert lines[0]["data"] == {"sessionId": "s-1", "missedMs": 2003, "note": "two words"}
    assert set(lines[1]) == {"timestamp", "level", "module", "message"}


def test_auto_writes_text_on_a_terminal() -> None:
    main, side = pty.openpty()
    try:
        with open(side, "w", closefd=False) as terminal:
            _log_lines("auto", terminal)  # type: ignore[arg-type]
            terminal.flush()
        out = os.read(main, 4096).decode()
        assert "warn  heartbeat  Closing stale connection  sessionId=s-1" in out
        assert "{" not in out
    finally:
        logs.setup("info", io.StringIO())
        os.close(main)
        os.close(side)


def test_log_format_is_checked_like_every_variable() -> None:
    assert config.load({"LOG_FORMAT": "TEXT"}).log_format == "text"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be one of auto, json, text"):
        config.load({"LOG_FORMAT": "yaml"})
