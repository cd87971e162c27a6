"""Your web application's backend: it logs users in its own way and gives each a tether token.

    export AUTH_SECRET="$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
    .venv/bin/tether serve &                     # tether checks tokens with the same secret
    .venv/bin/python examples/backend.py &       # http://localhost:8011: user 42's orders, live
    export SHOP="$(.venv/bin/tether token --sub shop --publish 'user.*')"   # may publish to user.*
    .venv/bin/tether publish --token "$SHOP" --topic user.42.orders '{"type":"order"}'

BACKEND_PORT (8011) and TETHER_URL (http://localhost:4011) change the addresses. The page
(examples/orders.html) comes from here and opens its WebSocket to tether: tether allows
localhost pages by default; in production, set ALLOWED_ORIGINS to this site. issue_token is
PyJWT underneath: any language can sign the same token (HS256, claims sub, exp, topics).
"""

import os
import sys
from importlib.resources import files
from pathlib import Path

from aiohttp import web

from tether.auth import issue_token

SECRET = os.environ.get("AUTH_SECRET") or sys.exit("set AUTH_SECRET: tether's secret, too")
TETHER_WS = os.environ.get("TETHER_URL", "http://localhost:4011").replace("http", "ws", 1) + "/ws"


async def logged_in_user(request: web.Request) -> str:
    """Your session, your rules: here every visitor is user 42."""
    return "42"


async def tether_token(request: web.Request) -> web.Response:
    """A 15-minute token for the user: their own topics and `news`; the page asks again."""
    user = await logged_in_user(request)
    token = issue_token(SECRET, sub=user, topics=["news", f"user.{user}.*"], ttl=900)
    return web.json_response({"token": token, "user": user, "url": TETHER_WS})


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(Path(__file__).with_name("orders.html"))


async def tether_js(request: web.Request) -> web.Response:
    """The browser client, from the tether package (tether serves the same at /tether.js)."""
    body = files("tether").joinpath("static/tether.js").read_bytes()
    return web.Response(body=body, content_type="text/javascript")


app = web.Application()
app.add_routes([web.get("/", page), web.get("/tether.js", tether_js),
                web.get("/api/tether-token", tether_token)])

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(os.environ.get("BACKEND_PORT", 8011)))
