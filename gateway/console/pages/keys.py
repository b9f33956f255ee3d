"""Keys: list (a page of /admin/keys at a time), and for an admin create, rotate and revoke through the key
lifecycle API. A new key's secret is shown once, on the page that answers the POST that made it; it is
never stored, never put in a URL, and the page is not cached (nor kept in htmx's history)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from starlette.responses import RedirectResponse, Response

from gateway.console.app import ApiRefused, Visit

PAGE_SIZE = 50
_KEY_ID = re.compile(r"[0-9a-f]{8}")
NOTICES = {"revoked": "Key {key} is revoked: it is refused from now on."}


async def show(visit: Visit, new_key: dict | None = None, message: str | None = None, status: int = 200) -> Response:
    tenant = visit.param("tenant")
    after = visit.param("after")
    body = await visit.get("/admin/keys", {"tenant": tenant, "after": after, "limit": str(PAGE_SIZE)}, "keys")
    names: list[str] = []
    if visit.admin:
        names = [t["name"] for t in (await visit.get("/admin/tenants", {"limit": "100"}, "tenants"))["data"]]
    notice = NOTICES.get(visit.param("notice"), "")
    shown_id = visit.param("key")
    if notice and _KEY_ID.fullmatch(shown_id):
        notice = notice.format(key=shown_id)
    else:
        notice = ""
    return visit.render("keys.html", status, title="Keys", current="keys", keys=body["data"], tenant=tenant,
                        names=names, new_key=new_key, message=message, notice=notice, now=time.time(),
                        next_after=body.get("last_id") if body.get("has_more") else None, paged=bool(after))


async def create(visit: Visit) -> Response:
    form = visit.form
    payload: dict = {"tenant": form.get("tenant", "").strip(), "name": form.get("name", "").strip()}
    expires = form.get("expires_at", "").strip()
    if expires:
        try:
            moment = datetime.fromisoformat(expires)
        except ValueError:
            return await show(visit, message="The expiry must be a date and time (UTC).", status=400)
        payload["expires_at"] = int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())
    answer = await visit.api.post("/admin/keys", payload)
    if not answer.ok:
        return await _refused(visit, answer)
    return await show(visit, new_key=answer.body)


async def revoke(visit: Visit) -> Response:
    key_id = _key_id(visit)
    answer = await visit.api.post(f"/admin/keys/{key_id}/revoke")
    if not answer.ok:
        return await _refused(visit, answer)
    root = visit.request.scope.get("root_path", "")
    return RedirectResponse(f"{root}/keys?notice=revoked&key={key_id}", 303)


async def rotate(visit: Visit) -> Response:
    key_id = _key_id(visit)
    raw = visit.form.get("grace_seconds", "0").strip() or "0"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 8:
        return await show(visit, message="The grace period is a whole number of seconds.", status=400)
    answer = await visit.api.post(f"/admin/keys/{key_id}/rotate", {"grace_seconds": int(raw)})
    if not answer.ok:
        return await _refused(visit, answer)
    return await show(visit, new_key={**answer.body, "rotated_from": key_id, "grace_seconds": int(raw)})


def _key_id(visit: Visit) -> str:
    key_id = visit.request.path_params["key_id"]
    return key_id if _KEY_ID.fullmatch(key_id) else "invalid"  # the API answers 404 for it


async def _refused(visit: Visit, answer) -> Response:
    if answer.status in (400, 409):  # the form's mistake: the list again, with the API's message
        return await show(visit, message=answer.message, status=answer.status)
    raise ApiRefused(answer, "keys")
