"""The heartbeat end to end: dead peers (suspended, half-open), a stalled server, disabled.

Detection latencies are written to test-output/detection-latency.json; the closing
note of issue 2/7 quotes them (`pytest tests/test_heartbeat_e2e.py -k dead`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import LogCapture, StartTether
from tests.support import OUTPUT, ROOT, ServerProcess, open_fds, wait_until
from tests.wsraw import RawWS

INTERVAL_MS = 500
MISSED = 2


def log_time(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def record_latencies(name: str, latencies: list[float]) -> dict[str, float]:
    summary = {
        "n": len(latencies),
        "min_ms": round(min(latencies) * 1000, 1),
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "bound_ms": (MISSED + 1) * INTERVAL_MS,
    }
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / "detection-latency.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = summary
    path.write_text(json.dumps(data, indent=2))
    print(f"{name}: {summary}")
    return summary


def check_detection(name: str, stale: list[dict[str, Any]], died_at: float) -> None:
    """SPEC §4: closed within (K+1)·I of the last sign of life, and not before K·I.

    `missedMs` is measured by the server from the peer's last frame; the latency
    from the moment the test killed the peer is measured from the test's clock.
    """
    bound = (MISSED + 1) * INTERVAL_MS
    missed = [line["data"]["missedMs"] / 1000 for line in stale]
    from_death = [log_time(line) - died_at for line in stale]
    s1 = record_latencies(f"{name}: since last frame received", missed)
    s2 = record_latencies(f"{name}: since the peer died", from_death)
    # Closed within (K+1)·I of the death, and not before K·I of it: the closing
    # check sits mid-window, with one slot (10 ms here) of room on each side.
    assert s2["max_ms"] <= bound, s2
    assert s2["min_ms"] >= MISSED * INTERVAL_MS, s2
    assert s1["min_ms"] >= MISSED * INTERVAL_MS, s1
    # From the last frame received, too (the server's own measure, its own clock).
    assert s1["max_ms"] <= bound, s1
    for line in stale:
        assert line["level"] == "warn" and line["module"] == "heartbeat"
        assert line["data"]["lastPong"].endswith("Z")


class Peers:
    """`tests.peers` in its own process (optionally inside a network namespace)."""

    def __init__(self, url: str, n: int, netns: str | None = None) -> None:
        cmd = [sys.executable, "-m", "tests.peers", url, str(n)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.session_ids: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "READY":
                break
            self.session_ids.append(json.loads(line)["sessionId"])
        assert len(self.session_ids) == n, "peers did not connect"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL works on a stopped process too
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def healthy_client(url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse,
                                             str, asyncio.Task[None]]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(url)
    sid = (await ws.receive_json())["sessionId"]

    async def read() -> None:
        async for _ in ws:  # reading lets aiohttp answer every ping
            pass

    return session, ws, sid, asyncio.create_task(read())


async def test_dead_peers_suspended_are_closed_within_bound_and_fds_freed() -> None:
    server = ServerProcess(env={"WS_HEARTBEAT_INTERVAL": str(INTERVAL_MS),
                                "WS_HEARTBEAT_MISSED": str(MISSED), "LOG_LEVEL": "info"}).start()
    assert server.proc is not None
    pid = server.proc.pid
    peers: Peers | None = None
    session = None
    try:
        baseline = open_fds(pid)
        session, ws, healthy_sid, reader = await healthy_client(server.ws_url)
        peers = await asyncio.to_thread(Peers, server.ws_url, 100)
        assert wait_until(lambda: open_fds(pid) >= baseline + 101, 5)
        await asyncio.sleep(INTERVAL_MS / 1000 * 1.5)  # every peer has answered a ping
        stopped_at = time.time()
        os.kill(peers.proc.pid, signal.SIGSTOP)  # the kernel still ACKs: only a heartbeat sees
        bound = (MISSED + 1) * INTERVAL_MS / 1000
        await asyncio.to_thread(server.wait_for, "Closing stale connection", bound + 3, 100)
        stale = {x["data"]["sessionId"]: x for x in server.find("Closing stale connection")}
        assert set(stale) == set(peers.session_ids)  # all 100, and only them
        check_detection("suspended (SIGSTOP, 100 connections)", list(stale.values()), stopped_at)
        # Sockets freed at once: file descriptors back to baseline + the healthy one.
        assert wait_until(lambda: open_fds(pid) == baseline + 1, 2), (open_fds(pid), baseline)
        async with session.get(f"{server.url}/api/connections") as r:
            body = await r.json()
        assert [c["sessionId"] for c in body["connections"]] == [healthy_sid]
        assert body["connections"][0]["rttMs"] is not None
        assert not ws.closed
        gone = [x for x in server.find("WebSocket client disconnected")
                if x["data"]["sessionId"] == healthy_sid]
        assert gone == []
        reasons = {x["data"]["reason"] for x in server.find("WebSocket client disconnected")}
        assert reasons == {"Heartbeat timeout"}
        reader.cancel()
        await ws.close()
    finally:
        if peers is not None:
            peers.stop()
        if session is not None:
            await session.close()
        server.stop()


@contextlib.contextmanager
def network_namespace() -> Iterator[tuple[str, str, str]]:
    """A namespace joined to this one by a veth pair: (name, host address, peer address)."""
    tag = f"{os.getpid() % 100000}"
    ns, host_if, peer_if = f"tether{tag}", f"tth{tag}a", f"tth{tag}b"
    subnet = f"10.77.{os.getpid() % 250}"
    host_ip, peer_ip = f"{subnet}.1", f"{subnet}.2"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if],
        ["ip", "link", "set", peer_if, "netns", ns],
        ["ip", "addr", "add", f"{host_ip}/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{peer_ip}/24", "dev", peer_if],
        ["ip", "netns", "exec", ns, "ip", "link", "set", peer_if, "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(
                    "THIS MACHINE CANNOT CREATE NETWORK NAMESPACES, so the half-open dead-peer "
                    f"test cannot run (needs root with CAP_NET_ADMIN, and iproute2, which "
                    f"scripts/system-deps.sh installs): {' '.join(step)}: "
                    f"{done.stderr.strip()}", pytrace=False)
        yield ns, host_ip, peer_ip
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def established(port: int, peer_ip: str) -> int:
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if f"{peer_ip}:" in line)


def drop_all_packets(ns: str) -> None:
    rules = ("table inet blackhole {\n"
             " chain i { type filter hook input priority 0; policy drop; }\n"
             " chain o { type filter hook output priority 0; policy drop; }\n}\n")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True)


@pytest.mark.netns
async def test_dead_peer_half_open_in_network_namespace() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "THIS TEST NEEDS ROOT and this run is not root (uid "
            f"{os.geteuid()}): it makes a half-open connection by creating a network namespace "
            "and a veth pair (ip netns) and dropping their packets (nft), which needs root "
            "(CAP_NET_ADMIN). Run the suite as root (sudo make test), or leave this one test out: "
            "make test PYTEST_ARGS=\"-m 'not netns'\"", pytrace=False)
    with network_namespace() as (ns, host_ip, peer_ip):
        server = ServerProcess(env={
            "HOST": host_ip, "PUBLISH_TOKEN": "netns-test", "LOG_LEVEL": "info",
            "WS_HEARTBEAT_INTERVAL": str(INTERVAL_MS), "WS_HEARTBEAT_MISSED": str(MISSED),
        }).start()
        peers: Peers | None = None
        try:
            url = f"ws://{host_ip}:{server.port}/ws"
            peers = await asyncio.to_thread(Peers, url, 3, ns)
            assert established(server.port, peer_ip) == 3
            await asyncio.sleep(INTERVAL_MS / 1000 * 1.5)
            drop_all_packets(ns)  # from now on no FIN, no RST, nothing arrives
            dropped_at = time.time()  # nft has returned: the rules are in force
            await asyncio.sleep(0.3)
            assert established(server.port, peer_ip) == 3  # half-open: the OS sees nothing
            bound = (MISSED + 1) * INTERVAL_MS / 1000
            await asyncio.to_thread(server.wait_for, "Closing stale connection", bound + 3, 3)
            stale = [x for x in server.find("Closing stale connection")]
            assert {x["data"]["sessionId"] for x in stale} == set(peers.session_ids)
            check_detection("half-open (netns, packets dropped)", stale, dropped_at)
            assert wait_until(lambda: established(server.port, peer_ip) == 0, 1.0)
        finally:
            if peers is not None:
                peers.stop()
            server.stop()


async def test_blocked_loop_for_three_intervals_closes_no_healthy_client(
    start_tether: StartTether, log_capture: LogCapture
) -> None:
    interval = 0.2
    t = await start_tether(heartbeat_interval_ms=int(interval * 1000), heartbeat_missed=MISSED)
    peers = await asyncio.to_thread(Peers, f"ws://127.0.0.1:{t.port}/ws", 20)
    try:
        await asyncio.sleep(interval * 3)
        assert t.hub.heartbeat is not None
        pongs = t.hub.heartbeat.pongs
        assert pongs >= 20
        time.sleep(interval * 3)  # noqa: ASYNC251 - the point: block the server's event loop
        await asyncio.sleep(interval * 5)
        assert log_capture.find("Closing stale connection") == []
        assert len(t.hub.registry) == 20
        assert t.hub.heartbeat.pongs > pongs + 20  # the clients kept answering afterwards
        stalled = log_capture.find("Event loop stalled")
        assert stalled and stalled[0]["level"] == "warn"
        assert stalled[0]["data"]["lagMs"] >= interval * 1000 * 2
        assert t.hub.health()["loop"]["maxLagMs"] >= interval * 1000 * 2
    finally:
        peers.stop()


async def test_suspended_server_for_five_intervals_closes_no_healthy_client() -> None:
    server = ServerProcess(env={"WS_HEARTBEAT_INTERVAL": "200", "LOG_LEVEL": "info"}).start()
    peers = await asyncio.to_thread(Peers, server.ws_url, 20)
    try:
        await asyncio.sleep(0.6)
        server.signal(signal.SIGSTOP)
        await asyncio.sleep(1.0)  # 5·I with the server suspended
        server.signal(signal.SIGCONT)
        await asyncio.sleep(1.0)
        assert server.find("Closing stale connection") == []
        async with aiohttp.ClientSession() as s, s.get(f"{server.url}/health") as r:
            health = await r.json()
        assert health["clients"] == 20 and health["heartbeat"]["staleClosed"] == 0
        assert server.find("Event loop stalled")
    finally:
        peers.stop()
        server.stop()


async def test_inbound_messages_are_proof_of_life_without_pongs(start_tether: StartTether) -> None:
    t = await start_tether(heartbeat_interval_ms=100, heartbeat_missed=1)
    talker = await asyncio.to_thread(RawWS, "127.0.0.1", t.port)  # never answers a ping
    mute = await asyncio.to_thread(RawWS, "127.0.0.1", t.port)  # never says anything
    try:
        for _ in range(10):
            await asyncio.to_thread(talker.send_text, '{"type":"noop"}')
            await asyncio.sleep(0.05)
        assert len(t.hub.registry) == 1  # the mute one was reaped, the talker kept
        assert t.hub.heartbeat is not None and t.hub.heartbeat.stale_closed == 1
    finally:
        talker.close()
        mute.close()


async def test_client_pings_are_answered_and_rtt_is_reported(start_tether: StartTether) -> None:
    t = await start_tether(heartbeat_interval_ms=100)
    raw = await asyncio.to_thread(RawWS, "127.0.0.1", t.port)
    try:
        await asyncio.to_thread(raw.send_frame, 0x9, b"abc")
        frame = await asyncio.to_thread(raw.recv)
        while frame.opcode != 0xA:
            if frame.opcode == 0x9:  # answer the server's ping, echoing its payload
                assert len(frame.payload) == 8
                await asyncio.to_thread(raw.send_frame, 0xA, frame.payload)
            frame = await asyncio.to_thread(raw.recv)
        assert frame.payload == b"abc"
        ping = await asyncio.to_thread(raw.recv)
        while ping.opcode != 0x9:
            ping = await asyncio.to_thread(raw.recv)
        await asyncio.sleep(0.02)
        await asyncio.to_thread(raw.send_frame, 0xA, ping.payload)
        await asyncio.sleep(0.05)
        (info,) = t.hub.connections()
        assert info["rttMs"] is not None and info["rttMs"] >= 20
        assert info["lastPong"] is not None
        health = t.hub.health()["heartbeat"]
        assert health["pinged"] >= 1 and health["pongs"] >= 1 and health["staleClosed"] == 0
    finally:
        raw.close()


def test_disabled_heartbeat_sends_no_pings() -> None:
    server = ServerProcess(env={"WS_HEARTBEAT_INTERVAL": "0"}).start()
    try:
        assert server.find("Heartbeat disabled (interval <= 0)")
        assert server.find("Starting heartbeat") == []
        raw = RawWS("127.0.0.1", server.port)
        assert raw.recv().opcode == 0x1  # connected
        raw.sock.settimeout(0.6)
        with pytest.raises(TimeoutError):
            raw.recv()  # nothing at all: no ping frames
        raw.close()
    finally:
        server.stop()
    assert Path(server.log_path).exists()
