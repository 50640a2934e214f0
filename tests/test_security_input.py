"""Bad input: broken encodings, NUL, surrogates, odd ids and headers, wrong methods, fuzz.

Every answer is a 4xx with a message a person can read (or a harmless success), never
a 500, and the conversations already stored are exactly as they were afterwards.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from .conftest import Server
from .security_support import (
    db_rows,
    htmx_headers,
    integrity_check,
    make_app,
    raw_exchange,
    send_turn,
    status_of,
    token_of,
)

FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A session with a reference conversation (finished) and a scratch one to be abused."""
    app = make_app(tmp_path_factory.mktemp("input"))
    client = app.test_client()
    reference = send_turn(client, "the reference conversation, which must survive")
    client.get(reference["stream"]).get_data()
    scratch = send_turn(client, "scratch")
    client.get(scratch["stream"]).get_data()
    return {"app": app, "client": client, "ref": reference, "scratch": scratch,
            "token": token_of(client), "before": db_rows(app.config["DATABASE"], reference["cid"])}


def assert_clear_refusal(response: Any, where: str) -> None:
    """A 4xx whose body says what went wrong (an htmx fragment or a whole page)."""
    assert 400 <= response.status_code < 500, (where, response.status_code)
    body = response.get_data(as_text=True)
    message = re.search(r'<p class="error" role="alert">([^<]+)</p>', body)
    assert message and len(message.group(1).strip()) > 10, (where, body[:300])


def post_raw(world: Any, path: str, body: bytes, *, content_type: str = FORM) -> Any:
    return world["client"].post(path, data=body, content_type=content_type,
                                headers=htmx_headers(world["token"]))


def scratch_paths(world: Any) -> dict[str, str]:
    cid, user, reply = (world["scratch"][k] for k in ("cid", "user", "reply"))
    return {"chat": "/chat", "rename": f"/c/{cid}/rename", "settings": f"/c/{cid}/settings",
            "edit": f"/c/{cid}/m/{user}/edit", "regenerate": f"/c/{cid}/m/{reply}/regenerate",
            "continue": f"/c/{cid}/m/{reply}/continue", "stop": f"/c/{cid}/m/{reply}/stop",
            "theme": "/theme"}


# Form bodies --------------------------------------------------------------------------

REFUSED_BODIES = [
    ("chat", b"text=\xff\xfe\xfd", "raw invalid UTF-8"),
    ("chat", b"text=ok\xc3", "a truncated UTF-8 sequence"),
    ("chat", b"text=a%00b", "a NUL"),
    ("chat", b"text=%00", "only a NUL"),
    ("chat", b"", "no fields at all"),
    ("chat", b"text=", "an empty text"),
    ("chat", b"text=%20%09%0A", "only white space"),
    ("chat", b"conversation=&model=demo", "no text field"),
    ("chat", b"text=hi&model=%00", "a NUL in the model"),
    ("chat", b"text=hi&model=no-such-model", "an unknown model"),
    ("chat", b"text=hi&request_key=%00%00", "a NUL in the request key"),
    ("chat", b"text=hi&request_key=short", "a malformed request key"),
    ("chat", b"text=hi&conversation=%2E%2E%2F", "a path as the conversation"),
    ("chat", b"text=hi&conversation=%00", "a NUL as the conversation"),
    ("chat", b'{"text": "json"}', "JSON instead of a form"),
    ("rename", b"title=a%00b", "a NUL in a title"),
    ("rename", b"title=%20%20", "an empty title"),
    ("rename", b"", "no title"),
    ("settings", b"system_prompt=a%00b", "a NUL in the system prompt"),
    ("settings", b"temperature=nan", "NaN temperature"),
    ("settings", b"temperature=inf", "infinite temperature"),
    ("settings", b"temperature=-1", "negative temperature"),
    ("settings", b"temperature=1e309", "overflowing temperature"),
    ("settings", b"temperature=0x1", "hex temperature"),
    ("settings", b"temperature=%ED%A0%80", "a surrogate as temperature"),
    ("settings", b"model=%FF", "a broken model name"),
    ("edit", b"text=a%00b", "a NUL in an edit"),
    ("edit", b"", "an edit without text"),
]


@pytest.mark.parametrize("route,body,what", REFUSED_BODIES, ids=[w for _, _, w in REFUSED_BODIES])
def test_bad_form_bodies_get_a_clear_4xx(world: Any, route: str, body: bytes, what: str) -> None:
    content_type = "application/json" if body.startswith(b"{") else FORM
    response = post_raw(world, scratch_paths(world)[route], body, content_type=content_type)
    assert_clear_refusal(response, what)


ACCEPTED_OR_REFUSED = [
    (b"text=%FF%FE", "percent-encoded invalid UTF-8"),
    (b"text=a%ED%A0%80b", "a percent-encoded lone surrogate"),
    (b"text=%C0%AF%E0%80%AF", "overlong UTF-8"),
    (b"text=%F4%90%80%80", "beyond U+10FFFF"),
    (b"text=a%0D%0Ab%0Dc", "CR LF and a lone CR"),
    (b"text=%EF%BF%BE%EF%BF%BF", "noncharacters"),
    ("text=\u202eevil\u200f".encode(), "bidi controls"),
]


@pytest.mark.parametrize("body,what", ACCEPTED_OR_REFUSED, ids=[w for _, w in ACCEPTED_OR_REFUSED])
def test_odd_but_decodable_text_is_stored_as_valid_text_or_refused(tmp_path: Path, body: bytes,
                                                                    what: str) -> None:
    app = make_app(tmp_path)
    client = app.test_client()
    world = {"client": client, "token": token_of(client)}
    response = post_raw(world, "/chat", body)
    if response.status_code != 200:
        assert_clear_refusal(response, what)
        return
    turn = re.search(r'sse-connect="/c/([^/]+)/m/', response.get_data(as_text=True))
    assert turn
    db = sqlite3.connect(app.config["DATABASE"])
    try:
        (text,) = db.execute("SELECT content FROM messages WHERE conversation_id = ? AND"
                             " role = 'user'", (turn.group(1),)).fetchone()
    finally:
        db.close()
    text.encode("utf-8")  # storable and sendable: no lone surrogates
    assert "\x00" not in text
    page = client.get(f"/c/{turn.group(1)}")
    assert page.status_code == 200



def test_a_form_that_is_not_utf8_is_explained(world: Any) -> None:
    response = post_raw(world, "/chat", b"text=hello \xff\xfe world")
    assert_clear_refusal(response, "raw invalid UTF-8")
    assert re.search(r"(?i)utf-8|unicode|encod", response.get_data(as_text=True))


def test_nothing_is_stored_from_refused_input(world: Any) -> None:
    app = world["app"]
    cid = world["scratch"]["cid"]
    before = db_rows(app.config["DATABASE"], cid)
    for route, body, _what in REFUSED_BODIES:
        if route != "chat":
            post_raw(world, scratch_paths(world)[route], body)
    assert db_rows(app.config["DATABASE"], cid) == before


# URLs, ids and headers ----------------------------------------------------------------

def bad_urls(world: Any) -> list[str]:
    cid, reply = world["scratch"]["cid"], world["scratch"]["reply"]
    return [
        "/c/%FF%FE", "/c/%ED%A0%80", "/c/%00", "/c/" + "A" * 5000, "/c/..%2F..%2Fetc%2Fpasswd",
        "/c/%2e%2e", "/c/" + "\u00e9" * 22, "/c/%E2%80%AE" + "A" * 19, "/c/ " + "A" * 21,
        f"/c/{cid}/m/%FF/stream", f"/c/{cid}/m/{reply}%00/stream", f"/c/%00/m/{reply}/stream",
        f"/c/{cid}/export.%FF", f"/c/{cid}/export.html", f"/c/{cid}/export.",
        f"/c/{cid}?edit=%00", f"/c/{cid}?edit=%FF%FE", f"/c/{cid}?edit=" + "x" * 3000,
        f"/c/{cid}/messages?before=-1", f"/c/{cid}/messages?before=1e3",
        f"/c/{cid}/messages?before=99999999999999999999999", f"/c/{cid}/messages?before=%00",
        f"/c/{cid}/messages", "/search?q=%FF%FE", "/search?q=%00", "/search?q=%ED%A0%80",
        "/search?q=" + "%22" * 300, "/search?q=*%20OR%20*", "/search?q=NEAR(a%20b)",
        "/search?q=%25%5F%5C", "/embed?c=%FF&lang=%00&color=%ED%A0%80&theme=%FF",
        "/embed?c=" + "A" * 22, "/static/..%2F..%2Fwebchat%2F__init__.py", "/static/%00",
    ]


def test_bad_urls_and_ids_never_cause_a_500(world: Any) -> None:
    client = world["client"]
    for url in bad_urls(world):
        for headers in ({}, {"HX-Request": "true"}):
            response = client.get(url, headers=headers)
            assert response.status_code < 500, url
            if response.status_code >= 400:
                assert_clear_refusal(response, url)
    assert "def create_app" not in client.get(
        "/static/..%2F..%2Fwebchat%2F__init__.py").get_data(as_text=True)


LAST_EVENT_IDS = ["-1", "9" * 40, "1e9", "abc", "", " 12", "12 ", "0x10", "١٢", "12\t",
                  "1" * 16, "9" * 10_000, "3.5", "+4", "NaN"]


@pytest.mark.parametrize("value", LAST_EVENT_IDS, ids=range(len(LAST_EVENT_IDS)))
def test_odd_last_event_ids_are_refused_or_ignored(world: Any, value: str) -> None:
    response = world["client"].get(world["ref"]["stream"], headers={"Last-Event-ID": value},
                                   buffered=False)
    try:
        assert response.status_code in (200, 400), (value[:50], response.status_code)
        if response.status_code == 400:
            assert "Last-Event-ID" in response.get_data(as_text=True)
    finally:
        response.close()


def test_wrong_methods_are_405_on_every_route(world: Any) -> None:
    app, client = world["app"], world["client"]
    values = {"cid": world["scratch"]["cid"], "mid": world["scratch"]["reply"], "fmt": "json",
              "filename": "app.js"}
    checked = 0
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for name in rule.arguments:
            path = re.sub(rf"<(?:[a-z]+:)?{name}>", values[name], path)
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            if method in rule.methods:
                continue
            response = client.open(path, method=method, headers=htmx_headers(world["token"]))
            assert response.status_code == 405, (method, path, response.status_code)
            allowed = set(response.headers["Allow"].split(", "))
            assert allowed == set(rule.methods), (path, allowed)
            if method != "HEAD":
                assert_clear_refusal(response, f"{method} {path}")
            checked += 1
    assert checked >= 50


# The same through gunicorn, where the bytes are not tidied by a test client -----------

RAW_REQUESTS = [
    b"GET /c/\xff\xfe\xfd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /c/\xed\xa0\x80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /search?q=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nCookie: session=\xff\xfe; tz=\xed\xa0\x80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nCookie: session=not.a.valid.signature\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Language: \xff\xfe;q=\xff\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nCookie: tz=../../../../etc/localtime; theme=\"><x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: \xff\x00\xfe\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=\xff\r\n"
    b"Content-Length: 10\r\n\r\n--\xff\r\n\r\n--",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 58\r\n\r\n--b\r\nContent-Disposition: form-data; "
    b"name=\"te\xffxt\"\r\n\r\nx\r\n--b--",
]


@pytest.mark.e2e
def test_raw_bad_requests_never_cause_a_500_in_gunicorn(live_server: Server) -> None:
    errors_before = live_server.log_text().count('"level": "ERROR"')
    for request in RAW_REQUESTS:
        answer = raw_exchange(live_server.url, request, timeout=5)
        assert answer, request[:60]
        assert status_of(answer) < 500, (request[:80], answer[:300])
    # A stream request whose Last-Event-ID holds bytes that are not text.
    answer = raw_exchange(live_server.url, b"GET /c/AAAAAAAAAAAAAAAAAAAAAA/m/AAAAAAAAAAAAAAAAAAAAAA"
                          b"/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xff\xfe\x00\r\n\r\n")
    assert 400 <= status_of(answer) < 500
    assert live_server.log_text().count('"level": "ERROR"') == errors_before



@pytest.mark.parametrize("where", ["form", "header"])
@pytest.mark.parametrize("token", ["\x80", "caf\u00e9", "\u00ff" * 32], ids=["x80", "cafe", "ff32"])
def test_a_non_ascii_csrf_token_is_a_403_not_a_500(world: Any, where: str, token: str) -> None:
    if where == "form":
        response = world["client"].post("/chat", data={"text": "hi", "csrf_token": token})
    else:  # WSGI hands header bytes over as Latin-1: any byte can arrive this way
        response = world["client"].post("/chat", data={"text": "hi"},
                                        headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert response.status_code == 403
    assert_clear_refusal(response, where)


# Fuzzing through the Flask test client -------------------------------------------------

FIELDS = ["text", "conversation", "request_key", "model", "temperature", "title",
          "system_prompt", "theme", "next", "csrf_token"]
values = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.binary(max_size=60),
    st.sampled_from(["demo", "", "0", "2", "-0", "1e-9", "AAAAAAAAAAAAAAAAAAAAAA", "light",
                     "/", "//evil.example", "\\\\evil", "%00", "\ud800"]),
)


def encode_field(name: str, value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return f"{quote(name)}={quote_from_bytes(raw)}"


# Bounded: 200 examples, no deadline, no shrinking (a failure is reported as found; add
# Phase.shrink locally to minimise it) and no example database written into the repo.
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None)

@FUZZ
@example(route="chat", fields={"text": "hi", "csrf_token": "\x80"}, raw_tail=b"", htmx=False)
@given(route=st.sampled_from(["chat", "rename", "settings", "edit", "regenerate", "continue",
                              "stop", "theme"]),
       fields=st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
       raw_tail=st.binary(max_size=20), htmx=st.booleans())
def test_fuzz_form_endpoints_never_fail(world: Any, route: str, fields: dict[str, Any],
                                        raw_tail: bytes, htmx: bool) -> None:
    body = "&".join(encode_field(name, value) for name, value in fields.items()).encode()
    if raw_tail:
        body += b"&" + raw_tail
    headers = {"X-CSRF-Token": world["token"], **({"HX-Request": "true"} if htmx else {})}
    if "csrf_token" in fields:  # sometimes the form's own (random) token decides
        headers.pop("X-CSRF-Token")
    response = world["client"].post(scratch_paths(world)[route], data=body, content_type=FORM,
                                     headers=headers)
    assert response.status_code < 500, (route, body[:200], response.status_code)
    if response.status_code >= 400:
        assert_clear_refusal(response, route)


header_values = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=40),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)


@FUZZ
@given(last_event_id=header_values, accept=st.sampled_from(["text/event-stream", "*/*", ""]),
       which=st.sampled_from(["ref", "scratch", "foreign"]))
def test_fuzz_stream_endpoint_never_fails(world: Any, last_event_id: str, accept: str,
                                          which: str) -> None:
    url = world[which]["stream"] if which != "foreign" else \
        "/c/AAAAAAAAAAAAAAAAAAAAAA/m/BBBBBBBBBBBBBBBBBBBBBB/stream"
    headers = {"Last-Event-ID": last_event_id}
    if accept:
        headers["Accept"] = accept
    response = world["client"].get(url, headers=headers, buffered=False)
    try:
        assert response.status_code in (200, 400, 404), (last_event_id, response.status_code)
        if which == "foreign":
            assert response.status_code in (400, 404)
    finally:
        response.close()


def test_stored_conversations_survive_all_of_it(world: Any) -> None:
    """Runs last in this file: after everything above, the reference chat is unchanged."""
    database = world["app"].config["DATABASE"]
    assert db_rows(database, world["ref"]["cid"]) == world["before"]
    assert integrity_check(database) == "ok"
    page = world["client"].get(f"/c/{world['ref']['cid']}")
    assert page.status_code == 200 and "which must survive" in page.get_data(as_text=True)
