"""TLS without a proxy: TLS_CERT/TLS_KEY serve https:// and wss:// on one port.

The test makes its own CA and server certificate (for 127.0.0.1 and localhost);
clients trust that CA only: aiohttp and `Client(ssl=)` with `tls.client_context`, `tether watch
--ca-file`, `tether publish --ca-file`, and Chromium through the SPKI hash of
the server's key. The configuration errors are one line naming the variable.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import LogCapture
from tests.support import ROOT, ServerProcess
from tests.test_watch_publish import CLEAN_ENV, WatchProcess, tether
from tether import config
from tether.app import Tether
from tether.client import Client
from tether.config import Settings
from tether.errors import ConfigError
from tether.tls import client_context
from tether.tools import publish_event

# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    """PEM files the test made: a CA, and server certificates it signed."""

    ca: Path
    cert: Path  # 127.0.0.1 and localhost, signed by the CA
    key: Path
    other_cert: Path  # the same names, another key (not in Chromium's SPKI list)
    other_key: Path
    encrypted_key: Path  # `key`, with a passphrase
    spki: str  # base64 SHA-256 of `cert`'s SubjectPublicKeyInfo (Chromium's flag)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    crypt: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt)


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name("tether test server")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def make_certs(folder: Path) -> Certs:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tether test CA")).issuer_name(_name("tether test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cert, other_cert = _server_cert(ca_key, ca, key, now), _server_cert(ca_key, ca, other, now)
    pem = serialization.Encoding.PEM
    files = {
        "ca": ca.public_bytes(pem), "cert": cert.public_bytes(pem), "key": _pem_key(key),
        "other_cert": other_cert.public_bytes(pem), "other_key": _pem_key(other),
        "encrypted_key": _pem_key(key, b"passphrase"),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return Certs(**{name: folder / f"{name}.pem" for name in files},
                 spki=base64.b64encode(hashlib.sha256(spki).digest()).decode())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def tls_env(certs: Certs, **more: str) -> dict[str, str]:
    return {"TLS_CERT": str(certs.cert), "TLS_KEY": str(certs.key), **more}


@pytest.fixture(scope="module")
def server(certs: Certs) -> Iterator[ServerProcess]:
    """`tether serve` with TLS; a new TCP connection has 1 s for its TLS handshake."""
    with ServerProcess(env=tls_env(certs, WS_HANDSHAKE_TIMEOUT="1000")) as server:
        yield server


def https(server: ServerProcess, host: str = "localhost") -> str:
    return f"https://{host}:{server.port}"


# ---------------------------------------------------------------- the server


def test_server_ready_says_https_and_wss(server: ServerProcess) -> None:
    ready = server.find("Server ready")[0]["data"]
    assert ready["url"] == https(server)
    assert ready["health"] == f"{https(server)}/health"
    assert ready["ws"] == f"wss://localhost:{server.port}/ws"
    assert not server.find("Serving without TLS on a non-loopback address")


async def test_wss_and_https_with_a_client_trusting_the_ca(
    server: ServerProcess, certs: Certs
) -> None:
    ctx = client_context(str(certs.ca))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"wss://127.0.0.1:{server.port}/ws?topics=tls",
                                      ssl=ctx) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "connected"
            status, reply = await publish_event(https(server, "127.0.0.1"),
                                                {"type": "sealed", "topic": "tls"}, ssl=ctx)
            assert status == 202, reply
            got = await ws.receive_json(timeout=5)
            assert got == {"type": "sealed", "topic": "tls", "seq": reply["seq"]}
            tls = ws.get_extra_info("ssl_object")
            assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
        async with session.get(f"{https(server)}/health", ssl=ctx) as res:
            assert res.status == 200 and (await res.json())["status"] == "ok"
        # The system's CAs do not know the test's CA: the certificate is checked.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{https(server)}/health", ssl=client_context())


async def test_the_python_client_over_wss_with_a_private_ca(
    server: ServerProcess, certs: Certs
) -> None:
    ctx = client_context(str(certs.ca))
    async with Client(f"wss://localhost:{server.port}/ws", topics=["py"], ssl=ctx) as client:
        await client.wait_connected(timeout=5)
        reply = await client.publish({"type": "from-python"}, topic="py")  # over https
        async with asyncio.timeout(5):
            got = await anext(client)
        assert got == {"type": "from-python", "topic": "py", "seq": reply["seq"]}


async def test_plain_http_on_the_tls_port_gets_nothing_and_the_server_stays(
    server: ServerProcess, certs: Certs
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()  # the TLS layer refuses it and closes
    writer.close()
    await writer.wait_closed()
    assert b"HTTP/1.1 200" not in answer
    async with aiohttp.ClientSession() as session, session.get(
            f"{https(server)}/health", ssl=client_context(str(certs.ca))) as res:
        assert res.status == 200
    assert "Traceback" not in server.text()


async def test_a_silent_connection_is_dropped_after_the_handshake_timeout(
    server: ServerProcess,
) -> None:
    # asyncio's own TLS handshake timeout is 60 s; WS_HANDSHAKE_TIMEOUT (1 s here) applies.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    elapsed = time.monotonic() - started
    writer.close()
    await writer.wait_closed()
    assert 0.8 < elapsed < 5, elapsed


# ---------------------------------------------------------------- tether watch and publish


def test_watch_and_publish_over_tls_with_a_ca_file(server: ServerProcess, certs: Certs) -> None:
    watch = WatchProcess(f"wss://localhost:{server.port}/ws", "--topics", "tls",
                         "--ca-file", str(certs.ca), "--count", "1")
    try:
        watch.wait_for("connected")
        sent = tether("publish", "--url", https(server), "--ca-file", str(certs.ca),
                      "--topic", "tls", '{"type":"over-https"}')
        assert sent.returncode == 0, sent.stderr
        seq = json.loads(sent.stdout)["seq"]
        assert watch.proc.wait(10) == 0
        got = json.loads(watch.wait_for("message").split(" ", 2)[2])
        assert got == {"type": "over-https", "topic": "tls", "seq": seq}
        # The server's wss:// URL publishes too (to https://.../event).
        again = tether("publish", "--url", f"wss://localhost:{server.port}/ws",
                       "--ca-file", str(certs.ca), "--topic", "tls", '{"type":"x"}')
        assert again.returncode == 0 and json.loads(again.stdout)["seq"] == seq + 1, again.stderr
    finally:
        watch.stop()


def test_an_untrusted_certificate_fails_at_once_and_says_why(
    server: ServerProcess, certs: Certs
) -> None:
    started = time.monotonic()
    sent = tether("publish", "--url", https(server), '{"type":"x"}')  # the system's CAs
    assert sent.returncode == 1
    assert "not trusted" in sent.stderr and "--ca-file" in sent.stderr, sent.stderr
    assert "attempt 1 of 5 failed" not in sent.stderr  # no retry: it cannot get better
    assert time.monotonic() - started < 5
    watch = WatchProcess(f"wss://localhost:{server.port}/ws", "--backoff", "0.1")
    try:
        failed = watch.wait_for("attempt")
        assert "attempt 1 failed" in failed and "CERTIFICATE_VERIFY_FAILED" in failed, failed
    finally:
        watch.stop()


def test_a_ca_file_that_cannot_be_read_is_exit_2(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    for args in (("watch", "wss://localhost:1/ws"), ("publish", "--url", "https://localhost:1",
                                                     '{"type":"x"}')):
        result = tether(*args, "--ca-file", str(missing))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"tether {args[0]}: --ca-file cannot be read (No such file or directory): {missing}")
    not_ca = tether("watch", "wss://localhost:1/ws", "--ca-file", str(certs.key))
    assert not_ca.returncode == 2 and "--ca-file is not a PEM CA certificate" in not_ca.stderr


# ---------------------------------------------------------------- Chromium


@pytest.mark.browser
def test_chromium_trusting_the_key_loads_the_dashboard_and_gets_an_event_over_wss(
    server: ServerProcess, certs: Certs
) -> None:
    from playwright.sync_api import Error, sync_playwright

    from tests.browser.conftest import ARGS, CHROMIUM

    other = ServerProcess(env={"TLS_CERT": str(certs.other_cert),
                               "TLS_KEY": str(certs.other_key)}).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=[*ARGS, f"--ignore-certificate-errors-spki-list={certs.spki}"])
            try:
                page = browser.new_page()
                loaded = page.goto(f"{https(server)}/")
                assert loaded is not None and loaded.status == 200
                page.evaluate("""async () => {
                    const { TetherClient } = await import("/tether.js");
                    window.got = [];
                    window.probe = new TetherClient({ topics: ["tls"] });
                    window.probe.on("message", (m) => window.got.push(m));
                    window.probe.connect();
                }""")
                page.wait_for_function("window.probe.state === 'connected'", timeout=10_000)
                sent = tether("publish", "--url", https(server), "--ca-file", str(certs.ca),
                              "--topic", "tls", '{"type":"to-chromium"}')
                assert sent.returncode == 0, sent.stderr
                page.wait_for_function("window.got.some(m => m.type === 'to-chromium')",
                                       timeout=10_000)
                assert page.evaluate("window.probe.url").startswith("wss://localhost:")
                # A certificate whose key is not in the list is refused: Chromium checks.
                with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
                    page.goto(f"{https(other)}/")
            finally:
                browser.close()
    finally:
        other.stop()


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("files", "variable", "says"),
    [
        ({"TLS_CERT": "cert"}, "TLS_KEY", "must be set with TLS_CERT"),
        ({"TLS_KEY": "key"}, "TLS_CERT", "must be set with TLS_KEY"),
        ({"TLS_CERT": "missing", "TLS_KEY": "key"}, "TLS_CERT",
         "cannot be read (No such file or directory)"),
        ({"TLS_CERT": "folder", "TLS_KEY": "key"}, "TLS_CERT", "cannot be read (Is a directory)"),
        ({"TLS_CERT": "key", "TLS_KEY": "key"}, "TLS_CERT", "is not a PEM certificate"),
        ({"TLS_CERT": "garbled", "TLS_KEY": "key"}, "TLS_CERT", "is not a valid PEM certificate"),
        ({"TLS_CERT": "cert", "TLS_KEY": "cert"}, "TLS_KEY", "is not a PEM private key"),
        ({"TLS_CERT": "cert", "TLS_KEY": "encrypted_key"}, "TLS_KEY", "is encrypted"),
        ({"TLS_CERT": "cert", "TLS_KEY": "other_key"}, "TLS_KEY",
         "is not the private key of the certificate in TLS_CERT"),
    ],
)
def test_tls_files_are_checked_and_an_error_names_the_variable(
    certs: Certs, tmp_path: Path, files: dict[str, str], variable: str, says: str
) -> None:
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    paths = {"missing": tmp_path / "missing.pem", "folder": tmp_path, "garbled": garbled}
    env = {name: str(paths.get(f) or getattr(certs, f)) for name, f in files.items()}
    with pytest.raises(ConfigError) as err:
        config.load(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(f"{variable} {says}"), str(err.value)


def test_good_tls_files_load(certs: Certs) -> None:
    s = config.load(tls_env(certs))
    assert s.tls_enabled and (s.tls_cert, s.tls_key) == (str(certs.cert), str(certs.key))
    assert not config.load({"TLS_CERT": " ", "TLS_KEY": ""}).tls_enabled  # empty = unset


def test_a_mismatched_key_stops_serve_with_one_line_and_exit_2(certs: Certs) -> None:
    env = {**CLEAN_ENV, "TLS_CERT": str(certs.cert), "TLS_KEY": str(certs.other_key)}
    proc = subprocess.run([sys.executable, "-m", "tether", "serve"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tether: configuration error: TLS_KEY "), lines


def test_settings_made_in_code_are_checked_too(certs: Certs) -> None:
    with pytest.raises(ConfigError) as err:
        Tether(Settings(tls_cert=str(certs.cert), tls_key=str(certs.other_key)))
    assert err.value.variable == "TLS_KEY"


# ---------------------------------------------------------------- the clear-text warning


async def test_start_up_warns_once_when_tokens_would_travel_in_clear(
    log_capture: LogCapture, certs: Certs
) -> None:
    warning = "Serving without TLS on a non-loopback address"

    async def started(**fields: Any) -> list[dict[str, Any]]:
        # HOST says where it would listen; the socket given stays on 127.0.0.1.
        sock = socket.create_server(("127.0.0.1", 0))
        t = Tether(Settings(port=0, **fields), sock=sock)
        await t.start()
        await t.stop("test-end")
        found = log_capture.find(warning)
        log_capture.truncate(0)
        log_capture.seek(0)
        return found

    clear = await started(host="0.0.0.0", publish_token="t")
    assert len(clear) == 1 and clear[0]["level"] == "warn"
    assert "PUBLISH_TOKEN" in str(clear[0]["data"]) and "TLS_CERT" in str(clear[0]["data"])
    assert await started(host="0.0.0.0", publish_token="t", tls_cert=str(certs.cert),
                         tls_key=str(certs.key)) == []
    assert await started() == []  # loopback
