"""Sign in with an API key, sign out.

The key is checked by the API itself (`GET /admin/me` with it as the bearer), so the console accepts
exactly the keys the API accepts. The key is then forgotten: the session keeps its tenant and id. The
sign-in form has its own CSRF token (a cookie and a matching field), so no other site can sign a browser
in under a key of its choosing.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.console.app import Console, SignInNeeded, Visit, read_form
from gateway.console.security import (CSRF_FIELD, SESSION_COOKIE, SIGN_IN_COOKIE, SIGN_IN_COOKIE_TTL_S,
                                      clear_cookie, cross_site, new_sign_in_token, same, set_cookie)


def _console(request: Request) -> Console:
    return request.app.state.console


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") or "/console"


def _safe_next(request: Request, target: str | None) -> str:
    """Only a console page of this site: never an absolute or protocol-relative URL (an open redirect)."""
    root = _root(request)
    if target and target.startswith(root + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{root}/overview"


async def home(request: Request) -> Response:
    return RedirectResponse(f"{_root(request)}/overview", 303)


async def form_page(request: Request, status: int = 200, message: str | None = None,
                    notice: str | None = None) -> Response:
    console = _console(request)
    try:
        await console.visit(request)
        return RedirectResponse(_safe_next(request, request.query_params.get("next")), 303)
    except SignInNeeded:
        pass
    token = new_sign_in_token()
    notices = {"signed-out": "You are signed out."}
    response = console.render(request, "sign_in.html", status, title="Sign in", sign_in_token=token,
                              next=request.query_params.get("next", ""), message=message,
                              notice=notice or notices.get(request.query_params.get("notice", "")))
    set_cookie(response, request, SIGN_IN_COOKIE, token, SIGN_IN_COOKIE_TTL_S)
    return response


async def submit(request: Request) -> Response:
    console = _console(request)
    form = await read_form(request)
    if cross_site(request) or not same(form.get(CSRF_FIELD), request.cookies.get(SIGN_IN_COOKIE)):
        return await form_page(request, 403, "The sign-in form had expired or came from another site. "
                                             "It has been reloaded: sign in again.")
    key = form.get("key", "").strip()
    if not key:
        return await form_page(request, 400, "Enter an API key.")
    answer = await console.client(key=key).get("/admin/me")
    if answer.status == 401:
        return await form_page(request, 401, "That key was not accepted: it is unknown, revoked or expired.")
    if not answer.ok:
        return await form_page(request, answer.status, answer.message)
    me = answer.body
    ttl = console.settings.console_session_ttl_s
    token, _ = await console.sessions.create(me["tenant"], me["key_id"], bool(me["admin"]), ttl)
    response = RedirectResponse(_safe_next(request, form.get("next")), 303)
    set_cookie(response, request, SESSION_COOKIE, token, ttl)
    clear_cookie(response, request, SIGN_IN_COOKIE)
    return response


async def sign_out(visit: Visit) -> Response:
    request = visit.request
    await visit.console.sessions.delete(visit.token)
    response = RedirectResponse(f"{_root(request)}/sign-in?notice=signed-out", 303)
    clear_cookie(response, request, SESSION_COOKIE)
    return response
