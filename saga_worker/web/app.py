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
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..audit.chain import iso_utc
from ..client import SagaClient
from ..errors import (
    BrokerUnavailable,
    ConcurrencyConflict,
    DatabaseUnavailable,
    InvalidFilter,
    InvalidRequest,
    OperationRefused,
    SagaError,
    SagaNotFound,
    UnknownDefinitionVersion,
)
from ..keys import subkey
from ..store.keyring import signing_key_for
from . import overview, timeline
from .auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_ID,
    Revoked,
    Throttle,
    basic_credentials,
    csrf_ok,
    csrf_token,
    session_user,
    start_session,
)
from .settings import WebSettings
from .users import User, UsersFile

HERE = Path(__file__).parent
PURPOSE_WEB_SESSION = "web session"
ACTIONS = ("retry", "abort", "approve", "reject", "migrate")
PAGE_SIZE = 25
#: A login session's lifetime (the cookie's Max-Age) in seconds.
SESSION_SECONDS = 8 * 3600
#: Far beyond any real page: keeps OFFSET inside a 64-bit integer.
MAX_PAGE = 1_000_000
#: The largest body the console reads: forms and API requests are a few short fields.
MAX_BODY = 64 * 1024
#: Sent with every response: no framing, no caching of saga data, no MIME sniffing.
SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
#: The search counts each state up to this many sagas, then shows "10,000+": a bounded index
#: scan per state instead of counting a million rows on every page (docs/benchmark.md).
COUNT_LIMIT = 10_000


class Console:
    """The console's state: the client (database and engine), users, templates."""

    def __init__(self, client: SagaClient, web: WebSettings) -> None:
        self.client = client
        self.web = web
        self.users = UsersFile(web.users_file)
        self.revoked = Revoked(SESSION_SECONDS)
        self.throttle = Throttle()
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

    def act(
        self, user: User, saga_id: str, action: str, form: dict[str, Any]
    ) -> tuple[str, tuple[str, ...]]:
        """Run an operator action as `user`: what happened, in words, and the messages that
        could not be sent (recovery re-sends them after their deadline)."""
        reason = str(form.get("reason") or f"{action} from the console")
        if action == "retry":
            force = _flag(form.get("force", False))
            result = self.client.retry(saga_id, user.name, force=force, reason=reason)
        elif action == "abort":
            result = self.client.abort(saga_id, reason, user.name)
        elif action == "migrate":
            return self._migrate(user, saga_id, form, reason)
        else:
            wait = form.get("wait") or None
            result = self.client.vote(
                saga_id, user.name, approve=action == "approve", wait=wait, reason=reason
            )
        return f"{action}: {result.state_before} -> {result.state_after}", result.send_errors

    def _migrate(
        self, user: User, saga_id: str, form: dict[str, Any], reason: str
    ) -> tuple[str, tuple[str, ...]]:
        """`saga-worker migrate SAGA_ID --to VERSION --map OLD=NEW ...` as `user`; the map is
        a JSON object or list of `OLD=NEW` (API), or `OLD=NEW` lines or commas (form)."""
        to_version = form.get("to_version")
        if not isinstance(to_version, str) or not to_version.strip():
            raise InvalidFilter("migrate needs to_version: the definition version to move to")
        mapping = form.get("map") or []
        if isinstance(mapping, str):
            mapping = [p.strip() for p in mapping.replace(",", "\n").splitlines() if p.strip()]
        result = self.client.migrate(
            saga_id, to_version.strip(), user.name, mapping=mapping, reason=reason
        )
        where = f" (resumes at {result.resume_step})" if result.resume_step else ""
        text = f"migrate: {result.from_version} -> {result.to_version}{where}"
        return text, result.send_errors


def create_app(client: SagaClient | None = None, web: WebSettings | None = None) -> Starlette:
    """The console app (for uvicorn); `client` and `web` default to the environment's."""
    client = client or SagaClient()
    web = web or WebSettings.from_env(client.settings)
    console = Console(client, web)
    key = signing_key_for(client.settings, client.store)
    routes = [
        Route("/sagas/find", pages(console, find_page)),
        Route("/healthz", lambda request: healthz(console), methods=["GET"]),
        Route("/login", login_page(console), methods=["GET", "POST"]),
        Route("/logout", logout(console), methods=["POST"]),
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
            max_age=SESSION_SECONDS,
            same_site="strict",
            https_only=web.secure_cookies,
        )
    ]
    middleware.append(Middleware(SecurityHeaders))
    return Starlette(routes=routes, middleware=middleware)


class SecurityHeaders:
    """SECURITY_HEADERS on every response, and `Cache-Control: no-store` but for /static."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- plumbing ------------------------------------------------------------------------------

#: A page or API handler: synchronous (it reads the database and may send through the broker),
#: run in the thread pool with the request's form or JSON body already read.
Handler = Callable[[Console, Request, User, dict[str, Any]], Response]


def pages(console: Console, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A page: logged-in users only (else to the login); a POST needs the form's CSRF."""

    async def endpoint(request: Request) -> Response:
        user = await run_in_threadpool(session_user, request, console.users, console.revoked)
        if user is None:
            # The live fragment is fetched by the page's script: a redirect would paste the
            # login page into the saga page; the script reloads the page on a 401.
            if request.method != "GET" or request.url.path.endswith("/live"):
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
        credentials = basic_credentials(request)
        if credentials is False:
            return _unauthorized()
        user: User | None
        if isinstance(credentials, tuple):
            name, password = credentials
            wait = console.throttle.retry_after(request, name)
            if wait:
                return _throttled(request, wait)
            user = await run_in_threadpool(console.users.check, name, password)
            if user is None:
                console.throttle.failed(request, name)
                return _unauthorized()
        else:
            user = await run_in_threadpool(session_user, request, console.users, console.revoked)
            if user is None:
                return _unauthorized()
            csrf_needed = request.method not in ("GET", "HEAD")
            if csrf_needed and not csrf_ok(request, request.headers.get(CSRF_HEADER)):
                return JSONResponse({"error": "missing or wrong X-CSRF-Token"}, status_code=403)
        if request.method == "POST" and not _is_json(request):
            # A cross-site form (or a browser's cached Basic credentials) cannot send JSON
            # without a CORS preflight, which this API never grants.
            return JSONResponse({"error": "send application/json"}, status_code=415)
        return await _guarded(console, request, user, handler)

    return endpoint


async def _guarded(console: Console, request: Request, user: User, handler: Handler) -> Response:
    body: dict[str, Any] = {}
    if request.method == "POST":
        if request.url.path.startswith("/api/"):
            raw = await _read_body(request)
            if raw is None:
                return _error(request, f"the body is over {MAX_BODY} bytes", 413)
            try:
                parsed = json.loads(raw) if raw.strip() else {}
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return _error(request, "the body must be a JSON object", 400)
            body = parsed
        else:
            form = await _small_form(request)
            if form is None:
                return _error(request, "the form is too large", 413)
            body = form
    try:
        return await run_in_threadpool(handler, console, request, user, body)
    except SagaNotFound as exc:
        return _error(request, str(exc), 404)
    except (InvalidFilter, InvalidRequest) as exc:
        return _error(request, str(exc), 400)
    except (OperationRefused, ConcurrencyConflict) as exc:
        return _error(request, str(exc), 409)
    except (DatabaseUnavailable, BrokerUnavailable) as exc:
        return _error(request, str(exc), 503)
    except SagaError as exc:
        return _error(request, str(exc), 400)


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json"


async def _read_body(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _small_form(request: Request) -> dict[str, str] | None:
    """A form of a few short text fields (login, logout, actions), or None when too large."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    try:
        form = await request.form(max_files=0, max_fields=16, max_part_size=8 * 1024)
    except HTTPException:
        return None
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _throttled(request: Request, wait: int) -> Response:
    response = _error(request, f"too many failed logins; try again in {wait} s", 429)
    response.headers["retry-after"] = str(wait)
    return response


def _flag(value: object) -> bool:
    """A yes/no field: a JSON boolean, or a form's checkbox value."""
    if isinstance(value, bool):
        return value
    if value in ("1", "on", "true"):
        return True
    if value in ("", "0", "off", "false"):
        return False
    raise InvalidRequest("force", "must be true or false")


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
        number = int(value) if value else default
    except ValueError:
        raise InvalidFilter(f"{value!r} is not a number") from None
    if number > MAX_PAGE:
        raise InvalidFilter(f"{number} is too large (at most {MAX_PAGE})")
    return number


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
        status = 200
        if request.method == "POST":
            form = await _small_form(request)
            if form is None:
                return Response("the form is too large", status_code=413)
            name = form.get("name", "")
            wait = console.throttle.retry_after(request, name)
            if not csrf_ok(request, form.get(CSRF_FIELD)):
                error, status = "The form expired; try again.", 401
            elif wait:
                error, status = f"Too many failed logins; try again in {wait} s.", 429
            else:
                password = form.get("password", "")
                user = await run_in_threadpool(console.users.check, name, password)
                if user is not None:
                    start_session(request, user)  # a new session and CSRF token
                    return RedirectResponse(target, status_code=303)
                console.throttle.failed(request, name)
                error, status = "Wrong name or password.", 401
        return console.templates.TemplateResponse(
            request,
            "login.html",
            {"csrf": csrf_token(request), "error": error, "next": target},
            status_code=status,
        )

    return endpoint


def logout(console: Console) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        form = await _small_form(request)
        if form is None or not csrf_ok(request, form.get(CSRF_FIELD)):
            # Say so: a redirect to the login would look like a logout that happened.
            return Response(
                "not logged out: the page was stale; reload it and log out again",
                status_code=403,
                media_type="text/plain; charset=utf-8",
            )
        sid = request.session.get(SESSION_ID)
        if isinstance(sid, str):
            console.revoked.add(sid)  # a copy of the cookie is worth nothing from now on
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    return endpoint


def overview_page(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    data = overview.read(console.client.store.engine, console.now(), console.client.redactor.text)
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
        done, not_sent = console.act(user, saga_id, action, form)
        request.session["flash"] = done + "".join(
            f"; warning: not sent ({error}), recovery re-sends it after its deadline"
            for error in not_sent
        )
    except (OperationRefused, InvalidFilter, InvalidRequest, UnknownDefinitionVersion) as exc:
        # What the operator asked cannot be done: said on the saga's page, where they act.
        request.session["flash"] = str(exc)
    return RedirectResponse(f"/sagas/{quote(saga_id)}", status_code=303)


# -- API -----------------------------------------------------------------------------------


def api_overview(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    data = overview.read(console.client.store.engine, console.now(), console.client.redactor.text)
    return JSONResponse(_jsonable(data.as_dict()))


def api_search(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    saga_id = request.query_params.get("saga_id")
    if saga_id:  # one saga by its id, as a page of zero or one
        try:
            found = [_jsonable(console.client.status(saga_id).as_dict())]
        except SagaNotFound:
            found = []
        return JSONResponse({"items": found, "page": 1, "pages": 1, "total": len(found)})
    return JSONResponse(_jsonable(console.client.list_sagas(**_search_args(request)).as_dict()))


def find_page(console: Console, request: Request, user: User, body: dict[str, Any]) -> Response:
    """The search form's saga id field: straight to that saga's page."""
    saga_id = request.query_params.get("saga_id", "")
    console.client.status(saga_id)  # 400 for a malformed id, 404 for an unknown one
    return RedirectResponse(f"/sagas/{quote(saga_id)}", status_code=303)


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
    done, not_sent = console.act(user, request.path_params["saga_id"], action, body)
    return JSONResponse({"ok": True, "result": done, "send_errors": list(not_sent)})
