"""Languages: English and Simplified Chinese, from the reader's switch or Accept-Language.

Flask-Babel translates the templates' ``_()`` / ``ngettext()``, the views' messages and
the stream's status texts, and formats numbers and times for the reader. The catalogs
live in ``translations/``, each compiled ``.mo`` committed beside its ``.po`` (nothing
builds them on deploy). After changing interface text (``tests/test_i18n.py`` fails
until this is done)::

    pybabel extract -F babel.cfg --no-location -o /tmp/messages.pot .
    pybabel update -i /tmp/messages.pot -d translations --ignore-obsolete --no-fuzzy-matching
    # translate the new entries in translations/zh_Hans/LC_MESSAGES/messages.po, then
    pybabel compile -d translations
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any

from babel import Locale
from babel.support import NullTranslations
from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    has_request_context,
    redirect,
    request,
)
from flask_babel import (
    Babel,
    format_datetime,
    format_decimal,
    format_time,
    get_locale,
    get_timezone,
    get_translations,
)
from markupsafe import Markup
from werkzeug.datastructures import LanguageAccept
from werkzeug.http import parse_accept_header

from . import ROOT, views

bp = Blueprint("i18n", __name__)

LANG_COOKIE = "lang"
# Babel's name of each catalog -> its BCP 47 tag (for <html lang>) and its own name.
LANGUAGES = {"en": ("en", "English"), "zh_Hans": ("zh-Hans", "简体中文")}
DEFAULT_LANGUAGE = "en"
CATALOGS = "webchat.catalogs"  # app.extensions key: each locale's catalog
_TRADITIONAL_REGIONS = {"tw", "hk", "mo"}


def N_(text: str) -> str:
    """Mark ``text`` for ``pybabel extract`` without translating it (gettext's convention)."""
    return text


# Texts that reach the page in English from elsewhere: the store keeps runs' and store's
# messages as written, and werkzeug names and describes its errors. Listed here so that
# `pybabel extract` finds them; `translate_known` looks them up when they are shown.
KNOWN_TEXTS = (
    # runs.py and store.py
    N_("Something went wrong while writing this reply."),
    N_("The reply was cut off because it reached the length limit."),
    N_("The provider's content filter stopped this reply."),
    N_("This conversation is full. Start a new chat to go on."),
    # werkzeug's names of the errors webchat answers with, and views.TooManyRequests
    N_("Bad Request"),
    N_("Forbidden"),
    N_("Not Found"),
    N_("Method Not Allowed"),
    N_("Conflict"),
    N_("Request Entity Too Large"),
    N_("Too many requests"),
    N_("Internal Server Error"),
    # werkzeug's descriptions of the errors raised without one of ours
    N_("The browser (or proxy) sent a request that this server could not "
       "understand."),
    N_("The requested URL was not found on the server. If you entered the URL "
       "manually please check your spelling and try again."),
    N_("The method is not allowed for the requested URL."),
    N_("The data value transmitted exceeds the capacity limit."),
    N_("The server encountered an internal error and was unable to complete your "
       "request. Either the server is overloaded or there is an error in the "
       "application."),
)


def init_app(app: Flask) -> None:
    """Set up Flask-Babel with webchat's locale and time zone selectors, and the switch."""
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", str(ROOT / "translations"))
    Babel(app, default_locale=DEFAULT_LANGUAGE, locale_selector=select_language,
          timezone_selector=select_timezone)
    app.register_blueprint(bp)
    app.context_processor(_language_context)
    app.extensions[CATALOGS] = {}
    # Templates call _() a dozen times a page and nine times in a reply's closing
    # message; Flask-Babel finds the catalog through the context on every call.
    app.jinja_env.install_gettext_callables(  # type: ignore[attr-defined]  # by the i18n extension
        _template_gettext, _template_ngettext, newstyle=True)
    app.jinja_env.globals.update(
        format_decimal=format_decimal, translate_known=translate_known, time_tag=time_tag)
    app.after_request(_vary)


def select_language() -> str:
    """Return the catalog for this request: the switch's cookie, else Accept-Language."""
    if not has_request_context():
        return DEFAULT_LANGUAGE
    choice = request.cookies.get(LANG_COOKIE, "")
    if choice in LANGUAGES:
        return choice
    header = request.headers.get("Accept-Language", "")
    if len(header) > 200:  # no browser sends such a list: not worth keeping
        return _language_for.__wrapped__(header)
    return _language_for(header)


@lru_cache(maxsize=128)
def _language_for(header: str) -> str:
    # A browser sends the same header with every request: parse and match it once.
    return best_language(parse_accept_header(header, LanguageAccept))


def best_language(accepted: Iterable[tuple[str, float]]) -> str:
    """Return the catalog that fits the reader's most wanted language, English if none does.

    Only Simplified Chinese is translated: ``zh-TW``, ``zh-HK``, ``zh-MO`` and
    ``zh-Hant`` get English, and so does a bare ``zh`` after one of them (browsers set
    up for Traditional Chinese send ``zh-TW,zh;q=0.9``).
    """
    traditional = False
    for tag, quality in sorted(accepted, key=lambda item: -item[1]):
        if quality <= 0:
            continue
        primary, *subtags = tag.lower().replace("_", "-").split("-")
        if primary == "en":
            return "en"
        if primary != "zh":
            continue
        if "hans" in subtags:
            return "zh_Hans"
        if "hant" in subtags or _TRADITIONAL_REGIONS.intersection(subtags):
            traditional = True
        elif subtags or not traditional:
            return "zh_Hans"
    return DEFAULT_LANGUAGE


def select_timezone() -> tzinfo:
    """Return the reader's time zone (the browser's, from the ``tz`` cookie; else UTC)."""
    return views._reader_zone() if has_request_context() else UTC


def current_language() -> str:
    """Return the catalog in use for this request (``en`` or ``zh_Hans``)."""
    locale = get_locale()
    name = str(locale) if locale is not None else DEFAULT_LANGUAGE
    return name if name in LANGUAGES else DEFAULT_LANGUAGE


def _language_context() -> dict[str, Any]:
    language = current_language()
    return {"lang": LANGUAGES[language][0], "language": language,
            "languages": [(code, tag, name) for code, (tag, name) in LANGUAGES.items()]}


def catalog() -> NullTranslations:
    """Return the catalog of the current locale (``force_locale`` included), found fast.

    Kept per app and locale, as Flask-Babel loaded it (an app's catalogs live as
    long as it does): after the locale, a lookup is one dictionary access.
    """
    locale = get_locale()
    known: dict[Locale, NullTranslations] = current_app.extensions[CATALOGS]
    found = known.get(locale) if locale is not None else None
    if found is None:
        found = get_translations()
        if locale is not None:
            known[locale] = found
    return found


def _template_gettext(text: str) -> str:
    return str(catalog().ugettext(text))


def _template_ngettext(singular: str, plural: str, n: int) -> str:
    return str(catalog().ungettext(singular, plural, n))


def translate_known(text: str) -> str:
    """Return ``text`` translated if the catalog has it, else as it is (no %-formatting)."""
    if not text:
        return text
    return str(catalog().ugettext(text))


def time_tag(timestamp: float) -> Markup:
    """Return a ``<time>`` of ``timestamp`` in the reader's language and time zone.

    Today's times show the time of day alone; older ones the date too.
    """
    moment = datetime.fromtimestamp(timestamp, UTC)
    zone = get_timezone() or UTC
    today = moment.astimezone(zone).date() == datetime.now(zone).date()
    text = format_time(moment, "short") if today else format_datetime(moment, "short")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        moment.isoformat(timespec="seconds"), format_datetime(moment, "medium"), text)


def _vary(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.vary.add("Accept-Language")
    return response


@bp.post("/lang")
def switch_language() -> Any:
    """Remember the reader's language (a form, so it works without JavaScript)."""
    views.check_csrf()
    choice = request.form.get("lang", "")
    response = redirect(views._safe_back(), code=303)
    if choice in LANGUAGES:
        response.set_cookie(LANG_COOKIE, choice, max_age=365 * 86400, samesite="Lax",
                            secure=request.is_secure, httponly=True)
    else:
        response.delete_cookie(LANG_COOKIE)
    return response
