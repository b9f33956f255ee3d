"""The console's ASGI app (mounted at /console): routes, templates, the signed-in guard, error pages.

Every page is a `Visit`: the session from the cookie, checked on each request against the store and the
current configuration (a removed key or tenant ends it), and an in-process client of the gateway's API
acting as that session's caller. Pages render what the API answers; an API refusal (403, 404, 400) is
the page's answer too, with the API's own message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from gateway.tenancy.vouched import live_caller
from gateway.console import formatting
from gateway.console.inprocess import ApiAnswer, ApiClient
from gateway.console.security import (CSRF_FIELD, SESSION_COOKIE, SecurityHeaders, cross_site, same,
                                      session_csrf)
from gateway.console.sessions import MemorySessionStore, Session, SessionStore
from gateway.tenancy.tenants import Caller

HERE = Path(__file__).parent
MAX_FORM_BYTES = 16 * 1024
NAV = (("overview", "Overview"), ("models", "Models"), ("policy", "Policy"), ("tenants", "Tenants"),
       ("keys", "Keys"), ("usage", "Usage"), ("decisions", "Decisions"))


class ApiRefused(Exception):
    """The API said no (or is missing): the page answers with its status and message."""

    def __init__(self, answer: ApiAnswer, what: str) -> None:
        super().__init__(answer.message)
        self.answer = answer
        self.what = what


@dataclass
class Visit:
    request: Request
    console: "Console"
    token: str
    session: Session
    caller: Caller
    api: ApiClient
    form: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> bool:
        return self.caller.tenant.admin

    @property
    def csrf(self) -> str:
        return session_csrf(self.token)

    def param(self, name: str, default: str = "") -> str:
        return self.request.query_params.get(name, default).strip()

    async def get(self, path: str, params: Any = None, what: str = "") -> Any:
        """The API's JSON answer; any refusal becomes this page's answer."""
        answer = await self.api.get(path, params)
        if not answer.ok:
            raise ApiRefused(answer, what or path)
        return answer.body

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return self.console.render(self.request, template, status, visit=self, **context)


class SignInNeeded(Exception):
    pass


Page = Callable[[Visit], Awaitable[Response]]


class Console:
    def __init__(self, api_app: Any, settings: Any, sessions: SessionStore | None = None) -> None:
        self.api_app = api_app  # the FastAPI app: its state holds the gateway, its routes are the API
        self.settings = settings
        self._sessions = sessions or MemorySessionStore()
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(),
                                     trim_blocks=True, lstrip_blocks=True)
        self.templates.filters.update(formatting.FILTERS)

    @property
    def sessions(self) -> SessionStore:
        """A store set on the app at start-up (`app.state.console_sessions`, e.g. the database's) wins."""
        return getattr(self.api_app.state, "console_sessions", None) or self._sessions

    @property
    def gateway(self) -> Any:
        return self.api_app.state.gateway

    def client(self, *, caller: Caller | None = None, key: str | None = None) -> ApiClient:
        return ApiClient(self.api_app, caller=caller, key=key)

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/") or "/console"
        visit = context.get("visit")
        body = self.templates.get_template(template).render(
            root=root, static=f"{root}/static", nav=NAV, csrf_field=CSRF_FIELD,
            who=visit.caller.tenant if visit else None, **context)
        return HTMLResponse(body, status_code=status)

    async def visit(self, request: Request) -> Visit:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            raise SignInNeeded
        session = await self.sessions.get(token)
        if session is None:
            raise SignInNeeded
        caller = await live_caller(self.gateway, session.tenant, session.key_id)
        if caller is None:  # the key was removed (or its tenant): the session ends with it
            await self.sessions.delete(token)
            raise SignInNeeded
        return Visit(request, self, token, session, caller, self.client(caller=caller))


def page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
    """A signed-in page; a POST also needs the session's CSRF token."""

    async def endpoint(request: Request) -> Response:
        console: Console = request.app.state.console
        try:
            visit = await console.visit(request)
        except SignInNeeded:
            if request.method != "GET":
                return console.render(request, "error.html", 401, title="Signed out",
                                      message="Your session has ended. Sign in again.")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{request.scope.get('root_path', '')}/sign-in?next={quote(target)}", 303)
        if request.method == "POST":
            visit.form = await read_form(request)
            if cross_site(request) or not same(visit.form.get(CSRF_FIELD), visit.csrf):
                return visit.render("error.html", 403, title="Refused",
                                    message="This form's security token is missing or out of date (CSRF). "
                                            "Reload the page and try again.")
        try:
            return await handler(visit)
        except ApiRefused as exc:
            return refused(visit, exc)

    return endpoint


def refused(visit: Visit, exc: ApiRefused) -> HTMLResponse:
    status = exc.answer.status
    title = {403: "Not allowed", 404: "Not found", 400: "Bad request", 429: "Slow down"}.get(status, "Unavailable")
    return visit.render("error.html", status if 400 <= status < 600 else 502, title=title,
                        message=exc.answer.message, what=exc.what)


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form, bounded; the first value of each field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=50)
    return {name: values[0] for name, values in fields.items()}


def build(console: Console) -> ASGIApp:
    from gateway.console.pages import decisions, keys, models, overview, policy, sign_in, tenants, usage

    routes = [
        Route("/", sign_in.home),
        Route("/sign-in", sign_in.form_page, methods=["GET"]),
        Route("/sign-in", sign_in.submit, methods=["POST"]),
        Route("/sign-out", page(sign_in.sign_out), methods=["POST"]),
        Route("/overview", page(overview.show)),
        Route("/models", page(models.show)),
        Route("/policy", page(policy.show)),
        Route("/tenants", page(tenants.show)),
        Route("/keys", page(keys.show), methods=["GET"]),
        Route("/keys", page(keys.create), methods=["POST"]),
        Route("/keys/{key_id}/revoke", page(keys.revoke), methods=["POST"]),
        Route("/keys/{key_id}/rotate", page(keys.rotate), methods=["POST"]),
        Route("/usage", page(usage.show)),
        Route("/usage.csv", page(usage.csv_download)),
        Route("/decisions", page(decisions.show)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.console = console
    return SecurityHeaders(app)


async def _not_found(request: Request, exc: Exception) -> Response:
    return request.app.state.console.render(request, "error.html", 404, title="Not found",
                                            message=f"There is no console page at {request.url.path}.")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return request.app.state.console.render(request, "error.html", 405, title="Not allowed",
                                            message=f"{request.method} is not how {request.url.path} is used.")
