"""Configuration, JSON logging and the shutdown lifecycle."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import orjson
import pytest

from tests.conftest import LogCapture
from tether import config, logs
from tether.config import Settings
from tether.errors import ConfigError
from tether.lifecycle import Lifecycle

# ---- configuration


def test_defaults_match_the_spec() -> None:
    s = config.load({})
    assert s == Settings()
    assert (s.port, s.host, s.log_level) == (4011, "127.0.0.1", "info")
    assert (s.heartbeat_interval_ms, s.heartbeat_missed, s.close_timeout_ms) == (30000, 2, 5000)
    assert (s.backpressure_high, s.backpressure_low, s.max_buffer) == (65536, 16384, 8388608)
    assert (s.max_message, s.history_size, s.redis_url, s.publish_token) == (
        65536, 1000, None, None)


def test_every_variable_parses_and_flags_win() -> None:
    env = {
        "PORT": "5000", "HOST": "localhost", "LOG_LEVEL": "WARN", "WS_HEARTBEAT_INTERVAL": "-1",
        "WS_HEARTBEAT_MISSED": "3", "WS_CLOSE_TIMEOUT": "100", "WS_BACKPRESSURE_HIGH": "2000",
        "WS_BACKPRESSURE_LOW": "1000", "WS_MAX_BUFFER": "4000", "WS_MAX_MESSAGE": "1024",
        "HISTORY_SIZE": "5", "REDIS_URL": "redis://127.0.0.1:6379/0", "PUBLISH_TOKEN": "t",
        "ALLOWED_ORIGINS": "https://a.example, https://b.example/",
    }
    s = config.load(env, {"PORT": "6000", "LOG_LEVEL": None})
    assert s.port == 6000 and s.log_level == "warn" and not s.heartbeat_enabled
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert (s.backpressure_high, s.backpressure_low, s.max_buffer, s.history_size) == (
        2000, 1000, 4000, 5)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"WS_HEARTBEAT_INTERVAL": "30s"}, "WS_HEARTBEAT_INTERVAL"),
        ({"WS_HEARTBEAT_MISSED": "0"}, "WS_HEARTBEAT_MISSED"),
        ({"WS_CLOSE_TIMEOUT": "-5"}, "WS_CLOSE_TIMEOUT"),
        ({"WS_BACKPRESSURE_LOW": "70000"}, "WS_BACKPRESSURE_LOW"),
        ({"WS_MAX_BUFFER": "100"}, "WS_MAX_BUFFER"),
        ({"WS_MAX_MESSAGE": "x"}, "WS_MAX_MESSAGE"),
        ({"HISTORY_SIZE": "-1"}, "HISTORY_SIZE"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"HOST": "0.0.0.0"}, "PUBLISH_TOKEN"),
        ({"ALLOWED_ORIGINS": "example.com"}, "ALLOWED_ORIGINS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(variable)


def test_bad_config_exits_2_with_one_line_naming_the_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "WS_HEARTBEAT_MISSED": "zero"}
    proc = subprocess.run([sys.executable, "-m", "tether", "serve"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "WS_HEARTBEAT_MISSED" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_bad_flag_exits_2_too() -> None:
    proc = subprocess.run([sys.executable, "-m", "tether", "serve", "--port", "-3"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "PORT" in proc.stderr


# ---- logging


def test_log_lines_are_one_json_object_with_module_and_data() -> None:
    stream = io.StringIO()
    logs.setup("info", stream)
    log = logs.get_logger("heartbeat")
    log.info("Starting heartbeat", intervalMs=30000)
    log.info("Heartbeat stopped")
    log.debug("Heartbeat tick", pinged=1)  # filtered at info
    log.warn("Closing stale connection", sessionId="s")
    lines = [orjson.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["message"] for x in lines] == [
        "Starting heartbeat", "Heartbeat stopped", "Closing stale connection"]
    assert lines[0]["module"] == "heartbeat" and lines[0]["level"] == "info"
    assert lines[0]["data"] == {"intervalMs": 30000}
    assert "data" not in lines[1]  # omitted when empty
    assert lines[2]["level"] == "warn"
    assert lines[0]["timestamp"].endswith("Z") and "T" in lines[0]["timestamp"]
    assert set(lines[0]) == {"timestamp", "level", "module", "message", "data"}


def test_level_filter_error_only() -> None:
    stream = io.StringIO()
    logs.setup("error", stream)
    log = logs.get_logger("x")
    log.warn("no")
    log.error("yes")
    assert [orjson.loads(x)["message"] for x in stream.getvalue().splitlines()] == ["yes"]
    assert not log.debug_enabled


# ---- lifecycle


async def test_handlers_run_highest_priority_first_errors_logged_rest_run(
    log_capture: LogCapture,
) -> None:
    ran: list[str] = []
    lc = Lifecycle()

    async def slow() -> None:
        await asyncio.sleep(0.01)
        ran.append("tmux-poller")

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("handler failed")

    lc.on_shutdown("http-server", lambda: ran.append("http-server"), 50)
    lc.on_shutdown("tmux-poller", slow, 60)
    lc.on_shutdown("boom", boom, 55)
    lc.on_shutdown("last", lambda: ran.append("last"), 0)
    assert await lc.shutdown("SIGINT") is True
    assert ran == ["tmux-poller", "boom", "http-server", "last"]
    assert log_capture.find("Shutdown initiated")[0]["data"] == {
        "signal": "SIGINT", "handlerCount": 4}
    assert log_capture.find("Shutdown handler failed")[0]["data"]["name"] == "boom"
    assert log_capture.find("Shutdown complete")
    assert await lc.shutdown("SIGINT") is True  # runs once
    assert ran.count("last") == 1


async def test_shutdown_timeout_returns_false(log_capture: LogCapture) -> None:
    lc = Lifecycle(timeout=0.05)
    lc.on_shutdown("stuck", lambda: asyncio.sleep(5), 10)
    assert await lc.shutdown("SIGTERM") is False
    assert log_capture.find("Shutdown timed out")
    assert not log_capture.find("Shutdown complete")
