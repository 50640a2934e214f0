"""Routes: pages, fragments, the stream, stop."""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

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
    stream_with_context,
    url_for,
)
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException

from . import sse, store
from .backends.base import Backend, ChatMessage, Settings
from .render import render_markdown, render_text
from .runs import Runner, Update

logger = logging.getLogger(__name__)
bp = Blueprint("chat", __name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_EVENT_ID = re.compile(r"^[0-9]{1,15}$")
CSRF_HEADER = "X-CSRF-Token"


def init_app(app: Flask) -> None:
    """Register the routes, the database teardown and the security headers."""
    app.register_blueprint(bp)
    app.teardown_appcontext(_close_db)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _http_error)
    app.jinja_env.add_extension("jinja2.ext.i18n")
    app.jinja_env.install_null_translations(newstyle=True)  # type: ignore[attr-defined]
    app.jinja_env.globals.update(render_markdown=render_markdown, render_text=render_text)


# Plumbing -----------------------------------------------------------------

def get_db() -> sqlite3.Connection:
    """Return this request's store connection, opening it on first use."""
    if "db" not in g:
        g.db = store.connect(current_app.config["DATABASE"])
    db: sqlite3.Connection = g.db
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
    sid = session.get("sid")
    if isinstance(sid, str) and store.session_exists(get_db(), sid):
        return f"s:{sid}"
    if not create:
        return None
    sid = store.create_session(get_db())
    session["sid"] = sid
    session.permanent = True
    return f"s:{sid}"


def csrf_token() -> str:
    """Return the session's CSRF token, making one if needed."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        session["csrf"] = token
    return token


def check_csrf() -> None:
    """Refuse a state-changing request without the session's token or from another origin."""
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        parts = urlsplit(origin)
        if parts.netloc != request.host or parts.scheme != request.scheme:
            abort(403, description="This request came from another site and was refused.")
    elif origin == "null":
        abort(403, description="This request came from an opaque origin and was refused.")
    sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent, expected):
        abort(403, description="Your session expired or the form is stale. Reload the page "
                               "and try again.")


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

def _page(conversation: sqlite3.Row | None, messages: list[sqlite3.Row]) -> str:
    owner = current_owner()
    conversations = store.list_conversations(get_db(), owner) if owner else []
    return render_template(
        "chat.html", conversation=conversation, messages=messages,
        conversations=conversations, csrf=csrf_token(), request_key=store.new_id(),
        backend_name=backend().name, model=backend().models()[0],
        max_chars=current_app.config["MAX_MESSAGE_CHARS"],
    )


@bp.get("/")
def index() -> str:
    """Show an empty chat: the start of a new conversation."""
    return _page(None, [])


@bp.get("/c/<cid>")
def conversation(cid: str) -> str:
    """Show one conversation with its whole history."""
    owner = current_owner()
    conv = store.get_conversation(get_db(), owner, valid_id(cid)) if owner else None
    if conv is None:
        abort(404, description="This conversation does not exist, or it is not yours.")
    return _page(conv, store.list_messages(get_db(), cid))


@bp.get("/healthz")
def healthz() -> tuple[dict[str, str], int]:
    """Answer a platform health check (and check the store answers)."""
    get_db().execute("SELECT 1").fetchone()
    return {"status": "ok"}, 200


# Sending ------------------------------------------------------------------

@bp.post("/chat")
def send() -> Any:
    """Store the user's message and a pending reply; answer with both bubbles."""
    check_csrf()
    text = request.form.get("text", "")
    if "\x00" in text:
        abort(400, description="The message contains a NUL character, which is not allowed.")
    text = text.replace("\r\n", "\n").strip()
    if not text:
        abort(400, description="Type a message first.")
    limit = current_app.config["MAX_MESSAGE_CHARS"]
    if len(text) > limit:
        abort(413, description=f"The message is too long: {len(text):,} characters, "
                               f"the limit is {limit:,}.")
    request_key = request.form.get("request_key") or None
    if request_key is not None and not _ID.match(request_key):
        abort(400, description="The form is malformed. Reload the page and try again.")
    owner = current_owner(create=True)
    assert owner is not None
    db = get_db()
    address = request.remote_addr or ""
    _check_rate(db, owner, address)
    cid = request.form.get("conversation", "")
    if cid:
        if store.get_conversation(db, owner, valid_id(cid)) is None:
            abort(404, description="This conversation does not exist, or it is not yours.")
        new = False
    else:
        cid = store.create_conversation(db, owner, model=backend().models()[0])
        new = True
    try:
        user, reply, _created = store.add_turn(
            db, cid, text, model=backend().models()[0], request_key=request_key, owner=owner,
            client_addr=address,
            max_messages=current_app.config["MAX_CONVERSATION_MESSAGES"])
    except store.LimitError as exc:
        abort(409, description=str(exc))
    except ValueError:
        abort(409, description="Wait for the current reply to finish (or stop it) before "
                               "sending another message.")
    if not is_htmx():
        return redirect(url_for("chat.conversation", cid=cid), code=303)
    conv = store.get_conversation(db, owner, cid)
    html = render_template(
        "_turn.html", conversation=conv, messages=[user, reply], new=new,
        conversations=store.list_conversations(db, owner), request_key=store.new_id(),
    )
    response = Response(html)
    if new:
        response.headers["HX-Push-Url"] = url_for("chat.conversation", cid=cid)
    return response


class TooManyRequests(HTTPException):
    """429 with a Retry-After header."""

    code = 429
    name = "Too many requests"

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), ("Retry-After", str(self.retry_after))]


def _check_rate(db: sqlite3.Connection, owner: str, address: str) -> None:
    """Refuse a message past the per-session or per-address limits (counted in the store)."""
    config = current_app.config
    checks = [("owner", owner, config["MESSAGES_PER_MINUTE"], config["REPLIES_IN_FLIGHT"]),
              ("client_addr", address, config["ADDRESS_MESSAGES_PER_MINUTE"],
               config["ADDRESS_REPLIES_IN_FLIGHT"])]
    for column, value, per_minute, in_flight_limit in checks:
        sent, oldest, in_flight = store.recent_activity(db, column, value)
        if sent >= per_minute:
            wait = max(1, int(60 - (time.time() - (oldest or time.time()))) + 1)
            raise TooManyRequests(f"You are sending messages too fast. Try again in {wait} s.",
                                  wait)
        if in_flight >= in_flight_limit:
            raise TooManyRequests("Too many replies are being written at once. Wait for one to "
                                  "finish, or stop it.", 5)


@bp.post("/c/<cid>/delete")
def delete(cid: str) -> Any:
    """Delete a conversation and everything in it."""
    check_csrf()
    owner = current_owner()
    if not owner or not store.delete_conversation(get_db(), owner, valid_id(cid)):
        abort(404, description="This conversation does not exist, or it is not yours.")
    if is_htmx():
        response = Response("")
        response.headers["HX-Redirect"] = url_for("chat.index")
        return response
    return redirect(url_for("chat.index"), code=303)


# Streaming ----------------------------------------------------------------

def _owned_reply(cid: str, mid: str) -> tuple[str, sqlite3.Row]:
    owner = current_owner()
    row = store.get_message(get_db(), owner, valid_id(cid), valid_id(mid)) if owner else None
    if row is None or row["role"] != "assistant":
        abort(404, description="This reply does not exist, or it is not yours.")
    return owner or "", row


def _history(conv: sqlite3.Row, reply: sqlite3.Row) -> list[ChatMessage]:
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
        abort(400, description="Last-Event-ID must be a small non-negative integer.")
    if reply["status"] == "pending":
        conv = store.get_conversation(get_db(), owner, cid)
        assert conv is not None
        settings = Settings(model=conv["model"] or backend().models()[0],
                            temperature=conv["temperature"])
        runner().claim_and_start(reply, settings, _history(conv, reply))
    _close_db()  # the stream may last minutes: hold no connection meanwhile
    database = current_app.config["DATABASE"]

    def load() -> sqlite3.Row | None:
        db = store.connect(database)
        try:
            return store.get_message(db, owner, cid, mid)
        finally:
            db.close()

    message_macro = get_template_attribute("_partials.html", "message")
    snapshot_macro = get_template_attribute("_partials.html", "reply_body")
    delta_macro = get_template_attribute("_partials.html", "reply_delta")
    status_text = {"queued": "Queued: waiting for the model…", "generating": "Generating…"}

    def events() -> Iterator[bytes]:
        yield sse.encode_retry(2000)
        try:
            for update in runner().tail(mid, load):
                yield _encode(update)
        except Exception:
            logger.exception("stream of %s failed", mid)
            yield sse.encode_event(sse.ERROR, str(_error_bubble(mid)))

    def _encode(update: Update) -> bytes:
        if update.kind == "ping":
            return sse.encode_comment("ping")
        if update.message is not None:
            return sse.encode_event(update.kind, str(message_macro(update.message, cid)),
                                    update.event_id)
        if update.kind == sse.SNAPSHOT:
            body = snapshot_macro(mid, update.html, update.tail)
            return sse.encode_event(sse.SNAPSHOT, str(body), update.event_id)
        if update.kind == sse.DELTA:
            return sse.encode_event(sse.DELTA, str(delta_macro(mid, update.html, update.tail)),
                                    update.event_id)
        if update.kind == sse.THINK:
            return sse.encode_event(sse.THINK, str(escape(update.html)), update.event_id)
        if update.kind == sse.STATUS:
            return sse.encode_event(sse.STATUS, status_text.get(update.html, ""), update.event_id)
        return sse.encode_event(update.kind, update.html, update.event_id)

    response = Response(stream_with_context(events()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache, no-transform"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _error_bubble(mid: str) -> Markup:
    return Markup('<article class="msg assistant" id="m-{}" data-status="error">'
                  '<div class="bubble"><p class="error" role="alert">The stream failed. Reload the '
                  "page to see the reply.</p></div></article>").format(mid)


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
        abort(409, description="Only the last reply can be written again, once it has finished.")
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
