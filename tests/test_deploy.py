"""The files in deploy/ agree with the code they configure.

nginx itself runs deploy/nginx.conf in tests/test_proxy.py; these check the numbers
and names the files hold against tether's own.
"""

from __future__ import annotations

import re

from tests.support import ROOT
from tether import config
from tether.lifecycle import SHUTDOWN_TIMEOUT

DEPLOY = ROOT / "deploy"


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[unit]


def test_env_example_is_a_valid_configuration() -> None:
    env = {}
    for line in (DEPLOY / "tether.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            assert any(o.env == name for o in config.OPTIONS), f"unknown variable {name}"
            env[name] = value
    s = config.load(env)
    assert s.trusted_proxies and s.redis_url and s.publish_token and not s.is_loopback


def test_systemd_unit_outwaits_the_shutdown_and_signals_only_the_main_process() -> None:
    unit = dict(
        line.split("=", 1) for line in (DEPLOY / "tether.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    # The supervisor of --workers waits SHUTDOWN_TIMEOUT + 5 s for its workers.
    assert seconds(unit["TimeoutStopSec"]) > SHUTDOWN_TIMEOUT + 5
    assert unit["KillSignal"] in ("SIGTERM", "SIGINT") and unit["KillMode"] == "mixed"
    assert unit["User"] != "root" and unit["Restart"] == "on-failure"
    assert int(unit["LimitNOFILE"]) > config.Settings().max_connections


def test_nginx_read_timeout_exceeds_the_heartbeat_interval() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    timeouts = re.findall(r"^\s*proxy_read_timeout\s+(\w+);", conf, re.M)
    assert timeouts, "deploy/nginx.conf sets no proxy_read_timeout"
    interval = config.Settings().heartbeat_interval_ms / 1000
    assert all(seconds(t) >= 2 * interval for t in timeouts), timeouts
