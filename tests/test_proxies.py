"""TRUSTED_PROXIES and the client address behind a proxy (`tether.proxies`, the server's use).

The pure rule first (a table of peers and headers), then the server over real
sockets: the address `/api/connections` and the log lines show.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.aio import eventually
from tests.conftest import LogCapture, StartTether
from tether import config
from tether.errors import ConfigError
from tether.proxies import Network, client_address, parse_address, parse_trusted

LOOPBACK = parse_trusted("127.0.0.1")
LAN = parse_trusted("10.0.0.0/8, 192.168.1.1, 2001:db8:1::/48, ::1")


# ---- parsing TRUSTED_PROXIES


def test_trusted_proxies_parse_addresses_and_networks() -> None:
    nets = parse_trusted(" 127.0.0.1 , 10.0.0.0/8,,::1, 2001:db8::/32 ")
    assert [str(n) for n in nets] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "2001:db8::/32"]
    assert parse_trusted("") == () and parse_trusted(" , ") == ()


@pytest.mark.parametrize("raw", ["localhost", "10.0.0.5/24", "10.0.0.0/33", "*", "1.2.3",
                                 "127.0.0.1:80", "fe80::1/129"])
def test_bad_trusted_proxies_stop_startup_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load({"TRUSTED_PROXIES": f"127.0.0.1,{raw}"})
    assert err.value.variable == "TRUSTED_PROXIES"
    assert repr(raw) in str(err.value)


def test_default_trusts_no_proxy_and_the_flag_wins() -> None:
    assert config.load({}).trusted_proxies == ()
    s = config.load({"TRUSTED_PROXIES": "10.0.0.0/8"}, {"TRUSTED_PROXIES": "127.0.0.1"})
    assert s.trusted_proxies == LOOPBACK


# ---- one address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:5123", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("::ffff:192.0.2.9", "192.0.2.9"),  # a dual-stack socket's view of an IPv4 peer
        ("", None),
        ("unknown", None),  # RFC 7239's unknown / obfuscated nodes are no address
        ("_hidden", None),
        ("example.com", None),
        ("203.0.113.7:", None),
        ("203.0.113.7:http", None),
        ("203.0.113.7:1234567", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("[203.0.113.7", None),
        ("1.2.3.4.5", None),
        ("999.1.1.1", None),
        ("203.0.113.7 198.51.100.1", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    address = parse_address(text)
    assert (None if address is None else str(address)) == expected


# ---- the walk


@pytest.mark.parametrize(
    ("peer", "header", "trusted", "expected"),
    [
        # No proxy trusted (the default): the header is ignored, whatever it says.
        ("127.0.0.1", ["203.0.113.7"], (), "127.0.0.1"),
        ("198.51.100.2", ["203.0.113.7"], (), "198.51.100.2"),
        # A spoofed header from a peer that is not a trusted proxy is ignored.
        ("198.51.100.2", ["203.0.113.7"], LOOPBACK, "198.51.100.2"),
        ("198.51.100.2", ["127.0.0.1"], LOOPBACK, "198.51.100.2"),
        ("10.0.0.3", ["203.0.113.7, 10.0.0.2"], LOOPBACK, "10.0.0.3"),
        # A trusted peer: the address it appended.
        ("127.0.0.1", ["203.0.113.7"], LOOPBACK, "203.0.113.7"),
        ("127.0.0.1", [], LOOPBACK, "127.0.0.1"),  # no header: the proxy itself
        # The client's own header is kept by nginx ($proxy_add_x_forwarded_for) and
        # sits left of the address nginx appended: only the rightmost untrusted counts.
        ("127.0.0.1", ["6.6.6.6, 198.51.100.2"], LOOPBACK, "198.51.100.2"),
        ("127.0.0.1", ["6.6.6.6, 127.0.0.1, 198.51.100.2"], LOOPBACK, "198.51.100.2"),
        # Chains of trusted proxies are walked through.
        ("10.0.0.1", ["203.0.113.7, 192.168.1.1, 10.2.3.4"], LAN, "203.0.113.7"),
        ("10.0.0.1", ["6.6.6.6, 203.0.113.7, 192.168.1.1, 10.2.3.4"], LAN, "203.0.113.7"),
        # Several header lines are one list, in order (RFC 9110 §5.3).
        ("10.0.0.1", ["6.6.6.6", "203.0.113.7, 10.2.3.4"], LAN, "203.0.113.7"),
        ("10.0.0.1", ["203.0.113.7", "10.2.3.4"], LAN, "203.0.113.7"),
        # Every hop trusted: the leftmost is the client (inside a trusted network).
        ("10.0.0.1", ["10.9.9.9, 10.2.3.4"], LAN, "10.9.9.9"),
        # Malformed entries stop the walk at the nearest hop a trusted proxy vouches for.
        ("10.0.0.1", ["6.6.6.6, unknown, 10.2.3.4"], LAN, "10.2.3.4"),
        ("10.0.0.1", ["6.6.6.6, garbage"], LAN, "10.0.0.1"),
        ("10.0.0.1", ["6.6.6.6,,10.2.3.4"], LAN, "10.2.3.4"),
        ("10.0.0.1", ["203.0.113.7,"], LAN, "10.0.0.1"),
        ("10.0.0.1", [""], LAN, "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.7:5123"], LAN, "203.0.113.7"),
        # IPv6 peers, entries and networks; IPv4-mapped peers; no cross-family match.
        ("::1", ["2001:db8:2::5"], LAN, "2001:db8:2::5"),
        ("::1", ["[2001:db8:2::5]:443, 2001:db8:1::9"], LAN, "2001:db8:2::5"),
        ("2001:db8:1::1", ["203.0.113.7"], LAN, "203.0.113.7"),
        ("2001:db8:2::1", ["203.0.113.7"], LAN, "2001:db8:2::1"),
        ("::ffff:127.0.0.1", ["203.0.113.7"], LOOPBACK, "203.0.113.7"),
        ("::ffff:10.0.0.1", ["::ffff:203.0.113.7"], LAN, "203.0.113.7"),
        ("::ffff:198.51.100.2", ["203.0.113.7"], LOOPBACK, "::ffff:198.51.100.2"),
        ("::127.0.0.1", ["203.0.113.7"], LOOPBACK, "::127.0.0.1"),  # compatible, not mapped
        # A peer that is no IP address (a Unix socket) is never a trusted proxy.
        ("", ["203.0.113.7"], LOOPBACK, ""),
        (None, ["203.0.113.7"], LOOPBACK, None),
    ],
)
def test_client_address_walk(peer: str | None, header: list[str],
                             trusted: tuple[Network, ...], expected: str | None) -> None:
    assert client_address(peer, header, trusted) == expected


def test_a_long_header_of_trusted_hops_is_walked_once() -> None:
    header = ", ".join(["10.0.0.7"] * 700 + ["203.0.113.7"] + ["10.0.0.8"] * 700)
    assert client_address("10.0.0.1", [header], LAN) == "203.0.113.7"


# ---- the server over real sockets


async def open_ws(port: int, source: str, xff: str | None, origin: str | None = None) -> tuple[
        aiohttp.ClientSession, aiohttp.ClientWebSocketResponse | None, int, str]:
    """A WebSocket from the local address `source` with an X-Forwarded-For header.

    Returns the HTTP session (to close), the WebSocket (None when refused), the
    status and the session id from the greeting.
    """
    headers = {} if xff is None else {"X-Forwarded-For": xff}
    if origin is not None:
        headers["Origin"] = origin
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))
    try:
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return session, None, exc.status, ""
    greeting = await ws.receive_json()
    return session, ws, 101, str(greeting["sessionId"])


async def remotes(port: int) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/api/connections") as r:
        body = await r.json()
    return sorted(c["remote"] for c in body["connections"])


async def no_clients(port: int) -> bool:
    return not await remotes(port)


async def test_server_believes_x_forwarded_for_only_from_a_trusted_proxy(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(trusted_proxies=parse_trusted("127.0.0.1"))
    opened = [
        await open_ws(t.port, "127.0.0.1", "6.6.6.6, 203.0.113.7"),  # a trusted proxy
        await open_ws(t.port, "127.0.0.3", "203.0.113.8"),  # a client that spoofs
        await open_ws(t.port, "127.0.0.4", None),  # a plain client
    ]
    try:
        assert await remotes(t.port) == ["127.0.0.3", "127.0.0.4", "203.0.113.7"]
        logged = sorted(r["data"]["remote"] for r in log_capture.find("WebSocket client connected"))
        assert logged == ["127.0.0.3", "127.0.0.4", "203.0.113.7"]
    finally:
        for session, ws, _, _ in opened:
            if ws is not None:
                await ws.close()
            await session.close()


async def test_without_trusted_proxies_the_header_is_ignored(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether()
    session, ws, _, _ = await open_ws(t.port, "127.0.0.1", "203.0.113.7")
    try:
        assert await remotes(t.port) == ["127.0.0.1"]
        assert log_capture.find("WebSocket client connected")[0]["data"]["remote"] == "127.0.0.1"
    finally:
        assert ws is not None
        await ws.close()
        await session.close()


async def test_refusal_log_lines_name_the_forwarded_client(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    t = await start_tether(trusted_proxies=parse_trusted("127.0.0.1"), max_connections=1)
    refused = []
    session, ws, _, _ = await open_ws(t.port, "127.0.0.1", "203.0.113.7")
    try:
        for source in ("127.0.0.1", "127.0.0.5"):
            s, _, status, _ = await open_ws(t.port, source, "198.51.100.4")
            await s.close()
            refused.append(status)
        assert ws is not None
        await ws.close()
        await session.close()
        assert await eventually(lambda: no_clients(t.port), 2, interval=0.02)
        for source in ("127.0.0.1", "127.0.0.5"):
            s, _, status, _ = await open_ws(t.port, source, "198.51.100.9",
                                         origin="https://evil.example")
            await s.close()
            refused.append(status)
    finally:
        await session.close()
    assert refused == [503, 503, 403, 403]
    limit = [r["data"]["remote"] for r in log_capture.find("Connection refused, limit reached")]
    origin = [r["data"]["remote"] for r in log_capture.find("WebSocket origin refused")]
    assert limit == ["198.51.100.4", "127.0.0.5"]
    assert origin == ["198.51.100.9", "127.0.0.5"]
