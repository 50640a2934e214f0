"""Routes: pages, fragments, the stream, stop."""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, tzinfo
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    get_template_attribute,
    redirect,
    render_template,
    request,
    session,
    stream_template,
    url_for,
)
from flask.ctx import RequestContext
from flask_babel import format_decimal, gettext
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException

from . import identity, sse, store
from .backends.base import Backend, ChatMessage, Settings
from .render import StreamRenderer, render_markdown, render_text
from .runs import Runner, Update

logger = logging.getLogger(__name__)
bp = Blueprint("chat", __name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_EVENT_ID = re.compile(r"^[0-9]{1,15}$")
CSRF_HEADER = "X-CSRF-Token"


def init_app(app: Flask) -> None:
    """Register the routes, the database teardown and the security headers."""
    app.register_blueprint(bp)
    app.before_request(_refuse_forms_that_are_not_utf8)
    app.teardown_appcontext(_close_db)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    app.jinja_env.globals.update(render_markdown=render_markdown, render_text=render_text,
                                 csrf_token=csrf_token)
    app.context_processor(_page_context)


def _refuse_forms_that_are_not_utf8() -> None:
    # Werkzeug silently drops a form it cannot decode, which would surface as a
    # misleading "type a message" or "session expired"; say what is wrong instead.
    if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
        try:
            unquote_to_bytes(request.get_data(cache=True)).decode("utf-8")
        except UnicodeDecodeError:
            abort(400, description=gettext("The form is not valid UTF-8 text."))


def _page_context() -> dict[str, Any]:
    theme = request.cookies.get("theme", "")
    return {"theme": theme if theme in ("light", "dark") else ""}


# Plumbing -----------------------------------------------------------------

def get_db() -> store.Connection:
    """Return this request's store connection, opening it on first use."""
    if "db" not in g:
        g.db = store.connect(current_app.config["DATABASE"])
    db: store.Connection = g.db
    return db


def _close_db(_exc: BaseException | None = None) -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


def runner() -> Runner:
    """Return this worker's runner."""
    result: Runner = current_app.extensions["webchat.runner"]
    return result


def backend() -> Backend:
    """Return the configured model backend."""
    result: Backend = current_app.extensions["webchat.backend"]
    return result


def current_owner(create: bool = False) -> str | None:
    """Return who owns the conversations of this request (the browser session).

    With ``create``, a session is made for a browser that has none yet.
    """
    if user := identity.trusted_user(request, current_app.config):
        return f"u:{user}"
    sid = session.get("sid")
    if not (isinstance(sid, str) and _ID.match(sid)):
        if not create:
            return None
        sid = _new_session()
    if create:
        store.ensure_session(get_db(), sid)
    return f"s:{sid}"


def _new_session() -> str:
    sid = store.new_id()
    session["sid"] = sid
    session.permanent = True
    return sid


def csrf_token() -> str:
    """Return the session's CSRF token, making one (and the session id) if needed.

    The session id is made with the first page, not with the first message: tabs
    opened together then share one id, instead of racing to make one each.
    """
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        session["csrf"] = token
    if not isinstance(session.get("sid"), str):
        _new_session()
    return token


def check_csrf() -> None:
    """Refuse a state-changing request without the session's token or from another origin."""
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        parts = urlsplit(origin)
        if parts.netloc != request.host or parts.scheme != request.scheme:
            abort(403, description=gettext("This request came from another site and was refused."))
    elif origin == "null":
        abort(403, description=gettext("This request came from an opaque origin and was refused."))
    sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(
            sent.encode("utf-8", "replace"), expected.encode()):
        abort(403, description=gettext("Your session expired or the form is stale. Reload the page "
                                       "and try again."))


def valid_id(value: str) -> str:
    """Return ``value`` if it looks like one of our ids, else answer 404."""
    if not _ID.match(value):
        abort(404)
    return value


def is_htmx() -> bool:
    """Tell whether htmx made this request (and it isn't a history restore)."""
    return request.headers.get("HX-Request") == "true" and not request.headers.get(
        "HX-History-Restore-Request")


def _security_headers(response: Response) -> Response:
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.vary.add("HX-Request")
    return response


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    message = exc.description or exc.name
    if request.headers.get("Accept", "").startswith("text/event-stream"):
        response = Response(message, status=code, mimetype="text/plain")
    elif is_htmx():
        response = Response(render_template("_error.html", code=code, message=message),
                            status=code)
    else:
        response = Response(render_template("error.html", code=code, message=message,
                                            title=exc.name), status=code)
    for name, value in exc.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


# Pages --------------------------------------------------------------------

PAGE_MESSAGES = 40  # the latest messages a page shows; older ones load on scrolling up


def group_conversations(conversations: list[store.Row]) -> list[tuple[str, list[store.Row]]]:
    """Group the sidebar by Today / Previous 7 days / Older, in the reader's time zone."""
    zone = _reader_zone()
    today = datetime.now(zone).date()
    groups: dict[str, list[store.Row]] = {"today": [], "week": [], "older": []}
    for conv in conversations:
        day = datetime.fromtimestamp(conv["updated_at"], zone).date()
        key = "today" if day >= today else "week" if (today - day).days <= 7 else "older"
        groups[key].append(conv)
    return [(key, rows) for key, rows in groups.items() if rows]


def _reader_zone() -> tzinfo:
    # app.js stores the browser's IANA time zone in a cookie (URL-encoded); UTC until it has.
    name = unquote(request.cookies.get("tz", ""))
    if name and len(name) < 64:
        try:
            return ZoneInfo(name)
        except (ValueError, ZoneInfoNotFoundError):
            pass
    return UTC


def _sidebar() -> dict[str, Any]:
    owner = current_owner()
    conversations = store.list_conversations(get_db(), owner) if owner else []
    return {"groups": group_conversations(conversations)}


def _page(conversation: store.Row | None, messages: list[store.Row], *,
          editing: str | None = None) -> str:
    models = backend().models()
    current_model = (conversation["model"] if conversation else "") or models[0]
    return render_template(
        "chat.html", conversation=conversation, messages=messages,
        more_before=messages[0]["position"] if messages and messages[0]["position"] > 0 else None,
        csrf=csrf_token(), request_key=store.new_id(), backend_name=backend().name,
        models=models, model=current_model if current_model in models else models[0],
        max_chars=current_app.config["MAX_MESSAGE_CHARS"], editing=editing, **_sidebar(),
    )


@bp.get("/")
def index() -> str:
    """Show an empty chat: the start of a new conversation."""
    return _page(None, [])


def _owned_conversation(cid: str) -> store.Row:
    owner = current_owner()
    conv = store.get_conversation(get_db(), owner, valid_id(cid)) if owner else None
    if conv is None:
        abort(404, description=gettext("This conversation does not exist, or it is not yours."))
    return conv


@bp.get("/c/<cid>")
def conversation(cid: str) -> str:
    """Show one conversation: its latest messages (older ones load on scrolling up)."""
    conv = _owned_conversation(cid)
    editing = request.args.get("edit")
    limit = None if editing else PAGE_MESSAGES
    return _page(conv, store.list_messages(get_db(), cid, limit=limit), editing=editing)


@bp.get("/c/<cid>/messages")
def older_messages(cid: str) -> Any:
    """Return the messages before ``before`` (for scrolling up through a long conversation)."""
    conv = _owned_conversation(cid)
    try:
        before = int(request.args.get("before", ""))
    except ValueError:
        abort(400, description=gettext("`before` must be a message position."))
    if before < 0 or before > 2**40:
        abort(400, description=gettext("`before` must be a message position."))
    messages = store.list_messages(get_db(), cid, limit=PAGE_MESSAGES, before=before)
    if not is_htmx():
        return _page(conv, messages)
    return render_template(
        "_older.html", conversation=conv, messages=messages,
        more_before=messages[0]["position"] if messages and messages[0]["position"] > 0 else None)


@bp.post("/c/<cid>/rename")
def rename(cid: str) -> Any:
    """Give a conversation a new title."""
    check_csrf()
    conv = _owned_conversation(cid)
    title = " ".join(_form_text("title").split())[:200]
    if not title:
        abort(400, description=gettext("A title cannot be empty."))
    store.rename_conversation(get_db(), current_owner() or "", conv["id"], title)
    if not is_htmx():
        return redirect(url_for("chat.conversation", cid=cid), code=303)
    conv = _owned_conversation(cid)
    return render_template("_renamed.html", conversation=conv, **_sidebar())


@bp.post("/c/<cid>/settings")
def settings(cid: str) -> Any:
    """Save the conversation's system prompt, model and temperature."""
    check_csrf()
    conv = _owned_conversation(cid)
    models = backend().models()
    model = request.form.get("model") or conv["model"] or models[0]
    if model not in models:
        abort(400, description=gettext("That model is not offered here."))
    raw_temperature = request.form.get("temperature", "").strip()
    temperature: float | None = None
    if raw_temperature:
        try:
            temperature = float(raw_temperature)
        except ValueError:
            abort(400, description=gettext("The temperature must be a number between 0 and 2."))
        if not 0 <= temperature <= 2:
            abort(400, description=gettext("The temperature must be a number between 0 and 2."))
    system_prompt = _form_text("system_prompt").strip()
    if len(system_prompt) > current_app.config["MAX_MESSAGE_CHARS"]:
        abort(413, description=gettext("The system prompt is too long."))
    store.update_settings(get_db(), current_owner() or "", conv["id"], model=model,
                          system_prompt=system_prompt, temperature=temperature)
    if not is_htmx():
        return redirect(url_for("chat.conversation", cid=cid), code=303)
    return render_template("_saved.html")


@bp.post("/c/<cid>/m/<mid>/edit")
def edit(cid: str, mid: str) -> Any:
    """Change a message of yours and send it again; the turns after it are replaced."""
    check_csrf()
    conv = _owned_conversation(cid)
    text = _message_text()
    model = conv["model"] or backend().models()[0]
    try:
        store.edit_turn(get_db(), cid, valid_id(mid), text, model=model)
    except LookupError:
        abort(404, description=gettext("This message does not exist, or it is not yours."))
    except ValueError:
        abort(409, description=gettext("This message cannot be edited now: wait for the reply to "
                                       "finish, or stop it."))
    if not is_htmx():
        return redirect(url_for("chat.conversation", cid=cid), code=303)
    messages = store.list_messages(get_db(), cid, limit=PAGE_MESSAGES)
    response = Response(render_template(
        "_transcript.html", conversation=conv, messages=messages,
        more_before=messages[0]["position"] if messages and messages[0]["position"] > 0 else None))
    response.headers["HX-Replace-Url"] = url_for("chat.conversation", cid=cid)
    return response


@bp.get("/search")
def search() -> str:
    """Search every conversation of yours."""
    query = request.args.get("q", "")[:200]
    owner = current_owner()
    results = store.search(get_db(), owner, query) if owner and query.strip() else []
    return render_template("search.html", query=query, results=results, csrf=csrf_token(),
                           snippet=_snippet_html, **_sidebar())


def _snippet_html(text: str) -> Markup:
    escaped = str(escape(text))
    return Markup(escaped.replace(store.SNIPPET_START, "<mark>")
                  .replace(store.SNIPPET_END, "</mark>"))


@bp.get("/c/<cid>/export.<fmt>")
def export(cid: str, fmt: str) -> Response:
    """Download a conversation as Markdown or JSON."""
    conv = _owned_conversation(cid)
    messages = store.list_messages(get_db(), cid)
    safe_title = re.sub(r"[^\w.-]+", "-", conv["title"], flags=re.UNICODE).strip("-")[:60]
    filename = f"{safe_title or 'conversation'}.{fmt}"
    if fmt == "json":
        data = {
            "id": conv["id"], "title": conv["title"], "model": conv["model"],
            "system_prompt": conv["system_prompt"], "temperature": conv["temperature"],
            "created_at": _iso(conv["created_at"]),
            "messages": [{"role": m["role"], "content": m["content"],
                          **({"reasoning": m["reasoning"]} if m["reasoning"] else {}),
                          "status": m["status"], "model": m["model"] or None,
                          "created_at": _iso(m["created_at"])} for m in messages],
        }
        body = json.dumps(data, ensure_ascii=False, indent=2)
        mimetype = "application/json"
    elif fmt == "md":
        parts = [f"# {conv['title']}\n"]
        if conv["system_prompt"]:
            parts.append(f"> System prompt: {conv['system_prompt']}\n")
        for m in messages:
            who = "You" if m["role"] == "user" else f"Assistant ({m['model'] or 'model'})"
            parts.append(f"## {who}\n\n{m['content']}\n")
        body = "\n".join(parts)
        mimetype = "text/markdown"
    else:
        abort(404)
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Disposition"] = (
        f"attachment; filename=\"conversation.{fmt}\"; filename*=UTF-8''{quote(filename)}")
    return response


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


@bp.post("/theme")
def theme() -> Any:
    """Remember light, dark or system colours (for pages without JavaScript too)."""
    check_csrf()
    choice = request.form.get("theme", "")
    response = redirect(_safe_back(), code=303)
    if choice in ("light", "dark"):
        response.set_cookie("theme", choice, max_age=365 * 86400, samesite="Lax",
                            secure=request.is_secure)
    else:
        response.delete_cookie("theme")
    return response


def _safe_back() -> str:
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("chat.index")


@bp.get("/healthz")
def healthz() -> tuple[dict[str, str], int]:
    """Answer a platform health check (and check the store answers)."""
    get_db().execute("SELECT 1").fetchone()
    return {"status": "ok"}, 200


# Sending ------------------------------------------------------------------

def _form_text(name: str) -> str:
    """Return a form field as text, refusing NUL characters and lone surrogates."""
    value = request.form.get(name, "")
    if "\x00" in value:
        abort(400, description=gettext("The text contains a NUL character, which is not allowed."))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        abort(400, description=gettext("The text is not valid Unicode."))
    return value


def _message_text() -> str:
    text = _form_text("text").replace("\r\n", "\n").strip()
    if not text:
        abort(400, description=gettext("Type a message first."))
    limit = current_app.config["MAX_MESSAGE_CHARS"]
    if len(text) > limit:
        abort(413, description=gettext(
            "The message is too long: %(length)s characters, the limit is %(limit)s.",
            length=format_decimal(len(text)), limit=format_decimal(limit)))
    return text


@bp.post("/chat")
def send() -> Any:
    """Store the user's message and a pending reply; answer with both bubbles."""
    check_csrf()
    text = _message_text()
    request_key = request.form.get("request_key") or None
    if request_key is not None and not _ID.match(request_key):
        abort(400, description=gettext("The form is malformed. Reload the page and try again."))
    owner = current_owner(create=True)
    assert owner is not None
    db = get_db()
    address = request.remote_addr or ""
    _check_rate(db, owner, address)
    _admit()
    models = backend().models()
    model = request.form.get("model") or models[0]
    if model not in models:
        abort(400, description=gettext("That model is not offered here."))
    cid = request.form.get("conversation", "")
    if cid:
        conv = store.get_conversation(db, owner, valid_id(cid))
        if conv is None:
            abort(404, description=gettext("This conversation does not exist, or it is not yours."))
        if "model" in request.form and model != conv["model"]:
            store.update_settings(db, owner, cid, model=model, system_prompt=conv["system_prompt"],
                                  temperature=conv["temperature"])
        new = False
    else:
        cid = store.create_conversation(db, owner, model=model)
        new = True
    try:
        user, reply, _created = store.add_turn(
            db, cid, text, model=model, request_key=request_key, owner=owner,
            client_addr=address,
            max_messages=current_app.config["MAX_CONVERSATION_MESSAGES"],
            limits=_rate_limits())
    except store.RateLimitError as exc:
        raise _too_many(exc) from None
    except store.LimitError as exc:
        abort(409, description=str(exc))
    except ValueError:
        abort(409, description=gettext("Wait for the current reply to finish (or stop it) before "
                                       "sending another message."))
    if not is_htmx():
        return _page_without_javascript(owner, cid, reply)
    conv = store.get_conversation(db, owner, cid)
    html = render_template(
        "_turn.html", conversation=conv, messages=[user, reply], new=new,
        request_key=store.new_id(), csrf=csrf_token(), models=models, model=model, **_sidebar(),
    )
    response = Response(html)
    if new:
        response.headers["HX-Push-Url"] = url_for("chat.conversation", cid=cid)
    return response


def _page_without_javascript(owner: str, cid: str, reply: store.Row) -> Response:
    """Answer a plain form POST with the page, the reply streaming into it as HTML.

    Without JavaScript there is no SSE: the response itself stays open and
    finished blocks of the reply are sent as they are written (chunked HTML).
    """
    conv = store.get_conversation(get_db(), owner, cid)
    assert conv is not None
    _start_if_pending(owner, cid, reply)
    mid = reply["id"]
    load = _reply_loader(owner, cid, mid)

    def live() -> Iterator[Markup]:
        renderer = StreamRenderer()
        for update in runner().tail(mid, load):
            if update.message is not None:
                blocks, tail = renderer.feed(update.message["content"])
                yield Markup("".join(blocks) + tail)
                return
            run = runner().runs.get(mid)
            row = None if run is not None else load()
            content = run.content if run is not None else (row["content"] if row else "")
            blocks, _tail = renderer.feed(content)
            if blocks:
                yield Markup("".join(blocks))

    models = backend().models()
    context = {
        "conversation": conv, "messages": store.list_messages(get_db(), cid, limit=PAGE_MESSAGES),
        "more_before": None, "csrf": csrf_token(), "request_key": store.new_id(),
        "backend_name": backend().name, "models": models,
        "model": conv["model"] if conv["model"] in models else models[0],
        "max_chars": current_app.config["MAX_MESSAGE_CHARS"], "editing": None,
        "live_id": mid, "live": live(), "load_live": load, **_sidebar(),
    }
    _close_db()  # the page may stream for minutes: hold no connection meanwhile
    return Response(stream_template("chat.html", **context), mimetype="text/html")


def _start_if_pending(owner: str, cid: str, reply: store.Row) -> None:
    """Start the reply's run in this worker if nobody has yet (the owner's first look)."""
    if reply["status"] == "pending":
        _admit()
        conv = store.get_conversation(get_db(), owner, cid)
        assert conv is not None
        runner().claim_and_start(reply, _settings(conv), _history(conv, reply))


def _reply_loader(owner: str, cid: str, mid: str) -> Callable[[], store.Row | None]:
    """Return a function that re-reads the reply, each time on a connection of its own.

    Caveat: it runs inside streaming generators, after the request's own
    connection is closed; it captures what it needs instead of using ``g``.
    """
    database = current_app.config["DATABASE"]

    def load() -> store.Row | None:
        db = store.connect(database)
        try:
            return store.get_message(db, owner, cid, mid)
        finally:
            db.close()

    return load


def _settings(conv: store.Row) -> Settings:
    return Settings(model=conv["model"] or backend().models()[0], temperature=conv["temperature"])


class ServerBusy(HTTPException):
    """503 with a Retry-After header: this worker writes as many replies as it may."""

    code = 503
    name = "Busy"

    def __init__(self, retry_after: int = 10) -> None:
        super().__init__(gettext("The server is busy writing other replies. Try again in a "
                                 "few seconds."))
        self.retry_after = retry_after

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), ("Retry-After", str(self.retry_after))]


def _admit() -> None:
    """Turn a new reply away at once when this worker is at its limit."""
    if len(runner().runs) >= current_app.config["MAX_REPLIES_PER_WORKER"]:
        raise ServerBusy()


class TooManyRequests(HTTPException):
    """429 with a Retry-After header."""

    code = 429
    name = "Too many requests"

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), ("Retry-After", str(self.retry_after))]


def _rate_limits() -> store.RateLimits:
    config = current_app.config
    return store.RateLimits(
        owner_per_minute=config["MESSAGES_PER_MINUTE"],
        owner_in_flight=config["REPLIES_IN_FLIGHT"],
        address_per_minute=config["ADDRESS_MESSAGES_PER_MINUTE"],
        address_in_flight=config["ADDRESS_REPLIES_IN_FLIGHT"])


def _too_many(exc: store.RateLimitError) -> TooManyRequests:
    if exc.kind == "per_minute":
        return TooManyRequests(gettext("You are sending messages too fast. Try again in "
                                       "%(seconds)s s.", seconds=exc.retry_after),
                               exc.retry_after)
    return TooManyRequests(gettext("Too many replies are being written at once. Wait "
                                   "for one to finish, or stop it."), exc.retry_after)


def _check_rate(db: store.Connection, owner: str, address: str) -> None:
    """Refuse early a message past the limits; ``add_turn`` checks again, atomically."""
    try:
        store.check_rate(db, owner, address, _rate_limits())
    except store.RateLimitError as exc:
        raise _too_many(exc) from None


@bp.post("/c/<cid>/delete")
def delete(cid: str) -> Any:
    """Delete a conversation and everything in it."""
    check_csrf()
    owner = current_owner()
    if not owner or not store.delete_conversation(get_db(), owner, valid_id(cid)):
        abort(404, description=gettext("This conversation does not exist, or it is not yours."))
    if is_htmx():
        response = Response("")
        response.headers["HX-Redirect"] = url_for("chat.index")
        return response
    return redirect(url_for("chat.index"), code=303)


# Streaming ----------------------------------------------------------------

def _owned_reply(cid: str, mid: str) -> tuple[str, store.Row]:
    owner = current_owner()
    row = store.get_message(get_db(), owner, valid_id(cid), valid_id(mid)) if owner else None
    if row is None or row["role"] != "assistant":
        abort(404, description=gettext("This reply does not exist, or it is not yours."))
    return owner or "", row


def _history(conv: store.Row, reply: store.Row) -> list[ChatMessage]:
    messages = []
    if conv["system_prompt"]:
        messages.append(ChatMessage("system", conv["system_prompt"]))
    for row in store.history_before(get_db(), conv["id"], reply["position"]):
        if row["content"]:
            messages.append(ChatMessage(row["role"], row["content"]))
    if reply["content"]:  # continuing: the model picks up where the text stops
        messages.append(ChatMessage("assistant", reply["content"]))
    return messages


@bp.get("/c/<cid>/m/<mid>/stream")
def stream(cid: str, mid: str) -> Response:
    """Stream a reply as named SSE events carrying HTML fragments.

    Idempotent: a finished reply re-sends its snapshot and ``done``. The first
    request for a pending reply starts its run (in this worker).
    """
    owner, reply = _owned_reply(cid, mid)
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is not None and not _EVENT_ID.match(last_event_id):
        abort(400, description=gettext("Last-Event-ID must be a small non-negative integer."))
    _start_if_pending(owner, cid, reply)
    _close_db()  # the stream may last minutes: hold no connection meanwhile
    load = _reply_loader(owner, cid, mid)

    tail = runner().tail(mid, load, reply)
    message_macro = get_template_attribute("_partials.html", "message")
    snapshot_macro = get_template_attribute("_partials.html", "reply_body")
    delta_macro = get_template_attribute("_partials.html", "reply_delta")
    # What needs the reader's language, links or the CSRF token (the closing
    # message, a status line, the failure notice) is rendered in a request context
    # made anew from this request's environ when it is needed: the stream runs after
    # the view has returned, and a context copy held all along cost 4 KB a stream.
    # It gets this view's request and session: parsing the cookies and decoding and
    # verifying the session again were a quarter of the closing message's cost.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    asked = request._get_current_object()  # type: ignore[attr-defined]
    opened = session._get_current_object()  # type: ignore[attr-defined]

    def in_request(render: Callable[[], Any]) -> str:
        with RequestContext(app, asked.environ, request=asked, session=opened):
            return str(render())

    def events() -> Iterator[bytes]:
        yield sse.encode_retry(2000)
        try:
            for update in tail:
                yield _encode(update)
        except Exception:
            logger.exception("stream of %s failed", mid)
            yield sse.encode_event(sse.ERROR, in_request(lambda: _error_bubble(mid)))

    def _encode(update: Update) -> bytes:
        kind = update.kind
        if kind == sse.TEXT:  # most events: a token or a few
            return sse.encode_event(sse.TEXT, escape(update.html), update.event_id)
        if kind == "ping":
            return sse.encode_comment("ping")
        if update.message is not None:
            # The page already holds the final body (the last delta): keep it.
            row = update.message
            return sse.encode_event(
                kind, in_request(lambda: message_macro(row, cid, keep_body=True)), update.event_id)
        if kind == sse.SNAPSHOT:
            body = snapshot_macro(mid, update.html, update.tail)
            return sse.encode_event(sse.SNAPSHOT, str(body), update.event_id)
        if kind == sse.DELTA:
            return sse.encode_event(sse.DELTA, str(delta_macro(mid, update.html, update.tail)),
                                    update.event_id)
        if kind in (sse.THINK, sse.THOUGHT):
            return sse.encode_event(kind, escape(update.html), update.event_id)
        if kind == sse.STATUS:
            text = _STATUS_TEXT.get(update.html)
            return sse.encode_event(sse.STATUS, in_request(text) if text else "", update.event_id)
        return sse.encode_event(kind, update.html, update.event_id)

    response = EventStreamResponse(events(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache, no-transform"
    response.headers["X-Accel-Buffering"] = "no"
    return response


class _EventStreamBody:
    """A stream's WSGI body: the server iterates the event generator itself."""

    def __init__(self, events: Iterator[bytes], close: Callable[[], None]) -> None:
        self._events = events
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        self._close()


class EventStreamResponse(Response):
    """A response whose body is an event generator, handed to the server as it is.

    Why: werkzeug wraps a body in two Python iterators (``ClosingIterator`` around
    ``iter_encoded``), a cost paid on every event, one per token. Caveat: the
    generator must yield bytes; ``close`` (and the ``call_on_close`` hooks) still run.
    """

    def get_app_iter(self, environ: dict[str, Any]) -> Any:
        if environ["REQUEST_METHOD"] == "HEAD" or self.response is None:
            return super().get_app_iter(environ)
        return _EventStreamBody(iter(self.response), self.close)  # type: ignore[arg-type]


# A reply's status line, in the reader's language (rendered inside a request context).
_STATUS_TEXT: dict[str, Callable[[], str]] = {
    "queued": lambda: gettext("Queued: waiting for the model…"),
    "generating": lambda: gettext("Generating…"),
}


def _error_bubble(mid: str) -> Markup:
    return Markup('<article class="msg assistant" id="m-{}" data-status="error">'
                  '<div class="bubble"><p class="error" role="alert">{}</p></div></article>'
                  ).format(mid, gettext("The stream failed. Reload the page to see the reply."))


@bp.post("/c/<cid>/m/<mid>/regenerate")
def regenerate(cid: str, mid: str) -> Any:
    """Write the last reply again from scratch."""
    return _restart(cid, mid, keep_text=False)


@bp.post("/c/<cid>/m/<mid>/continue")
def continue_reply(cid: str, mid: str) -> Any:
    """Continue a stopped or interrupted reply from where its text ends."""
    return _restart(cid, mid, keep_text=True)


def _restart(cid: str, mid: str, *, keep_text: bool) -> Any:
    check_csrf()
    _owner, _reply = _owned_reply(cid, mid)
    if not store.restart_reply(get_db(), cid, mid, keep_text=keep_text):
        abort(409, description=gettext("Only the last reply can be written again, once it has "
                                       "finished."))
    if not is_htmx():
        return redirect(url_for("chat.conversation", cid=cid), code=303)
    row = store.message_by_id(get_db(), mid)
    macro = get_template_attribute("_partials.html", "message")
    return Response(str(macro(row, cid)))


@bp.post("/c/<cid>/m/<mid>/stop")
def stop(cid: str, mid: str) -> Any:
    """Stop a reply that is being written; its text so far is kept."""
    check_csrf()
    _owner, reply = _owned_reply(cid, mid)
    if reply["status"] in store.ACTIVE:
        runner().stop(mid)
    if is_htmx():
        return Response("", status=200)
    return redirect(url_for("chat.conversation", cid=cid), code=303)
