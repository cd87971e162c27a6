"""Tokens and who may read what, without sockets (auth.py, access.py, issue 14).

Token verification and topic patterns are pure; the hub's auth states (access.py's
table) run on a manual clock that jumps to the deadline and to `exp`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.conftest import LogCapture
from tests.support import RecordingPeer
from tether import cli, config
from tether.auth import (
    EVERY_TOPIC,
    LEEWAY,
    MAX_TOKEN_BYTES,
    OPEN,
    AuthError,
    Grant,
    Patterns,
    Verifier,
    check_pattern,
    issue_token,
    load_public_key,
    parse_patterns,
    parse_ttl,
)
from tether.backplane.memory import MemoryBackplane
from tether.clock import ManualClock
from tether.config import Settings
from tether.errors import ConfigError, PublishError
from tether.hub import Hub
from tether.message import check_topic, prepare
from tether.outbox import Backpressure, Outbox, Writer
from tether.registry import Connection, Registry

SECRET = "s" * 52 + "-test-secret"  # 64 bytes: HS512 below signs with it too
OTHER = "o" * 64
NOW = 1_700_000_000.0


def mint(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    """A token with exactly `claims` (None removes one), valid for an hour from NOW by default."""
    payload: dict[str, Any] = {"sub": "alice", "exp": NOW + 3600, "topics": ["orders"]}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key,
                      algorithm=algorithm)


def refused(verifier: Verifier, token: object, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as err:
        verifier.verify(token, now)
    return err.value


# ---------------------------------------------------------------- topic patterns


def test_patterns_tell_every_topic_from_the_broadcast_topic() -> None:
    broadcast, every = Patterns(["*"]), Patterns([EVERY_TOPIC])
    assert broadcast.matches("*") and not broadcast.matches("orders")
    assert every.matches("*") and every.matches("orders") and every.matches("user.42.x")
    exact = Patterns(["orders"])
    assert exact.matches("orders") and not exact.matches("orders2") and not exact.matches("*")


def test_a_trailing_star_is_a_prefix() -> None:
    p = Patterns(["user.42.*", "news"])
    for topic in ("user.42.orders", "user.42.a.b", "user.42."):
        assert p.matches(topic), topic
    for topic in ("user.42", "user.420", "user.4", "*", "user.43.orders", "secrets"):
        assert not p.matches(topic), topic
    assert p.matches("news")


@pytest.mark.parametrize("bad", ["a*b", "*x", "***", "**x", "", " a", "a,b", "a\n", 7, None,
                                 "x" * 300 + "*"])
def test_malformed_patterns_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        check_pattern(bad)


def test_topic_names_cannot_be_read_as_patterns() -> None:
    for name in ("a*", "a*b", "**", "*a"):
        with pytest.raises(PublishError):
            check_topic(name)
        with pytest.raises(PublishError):
            prepare({"type": "x", "topic": name})
    assert check_topic("*") == "*"


def test_pattern_lists_parse_from_a_comma_string() -> None:
    assert parse_patterns(" orders, user.42.* ,*,") == ("orders", "user.42.*", "*")
    with pytest.raises(ValueError):
        parse_patterns("orders,a*b")


# ---------------------------------------------------------------- verification


def test_a_valid_token_gives_its_grant_with_the_public_topics() -> None:
    verifier = Verifier.hmac(SECRET, Patterns(["news"]))
    grant = verifier.verify(mint(topics=["orders", "user.42.*"], publish=["orders"]), NOW)
    assert grant.sub == "alice" and grant.exp == NOW + 3600
    assert grant.can_read("orders") and grant.can_read("user.42.x") and grant.can_read("news")
    assert not grant.can_read("secrets") and not grant.reads_broadcast
    assert grant.can_publish("orders") and not grant.can_publish("news")
    no_topics = verifier.verify(mint(topics=None), NOW)  # `topics` is optional: reads the public
    assert no_topics.can_read("news") and not no_topics.can_read("orders")
    assert not no_topics.can_publish("news")


def test_expired_tokens_are_refused_as_expired() -> None:
    verifier = Verifier.hmac(SECRET)
    err = refused(verifier, mint(exp=NOW))  # exp is the first instant it is invalid
    assert err.expired and "expired" in err.reason
    assert refused(verifier, mint(exp=NOW - 1)).expired
    # A fractional exp is a NumericDate too (RFC 7519 §2).
    assert verifier.verify(mint(exp=NOW + 0.5), NOW).exp == NOW + 0.5


def test_tokens_not_yet_valid_are_refused_beyond_the_leeway() -> None:
    verifier = Verifier.hmac(SECRET)
    for claim in ("nbf", "iat"):
        assert verifier.verify(mint(**{claim: NOW + LEEWAY}), NOW).sub == "alice"
        err = refused(verifier, mint(**{claim: NOW + LEEWAY + 1}))
        assert not err.expired and "not yet valid" in err.reason


def test_a_token_signed_with_another_key_is_refused() -> None:
    err = refused(Verifier.hmac(SECRET), mint(key=OTHER))
    assert not err.expired and "Signature verification failed" in err.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT assembled by hand: what an attacker sends, whatever PyJWT would refuse to sign."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if key is None:
        return signing + "."
    mac = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(mac)}"


CLAIMS = {"sub": "mallory", "exp": NOW + 3600, "topics": ["**"]}


def test_wrong_algorithms_are_refused_none_included() -> None:
    verifier = Verifier.hmac(SECRET)
    for alg in ("none", "None", "NONE"):
        assert "alg" in refused(verifier, handmade({"alg": alg, "typ": "JWT"}, CLAIMS, None)).reason
    assert "alg" in refused(verifier, mint(algorithm="HS512", **CLAIMS)).reason
    assert "alg" in refused(verifier, mint(algorithm="HS384", **CLAIMS)).reason


def rsa_pem(tmp_path: Path, bits: int = 2048) -> tuple[Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = tmp_path / f"rsa{bits}.pem"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, key


def ec_pem(tmp_path: Path, curve: ec.EllipticCurve | None = None) -> tuple[Path, Any]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    path = tmp_path / f"ec-{key.curve.name}.pem"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, key


def test_rs256_and_es256_verify_with_the_public_key_only(tmp_path: Path) -> None:
    rsa_path, rsa_key = rsa_pem(tmp_path)
    ec_path, ec_key = ec_pem(tmp_path)
    rs = Verifier.public_key(load_public_key(str(rsa_path)))
    es = Verifier.public_key(load_public_key(str(ec_path)))
    assert rs.algorithms == ["RS256"] and es.algorithms == ["ES256"]
    rs_token = issue_token(rsa_key, sub="alice", topics=["orders"], algorithm="RS256", now=NOW)
    es_token = issue_token(ec_key, sub="bob", topics=["*"], algorithm="ES256", now=NOW)
    assert rs.verify(rs_token, NOW).sub == "alice"
    assert es.verify(es_token, NOW).reads_broadcast
    refused(rs, es_token)  # another algorithm
    refused(es, rs_token)
    refused(rs, mint())  # HS256 with some secret
    (tmp_path / "other").mkdir()
    _, other_key = rsa_pem(tmp_path / "other")
    refused(rs, issue_token(other_key, sub="eve", algorithm="RS256", now=NOW))  # another key


def test_the_public_key_is_no_hmac_secret(tmp_path: Path) -> None:
    """Key confusion (RFC 8725 §2.1): HS256 signed with the public PEM as its secret."""
    path, _ = rsa_pem(tmp_path)
    forged = handmade({"alg": "HS256", "typ": "JWT"}, CLAIMS, path.read_bytes())
    assert "alg" in refused(Verifier.public_key(load_public_key(str(path))), forged).reason


@pytest.mark.parametrize("claims", [
    {"sub": None}, {"exp": None}, {"sub": ""}, {"sub": 42}, {"sub": "a\nb"}, {"sub": "x" * 201},
    {"exp": "tomorrow"}, {"exp": True}, {"exp": math.inf}, {"exp": math.nan},
    {"nbf": "soon"}, {"iat": [1]},
    {"topics": "orders"}, {"topics": ["a*b"]}, {"topics": [1]}, {"publish": "orders"},
    {"publish": ["x*y"]},
    {"aud": "another-service"},  # tether has no audience: a token meant for another is refused
])
def test_missing_or_malformed_claims_are_refused(claims: dict[str, Any]) -> None:
    verifier = Verifier.hmac(SECRET)
    if any(isinstance(v, float) and not math.isfinite(v) for v in claims.values()):
        payload = {**CLAIMS, **claims}
        token = handmade({"alg": "HS256", "typ": "JWT"}, payload, SECRET.encode())
    else:
        token = mint(**claims)
    err = refused(verifier, token)
    assert not err.expired


@pytest.mark.parametrize("token", [None, 42, b"bytes", "", "abc", "a.b.c", "a.b", "....",
                                   "é.é.é", "eyJhbGciOiJIUzI1NiJ9.e30", "x" * 100])
def test_malformed_tokens_are_refused(token: object) -> None:
    assert not refused(Verifier.hmac(SECRET), token).expired


def test_an_oversized_token_is_refused_before_decoding() -> None:
    verifier = Verifier.hmac(SECRET)
    big = mint(topics=[f"topic-{i}" for i in range(1200)])
    assert len(big) > MAX_TOKEN_BYTES
    err = refused(verifier, big)
    assert f"at most {MAX_TOKEN_BYTES} bytes" in err.reason  # the size check, not PyJWT
    assert f"at most {MAX_TOKEN_BYTES} bytes" in refused(verifier, "é" + mint()).reason
    fits = mint(topics=[f"topic-{i}" for i in range(400)])
    assert len(fits) <= MAX_TOKEN_BYTES and verifier.verify(fits, NOW).can_read("topic-399")


# ---------------------------------------------------------------- keys and configuration


def test_public_key_files_are_checked(tmp_path: Path) -> None:
    def reason(path: Path | str) -> str:
        with pytest.raises(ValueError) as err:
            load_public_key(str(path))
        return str(err.value)

    assert "cannot read" in reason(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    assert "not a PEM public key" in reason(tmp_path / "junk.pem")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "private.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert "not a PEM public key" in reason(tmp_path / "private.pem")
    weak, _ = rsa_pem(tmp_path, bits=1024)
    assert "at least 2048 bits" in reason(weak)
    p384, _ = ec_pem(tmp_path, ec.SECP384R1())
    assert "P-256" in reason(p384)
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    (tmp_path / "ed.pem").write_bytes(ed.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert "RSA (RS256) or EC P-256 (ES256)" in reason(tmp_path / "ed.pem")


def config_error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        config.load(env)
    return err.value


def test_auth_configuration_rows_and_relations(tmp_path: Path) -> None:
    err = config_error({"AUTH_SECRET": "short-secret"})
    assert err.variable == "AUTH_SECRET" and "32 bytes" in str(err)
    assert "short-secret" not in str(err)  # a secret is never shown
    assert config_error({"AUTH_PUBLIC_KEY": str(tmp_path / "nope.pem")}).variable == \
        "AUTH_PUBLIC_KEY"
    path, _ = rsa_pem(tmp_path)
    both = config_error({"AUTH_SECRET": SECRET, "AUTH_PUBLIC_KEY": str(path)})
    assert both.variable == "AUTH_PUBLIC_KEY" and "AUTH_SECRET" in str(both)
    assert config_error({"PUBLIC_TOPICS": "news"}).variable == "PUBLIC_TOPICS"  # needs auth
    assert config_error({"AUTH_SECRET": SECRET, "PUBLIC_TOPICS": "a*b"}).variable == \
        "PUBLIC_TOPICS"
    s = config.load({"AUTH_PUBLIC_KEY": str(path), "PUBLIC_TOPICS": "news, *",
                     "ADMIN_TOKEN": "adm", "HOST": "0.0.0.0"})  # tokens, not PUBLISH_TOKEN
    assert s.auth_enabled and s.auth_public_key is not None
    assert s.auth_public_key.algorithm == "RS256"
    assert s.public_topics == ("news", "*") and s.admin_token == "adm"
    assert config_error({"HOST": "0.0.0.0"}).variable == "PUBLISH_TOKEN"
    assert not config.load({}).auth_enabled


def test_a_bad_key_file_stops_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    (tmp_path / "bad.pem").write_text(pem)
    monkeypatch.setenv("AUTH_PUBLIC_KEY", str(tmp_path / "bad.pem"))
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tether: configuration error: AUTH_PUBLIC_KEY")


# ---------------------------------------------------------------- issuing


def test_issue_token_round_trips_and_checks_what_it_signs() -> None:
    token = issue_token(SECRET, sub="alice", topics=["orders", "user.42.*"], ttl=60,
                        publish=["orders"], now=NOW)
    grant = Verifier.hmac(SECRET).verify(token, NOW)
    assert grant == Grant("alice", NOW + 60, Patterns(["orders", "user.42.*"]),
                          Patterns(["orders"]))
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["iat"] == NOW and jwt.get_unverified_header(token)["alg"] == "HS256"
    with pytest.raises(ValueError):
        issue_token("short", sub="alice")
    with pytest.raises(ValueError):
        issue_token(SECRET, sub="alice", topics=["a*b"])
    with pytest.raises(ValueError):
        issue_token(SECRET, sub="")
    with pytest.raises(ValueError):
        issue_token(SECRET, sub="alice", ttl=0)


@pytest.mark.parametrize(("raw", "seconds"), [("90", 90), ("90s", 90), ("15m", 900),
                                              ("1h", 3600), ("7d", 604800), ("500ms", 0.5),
                                              ("1.5h", 5400)])
def test_ttls_parse(raw: str, seconds: float) -> None:
    assert parse_ttl(raw) == seconds


@pytest.mark.parametrize("raw", ["", "0", "-1h", "1w", "h", "1 hour", "99999d"])
def test_bad_ttls_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(raw)


def test_tether_token_mints_with_auth_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTH_SECRET", SECRET)
    assert cli.main(["token", "--sub", "alice", "--topics", "orders,user.42.*", "--ttl", "1h",
                     "--publish", "orders"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["topics"] == ["orders", "user.42.*"]
    assert claims["publish"] == ["orders"] and claims["exp"] - claims["iat"] == 3600
    assert cli.main(["token", "--sub", "alice", "--topics", "a*b"]) == 2
    assert "a*b" in capsys.readouterr().err
    monkeypatch.setenv("AUTH_SECRET", "short")
    assert cli.main(["token", "--sub", "alice"]) == 2
    assert capsys.readouterr().err.startswith("tether token: AUTH_SECRET must be")
    monkeypatch.delenv("AUTH_SECRET")
    assert cli.main(["token", "--sub", "alice"]) == 2
    assert "AUTH_SECRET" in capsys.readouterr().err


# ---------------------------------------------------------------- the registry


def conn(sid: str, grant: Grant | None = OPEN) -> Connection:
    outbox = Outbox(RecordingPeer(), Backpressure(100, 10, 1000), Writer(ManualClock(), print))
    c = Connection(sid, 0.0, "127.0.0.1", outbox)
    c.grant = grant
    return c


def test_admit_splits_by_grant_and_counts_only_what_it_grants() -> None:
    c = conn("a", Grant("alice", None, Patterns(["orders", "user.*"])))
    granted, refused_ = Registry.admit(c, ["orders", "secrets", "user.1", "*", "orders"], 2)
    assert granted == ["orders", "user.1"] and refused_ == ["secrets", "*"]
    with pytest.raises(ValueError):
        Registry.admit(c, ["orders", "user.1", "user.2"], 2)
    assert Registry.admit(conn("w", None), ["orders"], 10) == ([], ["orders"])  # waiting


def test_broadcast_reaches_only_grants_that_read_it_and_regrant_narrows() -> None:
    r = Registry()
    everyone = conn("open")
    reader = conn("reader", Grant("a", None, Patterns(["*", "x", "y"])))
    other = conn("other", Grant("b", None, Patterns(["x"])))
    waiting = conn("waiting", None)
    for c in (everyone, reader, other, waiting):
        r.add(c)
    r.subscribe(reader, ["x", "y"])
    assert set(r.subscribers("*")) == {everyone, reader}
    lost = r.regrant(reader, Grant("a", None, Patterns(["x"])))
    assert lost == ["y", "*"] and reader.topics == {"x"}
    assert set(r.subscribers("*")) == {everyone} and r.subscribers("y") == []
    assert r.regrant(reader, Grant("a", None, Patterns(["**"]))) == []
    assert set(r.subscribers("*")) == {everyone, reader}
    assert r.regrant(waiting, Grant("w", None, Patterns(["*"]))) == []
    assert waiting in r.subscribers("*")
    r.remove(reader)
    assert reader not in r.subscribers("*")


# ---------------------------------------------------------------- the hub's auth states


class Peer(RecordingPeer):
    def __init__(self) -> None:
        super().__init__()
        self.closed_with: tuple[int, str] | None = None

    async def close(self, code: int, reason: str, timeout: float, *, read: bool = True) -> None:
        self.closed_with = (code, reason)


class Rig:
    """A hub on a manual clock with the memory backplane; peers record what they get."""

    def __init__(self, **settings: Any) -> None:
        self.clock = ManualClock(wall_start=NOW)
        fields = {"heartbeat_interval_ms": 0, "auth_secret": SECRET, "handshake_timeout_ms": 2000,
                  **settings}
        self.backplane = MemoryBackplane(100)
        self.hub = Hub(Settings(**fields), self.backplane, self.clock)

    async def start(self) -> Rig:
        await self.backplane.start(self.hub.deliver)
        return self

    def open(self, topics: tuple[str, ...] = (), token: str | None = None,
             ) -> tuple[Connection, Peer]:
        peer = Peer()
        return self.hub.open(peer, "127.0.0.1", topics, token=token), peer

    async def send(self, c: Connection, msg: dict[str, Any] | str) -> None:
        await self.hub.text(c, msg if isinstance(msg, str) else json.dumps(msg))
        self.hub.flush()

    async def publish(self, topic: str, n: int = 1) -> None:
        for _ in range(n):
            await self.hub.publish({"type": "note", "topic": topic})
        self.hub.flush()

    def token(self, ttl: float = 60, **kw: Any) -> str:
        return issue_token(SECRET, ttl=ttl, now=self.clock.wall(), **{"sub": "alice", **kw})

    def got(self, peer: Peer) -> list[dict[str, Any]]:
        self.hub.flush()
        return peer.messages()


async def closed(peer: Peer) -> tuple[int, str] | None:
    await asyncio.sleep(0)  # hub.close runs the peer's close as a task
    return peer.closed_with


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


async def test_auth_off_admits_at_once_and_answers_auth_without_a_check(
    log_capture: LogCapture,
) -> None:
    rig = await Rig(auth_secret=None).start()
    c, peer = rig.open(("orders",))
    await rig.publish("*")
    await rig.send(c, {"type": "auth", "token": "anything"})
    got = rig.got(peer)
    assert kinds(got) == ["connected", "note", "authenticated"]
    assert got[2] == {"type": "authenticated", "sub": None, "exp": None, "expiresIn": None,
                      "topics": ["orders"]}
    assert log_capture.find("WebSocket client connected")[0]["data"] == {
        "sessionId": c.session_id, "remote": "127.0.0.1"}


async def test_a_url_token_admits_with_its_grant_and_refuses_the_rest() -> None:
    rig = await Rig().start()
    token = rig.token(topics=["orders", "user.42.*"])
    c, peer = rig.open(("orders", "secrets", "user.42.a"), token=token)
    await rig.publish("secrets")
    await rig.publish("*")
    await rig.publish("orders")
    got = rig.got(peer)
    assert kinds(got) == ["connected", "authenticated", "error", "note"]
    assert got[1]["sub"] == "alice" and got[1]["expiresIn"] == 60
    assert got[1]["topics"] == ["orders", "user.42.a"]  # the URL's topics, taken first
    assert got[2]["topic"] == "secrets" and "forbidden" in got[2]["error"]
    assert got[3]["topic"] == "orders"
    assert c.topics == {"orders", "user.42.a"}


@pytest.mark.parametrize(("token", "code"), [("junk", 4003), ("expired", 4001),
                                             ("other-key", 4003)])
async def test_a_bad_url_token_closes_before_anything_is_sent(token: str, code: int) -> None:
    rig = await Rig().start()
    tokens = {"junk": "junk",
              "expired": issue_token(SECRET, sub="a", ttl=1, now=rig.clock.wall() - 10),
              "other-key": issue_token(OTHER, sub="a", now=rig.clock.wall())}
    c, peer = rig.open(("orders",), token=tokens[token])
    await rig.publish("*")
    assert rig.got(peer) == []
    closing = await closed(peer)
    assert closing is not None and closing[0] == code
    assert c not in rig.hub.registry and rig.hub.stats.auth_refused == 1


async def test_waiting_gets_nothing_and_is_closed_at_the_deadline() -> None:
    rig = await Rig().start()
    _, peer = rig.open(("orders",))
    await rig.publish("*")
    await rig.publish("orders")
    rig.clock.advance(1.999)
    assert rig.got(peer) == [] and peer.closed_with is None
    assert [v["access"] for v in rig.hub.connections()] == ["waiting"]
    rig.clock.advance(0.001)
    assert await closed(peer) == (4003, "Forbidden: no token within WS_HANDSHAKE_TIMEOUT (2 s)")
    assert rig.got(peer) == []


@pytest.mark.parametrize("first", [{"type": "subscribe", "topics": ["orders"]},
                                   {"type": "ping"}, "not json", {"type": "auth"},
                                   {"type": "auth", "token": 42}])
async def test_waiting_may_send_nothing_but_a_good_auth(first: dict[str, Any] | str) -> None:
    rig = await Rig().start()
    c, peer = rig.open()
    await rig.send(c, first)
    assert rig.got(peer) == []
    closing = await closed(peer)
    assert closing is not None and closing[0] == 4003
    await rig.hub.binary(c, b"x")  # nothing more happens to a closed one
    assert c not in rig.hub.registry


async def test_auth_admits_a_waiting_connection_with_its_held_url(
    log_capture: LogCapture,
) -> None:
    rig = await Rig().start()
    await rig.publish("orders", 3)
    await rig.publish("secrets", 2)
    c, peer = rig.open(("orders", "secrets"))
    await rig.hub.resume_query(c, "orders:1,secrets:0")  # as the server does after open
    assert rig.got(peer) == []
    await rig.send(c, {"type": "auth", "token": rig.token(topics=["orders"])})
    got = rig.got(peer)
    assert kinds(got) == ["connected", "authenticated", "error", "error", "note", "note"]
    assert [m.get("topic") for m in got[2:]] == ["secrets", "secrets", "orders", "orders"]
    assert [m["seq"] for m in got[4:]] == [2, 3]  # the replay of orders, nothing of secrets
    assert log_capture.find("WebSocket client connected")[0]["data"]["sub"] == "alice"
    rig.clock.advance(10)  # the auth deadline was cancelled
    assert peer.closed_with is None


async def test_expiry_closes_at_exp() -> None:
    rig = await Rig().start()
    _, peer = rig.open(token=rig.token(ttl=30, topics=["*"]))
    rig.clock.advance(29.999)
    assert peer.closed_with is None
    rig.clock.advance(0.001)
    assert await closed(peer) == (4001, "Token expired")
    assert rig.hub.stats.tokens_expired == 1


async def test_a_refresh_keeps_the_connection_and_narrows_its_topics() -> None:
    rig = await Rig().start()
    c, peer = rig.open(("a", "b"), token=rig.token(ttl=30, topics=["a", "b", "*"]))
    rig.clock.advance(20)
    await rig.send(c, {"type": "auth", "token": rig.token(ttl=30, topics=["a"])})
    got = rig.got(peer)
    assert got[-2] == {"type": "unsubscribed", "topics": ["b", "*"],
                       "reason": "not granted by the new token"}
    assert got[-1]["type"] == "authenticated" and got[-1]["topics"] == ["a"]
    await rig.publish("b")
    await rig.publish("*")
    await rig.publish("a")
    assert [m["topic"] for m in rig.got(peer) if m["type"] == "note"] == ["a"]
    await rig.send(c, {"type": "subscribe", "topics": ["b"]})
    assert rig.got(peer)[-2]["topic"] == "b"  # an error: refused now
    rig.clock.advance(15)  # past the first token's exp: the new one holds
    assert peer.closed_with is None
    rig.clock.advance(15)
    assert await closed(peer) == (4001, "Token expired")
    assert rig.hub.stats.token_refreshes == 1


async def test_a_refresh_with_another_sub_or_a_bad_token_closes() -> None:
    rig = await Rig().start()
    c, peer = rig.open(token=rig.token())
    await rig.send(c, {"type": "auth", "token": rig.token(sub="mallory")})
    assert await closed(peer) == (4003, "Forbidden: token for another sub")
    c, peer = rig.open(token=rig.token())
    await rig.send(c, {"type": "auth", "token": issue_token(SECRET, sub="alice", ttl=1,
                                                            now=rig.clock.wall() - 5)})
    assert await closed(peer) == (4001, "Token expired")
    c, peer = rig.open(token=rig.token())
    await rig.send(c, {"type": "auth", "token": issue_token(OTHER, sub="alice")})
    closing = await closed(peer)
    assert closing is not None and closing[0] == 4003 and "Signature" in closing[1]


async def test_public_topics_are_read_without_a_token_and_auth_upgrades() -> None:
    rig = await Rig(public_topics=("news", "*")).start()
    c, peer = rig.open(("news", "orders"))
    await rig.publish("news")
    await rig.publish("*")
    await rig.publish("orders")
    got = rig.got(peer)
    assert kinds(got) == ["connected", "error", "note", "note"]
    assert got[1]["topic"] == "orders" and [m["topic"] for m in got[2:]] == ["news", "*"]
    assert rig.hub.connections()[0]["access"] == "anonymous"
    await rig.send(c, {"type": "auth", "token": rig.token(topics=["orders"])})
    await rig.send(c, {"type": "subscribe", "topics": ["orders"]})
    await rig.publish("orders")
    got = rig.got(peer)
    assert got[-1]["topic"] == "orders" and got[-1]["type"] == "note"
    view = rig.hub.connections()[0]
    assert view["access"] == "token" and view["sub"] == "alice" and view["expiresAt"]


async def test_resume_and_subscribe_give_nothing_of_a_topic_not_granted() -> None:
    rig = await Rig(history_size=10).start()
    await rig.publish("secrets", 3)
    await rig.publish("*", 2)
    c, peer = rig.open(token=rig.token(topics=["orders"]))
    for msg in ({"type": "resume", "since": {"secrets": 0, "*": 0}},
                {"type": "subscribe", "topics": ["secrets", "*"]}):
        await rig.send(c, msg)
    await rig.publish("secrets")
    await rig.publish("*")
    got = rig.got(peer)
    assert not [m for m in got if m["type"] in ("note", "resync")]
    assert [m["topic"] for m in got if m["type"] == "error"] == ["secrets", "*", "secrets", "*"]
    assert rig.hub.stats.resumes == 0 and c.topics == set()


async def test_without_tokens_an_application_keeps_its_own_auth_messages() -> None:
    rig = await Rig(auth_secret=None).start()
    seen: list[str | bytes] = []
    rig.hub.on_message(lambda conn, data: seen.append(data))
    c, peer = rig.open()
    await rig.send(c, '{"type":"auth","user":"x"}')
    assert seen == ['{"type":"auth","user":"x"}']
    assert kinds(rig.got(peer)) == ["connected"]
    rig = await Rig().start()  # with tokens, `auth` is tether's
    rig.hub.on_message(lambda conn, data: seen.append(data))
    c, peer = rig.open(token=rig.token())
    await rig.send(c, {"type": "auth", "token": rig.token()})
    assert len(seen) == 1 and kinds(rig.got(peer))[-1] == "authenticated"
