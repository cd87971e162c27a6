"""Where the Python client connects and publishes: its URLs, built with yarl."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from yarl import URL

from tether.client.logic import since_param


def ws_url(url: str) -> URL:
    """The WebSocket URL of a server: http(s) becomes ws(s), a bare host gets `/ws`."""
    u = URL(url)
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws://, wss://, http:// or https:// URL: {url!r}")
    u = u.with_scheme(scheme)
    if u.path in ("", "/"):
        u = u.with_path("/ws")
    return u


def split_url(url: str) -> tuple[URL, list[str], dict[str, int]]:
    """`ws_url(url)` without `?topics=` and `?since=`; the topics and resume point they name."""
    full = ws_url(url)
    base = full.with_query({k: v for k, v in full.query.items() if k not in ("topics", "since")})
    topics = [t for t in full.query.get("topics", "").split(",") if t]
    return base, topics, dict(_parse_since(full.query.get("since", "")))


def http_url(url: URL) -> str:
    """The HTTP base of a WebSocket URL (for `POST /event`)."""
    scheme = "https" if url.scheme == "wss" else "http"
    path = url.path
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return str(url.with_scheme(scheme).with_path(path or "/").with_query(None)).rstrip("/")


def connect_url(base: URL, topics: Iterable[str], since: Mapping[str, int]) -> URL:
    """`base` with `?topics=` and `?since=` for this attempt (SPEC §6, §7)."""
    query = {k: v for k, v in base.query.items() if k not in ("topics", "since")}
    names = sorted(set(topics))
    if names:
        query["topics"] = ",".join(names)
    if since:
        query["since"] = since_param(since)
    return base.with_query(query)


def _parse_since(raw: str) -> Iterator[tuple[str, int]]:
    """The (topic, seq) pairs of a `since` parameter (`a:3,b:7`); malformed parts are skipped."""
    for part in filter(None, (p.strip() for p in raw.split(","))):
        topic, _, seq = part.rpartition(":")
        if topic and seq.isdigit():
            yield topic, int(seq)
