"""The chat inside other sites: ``/embed`` for iframes, ``/embed.js`` for the host page.

``/embed`` is chat.html made compact. Only the origins in ``WEBCHAT_EMBED_ORIGINS`` may
frame it (CSP ``frame-ancestors``); every other page keeps ``frame-ancestors 'none'``.
Inside a cross-site iframe a ``SameSite=Lax`` cookie is never sent, so the embedded
chat keeps its session in a cookie of its own, ``SameSite=None; Secure; Partitioned``
(CHIPS: kept per host site even where third-party cookies are blocked).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    has_request_context,
    render_template,
    request,
    send_from_directory,
)
from flask.sessions import SecureCookieSessionInterface
from flask_babel import force_locale

from . import i18n, store, views

bp = Blueprint("embed", __name__)

EMBED_HEADER = "X-Webchat-Embed"  # sent by every htmx request of the embedded page
_LANG = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,3}$")
_COLOR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")


def init_app(app: Flask) -> None:
    """Register /embed and /embed.js, the embed session cookie and the framing policy."""
    app.register_blueprint(bp)
    app.session_interface = EmbedSessionInterface()
    # after_request functions run last-registered first: at the front of the list this
    # one runs after views' security headers, so it can loosen them for /embed alone.
    app.after_request_funcs.setdefault(None, []).insert(0, _frame_policy)


# Pages --------------------------------------------------------------------

@bp.get("/embed")
def page() -> str:
    """Show the chat made for an iframe: compact header, no sidebar unless asked.

    ``?c=<id>`` opens that conversation, ``?new=1`` a new one; otherwise the latest
    conversation goes on. ``theme``, ``color``, ``lang`` and ``sidebar`` come from
    the snippet's data- attributes.
    """
    db = views.get_db()
    owner = views.current_owner()
    conversation: store.Row | None = None
    cid = request.args.get("c", "")
    if cid:
        conversation = store.get_conversation(db, owner, views.valid_id(cid)) if owner else None
        if conversation is None:
            abort(404, description="This conversation does not exist, or it is not yours.")
    elif owner and not request.args.get("new"):
        latest = store.list_conversations(db, owner, limit=1)
        conversation = latest[0] if latest else None
    messages = (store.list_messages(db, conversation["id"], limit=views.PAGE_MESSAGES)
                if conversation is not None else [])
    options = embed_options(request.args)
    # The host page's data-lang picks the catalog (else the reader's browser does); the
    # page's htmx requests say it again in Accept-Language, as the reader's cookie
    # (the language switch) is not sent into a cross-site frame.
    language = i18n.best_language([(options["lang"], 1.0)]) if "lang" in options else None
    models = views.backend().models()
    current_model = (conversation["model"] if conversation else "") or models[0]
    conversations = store.list_conversations(db, owner) if owner else []
    with force_locale(language) if language else nullcontext():
        # The same context as views._page, for the same chat.html underneath.
        return render_template(
            "embed.html", conversation=conversation, messages=messages,
            more_before=(messages[0]["position"] if messages and messages[0]["position"] > 0
                         else None),
            csrf=views.csrf_token(), request_key=store.new_id(),
            backend_name=views.backend().name,
            models=models, model=current_model if current_model in models else models[0],
            max_chars=current_app.config["MAX_MESSAGE_CHARS"], editing=None,
            groups=views.group_conversations(conversations),
            theme=options.get("theme", ""),
            embed_language=i18n.LANGUAGES[language][0] if language else "",
            embed_sidebar=options.get("sidebar") == "1",
            embed_query=urlencode(options),
            embed_origins=current_app.config["EMBED_ORIGINS"],
        )


@bp.get("/embed.js")
def script() -> Response:
    """Serve the host page's snippet (it only adds a button and an iframe)."""
    static = current_app.static_folder
    assert static is not None
    response = send_from_directory(static, "embed.js", max_age=300)
    # Host pages that require CORP (COEP: require-corp) may load it too.
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    return response


def embed_options(args: Any) -> dict[str, str]:
    """Return the valid display options among ``args`` (theme, color, lang, sidebar)."""
    options: dict[str, str] = {}
    if args.get("theme") in ("light", "dark"):
        options["theme"] = args["theme"]
    if _COLOR.match(args.get("color", "")):
        options["color"] = args["color"]
    if _LANG.match(args.get("lang", "")):
        options["lang"] = args["lang"]
    if args.get("sidebar") == "1":
        options["sidebar"] = "1"
    return options


# Framing ------------------------------------------------------------------

def _frame_policy(response: Response) -> Response:
    """Let the allowed origins frame /embed; every other response stays unframeable."""
    if request.endpoint != "embed.page":
        return response
    origins = current_app.config["EMBED_ORIGINS"]
    if not origins:
        return response  # frame-ancestors 'none' and X-Frame-Options: DENY, as everywhere
    policy = response.headers.get("Content-Security-Policy", "")
    response.headers["Content-Security-Policy"] = with_frame_ancestors(policy, origins)
    # Browsers ignore X-Frame-Options once CSP frame-ancestors is there; drop it anyway,
    # as it would say DENY.
    response.headers.pop("X-Frame-Options", None)
    return response


def with_frame_ancestors(policy: str, origins: list[str]) -> str:
    """Return the CSP ``policy`` with its frame-ancestors directive set to ``origins``."""
    directives = [part.strip() for part in policy.split(";") if part.strip()]
    kept = [d for d in directives if d.split()[0].lower() != "frame-ancestors"]
    return "; ".join([*kept, "frame-ancestors " + " ".join(origins)])


# Cookies ------------------------------------------------------------------

def is_embed_request() -> bool:
    """Tell whether this request comes from the embedded chat (and so uses its cookie).

    The page itself, its htmx requests (they carry X-Webchat-Embed), and its
    EventSource and other sub-requests (Referer /embed on this host). In a cross-site
    frame only the embed cookie is sent at all, so its presence alone decides there.
    """
    if not has_request_context():
        return False
    # Asked up to five times a request (the session's cookie settings): answer once.
    known: bool | None = request.environ.get("webchat.embed")
    if known is None:
        known = request.environ["webchat.embed"] = _is_embed_request()
    return known


def _is_embed_request() -> bool:
    if request.path == "/embed" or request.headers.get(EMBED_HEADER) == "1":
        return True
    name = current_app.config["SESSION_COOKIE_NAME"]
    if f"{name}_embed" in request.cookies and name not in request.cookies:
        return True
    referrer = urlsplit(request.referrer or "")
    return (referrer.netloc == request.host and referrer.path == "/embed"
            and request.headers.get("Sec-Fetch-Mode") != "navigate")


class EmbedSessionInterface(SecureCookieSessionInterface):
    """The session cookie, or for the embedded chat ``<name>_embed`` that a frame can use.

    ``Secure`` is required by ``SameSite=None`` and ``Partitioned``: the embed works
    over HTTPS, and on http://localhost / 127.0.0.1, which browsers treat as secure.
    """

    def get_cookie_name(self, app: Flask) -> str:
        name = super().get_cookie_name(app)
        return f"{name}_embed" if is_embed_request() else name

    def get_cookie_samesite(self, app: Flask) -> str | None:
        return "None" if is_embed_request() else super().get_cookie_samesite(app)

    def get_cookie_secure(self, app: Flask) -> bool:
        # Secure whenever the page is served over https (request.is_secure follows
        # X-Forwarded-Proto when WEBCHAT_PROXY_HOPS trusts the proxy).
        return is_embed_request() or request.is_secure or super().get_cookie_secure(app)

    def get_cookie_partitioned(self, app: Flask) -> bool:
        return True if is_embed_request() else super().get_cookie_partitioned(app)
