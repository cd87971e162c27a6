"""The `tether` command: serve, publish, watch, bench, token (SPEC §9). No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tether import config, logs
from tether.errors import ConfigError


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the hub (settings from env, flags win)",
                       description="Run the hub. Each setting is an environment variable; "
                                   "its flag wins over it.")
    for option in config.OPTIONS:
        shown = f"{option.help} (env {option.env}; default {config.default_text(option)})"
        p.add_argument(option.flag, dest=option.env, metavar=option.env,
                       help=shown.replace("%", "%%"))  # argparse formats help with %


# `publish` and `bench` read these from the environment; --help names them, never their values.
URL_HELP = ("the server: http(s)://host:port, or its ws(s)://host:port/ws "
            "(env TETHER_URL; default http://localhost:4011)")
PUBLISH_TOKEN_HELP = ("bearer token of POST /event: PUBLISH_TOKEN or a connection token "
                      "with a publish claim (env PUBLISH_TOKEN; default unset)")
CA_HELP = ("PEM file of the CA that signed the server's certificate (a private CA), trusted "
           "instead of the system's CAs (default: the system's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="A real-time WebSocket hub with heartbeat and resume."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)

    p = sub.add_parser("publish", help="publish one event (POST /event)")
    p.add_argument("event", help='JSON object, e.g. \'{"type":"note","payload":{"x":1}}\'')
    p.add_argument("--url", default=os.environ.get("TETHER_URL", "http://localhost:4011"),
                   help=URL_HELP)
    p.add_argument("--topic", help="the event's topic (default: the event's own, else *)")
    p.add_argument("--priority", choices=["high", "normal", "low"],
                   help="high, normal or low (default: the event's own, else normal)")
    p.add_argument("--token", default=os.environ.get("PUBLISH_TOKEN"), help=PUBLISH_TOKEN_HELP)
    p.add_argument("--key", help="Idempotency-Key (default: a new UUID); repeats with the "
                   "same key are not delivered again")
    p.add_argument("--attempts", type=int, default=5,
                   help="tries while the outcome is unknown (503, no connection), "
                        "same key each time (default 5)")
    p.add_argument("--ca-file", metavar="PATH", help=CA_HELP)

    p = sub.add_parser("watch", help="print messages, RTT and reconnects (a tunnel probe)")
    p.add_argument("url", help="ws(s)://host:port/ws or http(s)://host:port")
    p.add_argument("--topics", help="comma list of topics (default: none; every client gets '*')")
    p.add_argument("--token", default=os.environ.get("TETHER_TOKEN"),
                   help="connection token (JWT), sent as the first message "
                        "(env TETHER_TOKEN; default unset)")
    p.add_argument("--ping-interval", type=float, default=5.0,
                   help="seconds between liveness pings (default 5)")
    p.add_argument("--ping-timeout", type=float, default=10.0,
                   help="seconds without an answer before reconnecting (default 10)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first reconnect delay bound in seconds, doubling to 30 (default 1)")
    p.add_argument("--count", type=int, help="exit after N messages (default: until Ctrl+C)")
    p.add_argument("--ca-file", metavar="PATH", help=CA_HELP)

    p = sub.add_parser("bench", help="N clients: heartbeat RTT, publish latency, deliveries/s")
    p.add_argument("--url", default=os.environ.get("TETHER_URL", "http://localhost:4011"),
                   help="the server: http(s)://host:port "
                        "(env TETHER_URL; default http://localhost:4011)")
    p.add_argument("--connections", type=int, default=100, help="clients to open (default 100)")
    p.add_argument("--messages", type=int, default=100, help="messages in the burst (default 100)")
    p.add_argument("--token", default=os.environ.get("PUBLISH_TOKEN"), help=PUBLISH_TOKEN_HELP)
    p.add_argument("--rtt-wait", type=float, default=35.0,
                   help="seconds to wait at most for heartbeat round trips (default 35)")

    p = sub.add_parser("token", help="mint an HS256 connection token with AUTH_SECRET",
                       description="Mint an HS256 connection token, signed with the "
                                   "AUTH_SECRET of the environment.")
    p.add_argument("--sub", required=True, help="the user the token is for (required)")
    p.add_argument("--topics", default="",
                   help="comma list of topic patterns it may read: orders, user.42.*, "
                        "* (the broadcast topic), ** (every topic) (default: none)")
    p.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    p.add_argument("--publish", default="",
                   help="comma list of topic patterns it may publish to (POST /event) "
                        "(default: none)")

    return parser


def _token(args: argparse.Namespace) -> int:
    from tether.auth import issue_token, parse_patterns, parse_ttl

    secret = os.environ.get("AUTH_SECRET")
    if not secret:
        print("tether token: AUTH_SECRET is not set (the server's HS256 secret)", file=sys.stderr)
        return 2
    try:
        token = issue_token(secret, sub=args.sub, topics=parse_patterns(args.topics),
                            ttl=parse_ttl(args.ttl), publish=parse_patterns(args.publish))
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith("must be at least"):
            reason = f"AUTH_SECRET {reason}"
        print(f"tether token: {reason}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        overrides = {o.env: getattr(args, o.env) for o in config.OPTIONS}
        try:
            settings = config.load(os.environ, overrides)
        except ConfigError as exc:
            print(f"tether: configuration error: {exc}", file=sys.stderr)
            return 2
        logs.setup(settings.log_level, form=settings.log_format)
        from tether import workers

        if workers.supervising(settings):
            return workers.run(settings, overrides)
        from tether.app import run

        return run(settings)
    if args.command == "publish":
        from tether.tools import publish

        return publish(args.url, args.event, args.topic, args.priority, args.token,
                       args.key, args.attempts, args.ca_file)
    if args.command == "watch":
        from tether.watch import main as watch

        return watch(args.url, args.topics, args.ping_interval, args.ping_timeout,
                     args.backoff, args.count, args.token, args.ca_file)
    if args.command == "bench":
        from tether.benchtool import bench

        return bench(args.url, args.connections, args.messages, args.token, args.rtt_wait)
    if args.command == "token":
        return _token(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
