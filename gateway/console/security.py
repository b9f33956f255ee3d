"""The console's cookies, CSRF tokens and response headers.

- The session cookie is HttpOnly, SameSite=Strict, scoped to /console, with the session's expiry; Secure
  unless the console is reached on a loopback address (`make run`'s http://127.0.0.1), where browsers
  would refuse a Secure cookie over plain HTTP.
- Every state change is a POST carrying a CSRF token. Signed in, the token is an HMAC of the session
  token (nothing more to store, the same on every replica, worthless without the cookie); on the sign-in
  form, before there is a session, it is a random value that must match a cookie set with the form.
- Every page: a strict Content-Security-Policy (scripts and styles from /console/static only, no inline
  script or style, nothing framed or framing), no caching, no referrer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "gw_console_session"
SIGN_IN_COOKIE = "gw_console_sign_in"
CSRF_FIELD = "csrf_token"
COOKIE_PATH = "/console"
SIGN_IN_COOKIE_TTL_S = 3600

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
NO_STORE = (b"cache-control", b"no-store")


def on_loopback(request: Request) -> bool:
    host = request.url.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=not on_loopback(request))


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="strict", secure=not on_loopback(request))


def session_csrf(session_token: str) -> str:
    return hmac.new(session_token.encode("utf-8", "replace"), b"gateway-console-csrf", hashlib.sha256).hexdigest()


def new_sign_in_token() -> str:
    return secrets.token_urlsafe(24)


def same(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def cross_site(request: Request) -> bool:
    """A browser says so (Fetch Metadata): refused before any token is even looked at."""
    return request.headers.get("sec-fetch-site") == "cross-site"


class SecurityHeaders:
    """Adds the page headers to every console response; HTML and CSV are never cached, static files are."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(scope.get("root_path", "") + "/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), *PAGE_HEADERS]
                if not static:
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)
