"""The access token in front of the whole UI, checked on every http request and websocket.

The UI can start trainings and read every file under its roots, so when it listens on anything but
loopback (`--host 0.0.0.0`) it is a door to the machine: everyone on the network could use it. So a
token is needed there: `TokenMiddleware` wraps the whole ASGI app (Gradio's pages, its API, its
file routes, its websockets), not single routes, so nothing added later can forget the check.

The token may come as `Authorization: Bearer <token>` (scripts), as `?token=` in the link the CLI
prints (a browser's first visit), or as the cookie that first visit sets. The cookie is HttpOnly (page
scripts cannot read it) and SameSite=Strict (other sites cannot send it along), and the first visit
is redirected to the same URL without the token, so it stays out of the address bar and history.
Tokens are compared in constant time, so response timing tells nothing about a guess.
"""

import hmac
import ipaddress
import secrets

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "finetune_ui_token"
REFUSED = "finetune ui: missing or wrong access token"


def needs_token(host: str) -> bool:
    """True unless `host` is a loopback address or name (only this machine can reach those)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback  # 127.0.0.2 is loopback too
    except ValueError:  # a name other than localhost, or "" (every interface)
        return True


def new_token() -> str:
    return secrets.token_urlsafe(24)


class TokenMiddleware:
    """Pure ASGI middleware: http and websocket scopes need the token, lifespan passes through."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if self._matches(conn.query_params.get("token")):
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
                await self._redirect_without_token(conn)(scope, receive, send)
            elif scope["type"] == "http":
                await self.app(scope, receive, self._setting_cookie(send, scope))
            else:
                await self.app(scope, receive, send)
        elif self._matches(_bearer(conn)) or self._matches(conn.cookies.get(COOKIE)):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await PlainTextResponse(REFUSED, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        else:
            # Closing before accepting refuses the handshake (the server answers it with 403).
            await WebSocketClose(code=1008)(scope, receive, send)

    def _matches(self, given: str | None) -> bool:
        if not given:
            return False
        # Bytes: compare_digest refuses non-ASCII str, and a header may carry anything.
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode("utf-8"))

    def _redirect_without_token(self, conn: HTTPConnection) -> RedirectResponse:
        url = conn.url.remove_query_params("token")
        # Relative, and never starting with "//", which a browser would read as another host.
        location = "/" + url.path.lstrip("/") + (f"?{url.query}" if url.query else "")
        response = RedirectResponse(location, status_code=303)
        response.headers.append("set-cookie", self._cookie(conn.url.scheme))
        return response

    def _setting_cookie(self, send: Send, scope: Scope) -> Send:
        """`send`, adding the cookie to the response start (a POST with ?token= is not redirected:
        a redirect would drop its body)."""
        cookie = self._cookie(scope.get("scheme", "http"))

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", cookie)
            await send(message)

        return send_with_cookie

    def _cookie(self, scheme: str) -> str:
        """The Set-Cookie value (starlette writes it): Secure only over https, where it can be."""
        response = Response()
        response.set_cookie(COOKIE, self.token, path="/", httponly=True, samesite="strict",
                            secure=scheme in ("https", "wss"))
        return response.headers["set-cookie"]


def _bearer(conn: HTTPConnection) -> str | None:
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None
