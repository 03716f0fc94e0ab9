"""The console's routes: pages (login session, CSRF on every form) and the JSON API.

Reads go to the database (checkpoints, audit rows); operator actions go through the same
engine as the CLI's (`SagaClient`), audited with the web user's name as `user_id`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..audit.chain import iso_utc
from ..client import SagaClient
from ..errors import InvalidFilter, InvalidRequest, OperationRefused, SagaError, SagaNotFound
from ..keys import subkey
from ..store.keyring import signing_key_for
from . import overview, timeline
from .auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_USER,
    basic_user,
    csrf_ok,
    csrf_token,
    session_user,
)
from .settings import WebSettings
from .users import User, UsersFile

HERE = Path(__file__).parent
PURPOSE_WEB_SESSION = "web session"
ACTIONS = ("retry", "abort", "approve", "reject")
PAGE_SIZE = 25
#: The search counts each state up to this many sagas, then shows "10,000+": a bounded index
#: scan per state instead of counting a million rows on every page (docs/benchmark.md).
COUNT_LIMIT = 10_000


class Console:
    """The console's state: the client (database and engine), users, templates."""

    def __init__(self, client: SagaClient, web: WebSettings) -> None:
        self.client = client
        self.web = web
        self.users = UsersFile(web.users_file)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["ts"] = _ts
        self.templates.env.filters["tojson_pretty"] = lambda v: json.dumps(
            v, indent=2, sort_keys=True, ensure_ascii=False, default=str
        )
        self.templates.env.globals["flower_url"] = web.flower_url

    # -- helpers -------------------------------------------------------------------------

    def page(self, request: Request, name: str, user: User, **context: Any) -> Response:
        return self.templates.TemplateResponse(
            request, name, {"user": user, "csrf": csrf_token(request), **context}
        )

    def now(self) -> datetime:
        return self.client.clock()

    def saga_data(self, saga_id: str) -> dict[str, Any]:
        status = self.client.status(saga_id)
        rows = self.client.audit_trail(saga_id)
        return {"status": status, "rows": rows, "timeline": timeline.build(rows, self.now())}

    def act(self, user: User, saga_id: str, action: str, form: dict[str, Any]) -> str:
        """Run an operator action as `user`; returns what happened, in words."""
        reason = str(form.get("reason") or f"{action} from the console")
        if action == "retry":
            result = self.client.retry(
                saga_id, user.name, force=bool(form.get("force")), reason=reason
            )
        elif action == "abort":
            result = self.client.abort(saga_id, reason, user.name)
        else:
            wait = form.get("wait") or None
            result = self.client.vote(
                saga_id, user.name, approve=action == "approve", wait=wait, reason=reason
            )
        return f"{action}: {result.state_before} -> {result.state_after}"


def create_app(client: SagaClient | None = None, web: WebSettings | None = None) -> Starlette:
    """The console app (for uvicorn); `client` and `web` default to the environment's."""
    client = client or SagaClient()
    web = web or WebSettings.from_env(client.settings)
    console = Console(client, web)
    key = signing_key_for(client.settings, client.store)
    routes = [
        Route("/healthz", lambda request: healthz(console), methods=["GET"]),
        Route("/login", login_page(console), methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", pages(console, overview_page)),
        Route("/sagas", pages(console, search_page)),
        Route("/sagas/{saga_id}", pages(console, saga_page)),
        Route("/sagas/{saga_id}/live", pages(console, saga_live)),
        Route("/sagas/{saga_id}/{action}", pages(console, saga_action), methods=["POST"]),
        Route("/api/overview", api(console, api_overview)),
        Route("/api/sagas", api(console, api_search)),
        Route("/api/sagas/{saga_id}", api(console, api_saga)),
        Route("/api/sagas/{saga_id}/{action}", api(console, api_action), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=subkey(key, PURPOSE_WEB_SESSION).hex(),
            session_cookie="saga_console",
            max_age=8 * 3600,
            same_site="strict",
            https_only=web.secure_cookies,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)


# -- plumbing ------------------------------------------------------------------------------

#: A page or API handler: synchronous (it reads the database and may send through the broker),
#: run in the thread pool with the request's form or JSON body already read.
Handler = Callable[[Console, Request, User, dict[str, Any]], Response]


def pages(console: Console, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A page: logged-in users only (else to the login); a POST needs the form's CSRF."""

    async def endpoint(request: Request) -> Response:
        user = session_user(request, console.users)
        if user is None:
            if request.method != "GET":
                return Response("log in first", status_code=401)
            target = quote(
                request.url.path + (f"?{request.url.query}" if request.url.query else "")
            )
            return RedirectResponse(f"/login?next={target}", status_code=303)
        return await _guarded(console, request, user, handler)

    return endpoint


def api(console: Console, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The API: HTTP Basic, or the login session plus the X-CSRF-Token header for writes."""

    async def endpoint(request: Request) -> Response:
        found = basic_user(request, console.users)
        if found is False:
            return _unauthorized()
        user = found if isinstance(found, User) else session_user(request, console.users)
        if user is None:
            return _unauthorized()
        csrf_needed = found is None and request.method != "GET"
        if csrf_needed and not csrf_ok(request, request.headers.get(CSRF_HEADER)):
            return JSONResponse({"error": "missing or wrong X-CSRF-Token"}, status_code=403)
        return await _guarded(console, request, user, handler)

    return endpoint


async def _guarded(console: Console, request: Request, user: User, handler: Handler) -> Response:
    body: dict[str, Any] = {}
    if request.method == "POST":
        if request.url.path.startswith("/api/"):
            raw = await request.body()
            try:
                parsed = json.loads(raw) if raw.strip() else {}
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return _error(request, "the body must be a JSON object", 400)
            body = parsed
        else:
            body = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    try:
        return await run_in_threadpool(handler, console, request, user, body)
    except SagaNotFound as exc:
        return _error(request, str(exc), 404)
    except (InvalidFilter, InvalidRequest) as exc:
        return _error(request, str(exc), 400)
    except OperationRefused as exc:
        return _error(request, str(exc), 409)
    except SagaError as exc:
        return _error(request, str(exc), 400)


def _error(request: Request, message: str, status: int) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return Response(message, status_code=status, media_type="text/plain; charset=utf-8")


def _unauthorized() -> Response:
    return JSONResponse(
        {"error": "authentication required (HTTP Basic or a login session)"},
        status_code=401,
        headers={"WWW-Authenticate": 'Basic realm="saga console"'},
    )


def _forbidden(request: Request, user: User) -> Response:
    return _error(request, f"{user.name} is a {user.role}: only operators act on sagas", 403)


def _ts(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return "" if value is None else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _search_args(request: Request) -> dict[str, Any]:
    q = request.query_params
    args: dict[str, Any] = {
        "states": [s for s in q.getlist("state") if s],
        "saga_type": q.get("type") or None,
        "user_id": q.get("user") or None,
        "since": _time(q.get("since")),
        "until": _time(q.get("until")),
        "page": _int(q.get("page"), 1),
        "page_size": min(_int(q.get("page_size"), PAGE_SIZE), 500),
        "count_limit": COUNT_LIMIT,
    }
    if q.get("key"):
        args["business_key"] = q["key"]
    return args


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidFilter(f"{value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise InvalidFilter(f"{value!r} has no time zone; add Z or +00:00")
    return moment


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        raise InvalidFilter(f"{value!r} is not a number") from None


# -- pages ---------------------------------------------------------------------------------


def healthz(console: Console) -> Response:
    try:
        with console.client.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "error": type(exc).__name__}, 503)
    return JSONResponse({"status": "ok"})


def login_page(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        target = request.query_params.get("next") or "/"
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # only our own pages: no open redirect
        error = None
        if request.method == "POST":
            form = await request.form()
            if not csrf_ok(request, form.get(CSRF_FIELD)):
                error = "The form expired; try again."
            else:
                user = console.users.check(
                    str(form.get("name") or ""), str(form.get("password") or "")
                )
                if user is not None:
                    request.session.clear()
                    request.session[SESSION_USER] = user.name
                    csrf_token(request)  # a new token for the new session
                    return RedirectResponse(target, status_code=303)
                error = "Wrong name or password."
        return console.templates.TemplateResponse(
            request,
            "login.html",
            {"csrf": csrf_token(request), "error": error, "next": target},
            status_code=401 if error else 200,
        )

    return endpoint


async def logout(request: Request) -> Response:
    form = await request.form()
    if csrf_ok(request, form.get(CSRF_FIELD)):
        request.session.clear()
    return RedirectResponse("/login", status_code=303)


def overview_page(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    data = overview.read(console.client.store.engine, console.now())
    return console.page(request, "overview.html", user, data=data)


def search_page(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    args = _search_args(request)
    result = console.client.list_sagas(**args)
    return console.page(
        request, "search.html", user, result=result, q=request.query_params, args=args
    )


def saga_page(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    data = console.saga_data(request.path_params["saga_id"])
    flash = request.session.pop("flash", None)
    return console.page(request, "saga.html", user, flash=flash, **data)


def saga_live(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    data = console.saga_data(request.path_params["saga_id"])
    return console.page(request, "_saga_live.html", user, **data)


def saga_action(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    saga_id, action = request.path_params["saga_id"], request.path_params["action"]
    form = body
    if not csrf_ok(request, form.get(CSRF_FIELD)):
        return _error(request, "the form expired (CSRF token); reload the page", 403)
    if action not in ACTIONS:
        return _error(request, f"no action {action!r}", 404)
    if not user.can_act:
        return _forbidden(request, user)
    try:
        request.session["flash"] = console.act(user, saga_id, action, form)
    except OperationRefused as exc:
        request.session["flash"] = str(exc)
    return RedirectResponse(f"/sagas/{quote(saga_id)}", status_code=303)


# -- API -----------------------------------------------------------------------------------


def api_overview(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    data = overview.read(console.client.store.engine, console.now())
    return JSONResponse(_jsonable(data.as_dict()))


def api_search(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    return JSONResponse(_jsonable(console.client.list_sagas(**_search_args(request)).as_dict()))


def api_saga(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    saga_id = request.path_params["saga_id"]
    status = console.client.status(saga_id)
    events = console.client.audit_trail(saga_id)
    return JSONResponse({"saga": _jsonable(status.as_dict()), "events": _jsonable(events)})


def api_action(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    action = request.path_params["action"]
    if action not in ACTIONS:
        return _error(request, f"no action {action!r}; use one of {', '.join(ACTIONS)}", 404)
    if not user.can_act:
        return _forbidden(request, user)
    done = console.act(user, request.path_params["saga_id"], action, body)
    return JSONResponse({"ok": True, "result": done})
