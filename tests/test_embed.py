"""The chat embedded in another site: framing policy, cookies, the snippet, the host's API."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable, Iterator
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from webchat import create_app
from webchat.backends.base import ChatMessage
from webchat.backends.demo import demo_reply
from webchat.config import ConfigError, load_config
from webchat.embed import with_frame_ancestors
from webchat.render import render_markdown

from .conftest import CHROMIUM, CHROMIUM_ARGS, Server, csrf_of, screenshot

HOST_ORIGIN = "https://intranet.example.com"


def make_app(tmp_path: Path, **config: Any) -> Any:
    return create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                       "BACKEND": "demo", "DEMO_TOKENS_PER_SECOND": 5000.0, "COALESCE_MS": 1,
                       **config})


def text_of(html: str) -> str:
    """Return the text a browser shows for ``html`` (tags dropped, entities decoded)."""
    return unescape(re.sub(r"<[^>]+>", "", html))


def cookie_headers(response: Any) -> list[str]:
    return response.headers.getlist("Set-Cookie")


# Framing policy and cookies (test client) ---------------------------------

def test_embed_may_be_framed_by_exactly_the_allowed_origins(tmp_path: Path) -> None:
    app = make_app(tmp_path, EMBED_ORIGINS=[HOST_ORIGIN, "http://localhost:8080"])
    response = app.test_client().get("/embed")
    assert response.status_code == 200
    policy = response.headers["Content-Security-Policy"]
    assert policy.endswith("; frame-ancestors https://intranet.example.com http://localhost:8080")
    assert policy.count("frame-ancestors") == 1
    assert "script-src 'self'" in policy  # the rest of the policy is kept
    assert "X-Frame-Options" not in response.headers


@pytest.mark.parametrize("path", ["/", "/embed.js", "/healthz", "/static/app.css", "/nowhere"])
def test_every_other_response_refuses_to_be_framed(tmp_path: Path, path: str) -> None:
    app = make_app(tmp_path, EMBED_ORIGINS=[HOST_ORIGIN])
    response = app.test_client().get(path)
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")


def test_embed_cannot_be_framed_when_no_origin_is_configured(tmp_path: Path) -> None:
    response = make_app(tmp_path).test_client().get("/embed")
    assert response.status_code == 200
    assert response.headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")
    assert response.headers["X-Frame-Options"] == "DENY"


def test_with_frame_ancestors_replaces_the_directive() -> None:
    assert with_frame_ancestors("default-src 'self'; frame-ancestors 'none'", ["https://a.b"]) == (
        "default-src 'self'; frame-ancestors https://a.b")
    assert with_frame_ancestors("", ["https://a.b"]) == "frame-ancestors https://a.b"


def test_embed_origins_are_validated_and_normalized() -> None:
    config = load_config({"WEBCHAT_EMBED_ORIGINS": "https://Intranet.Example.com:443/, "
                                                    "http://localhost:8080"})
    assert config["EMBED_ORIGINS"] == [HOST_ORIGIN, "http://localhost:8080"]
    for bad in ("intranet.example.com", "https://x.example.com/chat", "*", "https://*.example.com"):
        with pytest.raises(ConfigError, match="WEBCHAT_EMBED_ORIGINS"):
            load_config({"WEBCHAT_EMBED_ORIGINS": bad})


def test_embed_session_cookie_is_its_own_and_cross_site_ready(tmp_path: Path) -> None:
    client = make_app(tmp_path, EMBED_ORIGINS=[HOST_ORIGIN]).test_client()
    page = client.get("/embed")
    [cookie] = cookie_headers(page)
    assert cookie.startswith("session_embed=")
    for attribute in ("Secure", "HttpOnly", "SameSite=None", "Partitioned"):
        assert attribute in cookie.split("; ")
    # The page's htmx requests say so in a header: their cookie is the embed one too.
    token = csrf_of(page.get_data(as_text=True))
    sent = client.post("/chat", data={"text": "hi"}, headers={
        "HX-Request": "true", "X-CSRF-Token": token, "X-Webchat-Embed": "1",
        "Origin": "http://localhost"})
    assert sent.status_code == 200, sent.get_data(as_text=True)  # the embed session's token
    # The session id was made with the page; any cookie set now is the embed one too.
    for cookie in cookie_headers(sent):
        assert cookie.startswith("session_embed=") and "Partitioned" in cookie


def test_main_session_cookie_stays_lax(tmp_path: Path) -> None:
    response = make_app(tmp_path).test_client().get("/")
    [cookie] = cookie_headers(response)
    assert cookie.startswith("session=")
    assert "SameSite=Lax" in cookie and "Partitioned" not in cookie


def test_the_embed_and_main_sessions_do_not_mix(tmp_path: Path) -> None:
    """A browser holding both cookies (a same-site host page) uses each in its place."""
    client = make_app(tmp_path).test_client()
    main_token = csrf_of(client.get("/").get_data(as_text=True))
    embed_token = csrf_of(client.get("/embed").get_data(as_text=True))
    assert main_token != embed_token
    headers = {"HX-Request": "true", "Origin": "http://localhost"}
    assert client.post("/chat", data={"text": "main"},
                       headers={**headers, "X-CSRF-Token": main_token}).status_code == 200
    sent = client.post("/chat", data={"text": "embedded"},
                       headers={**headers, "X-CSRF-Token": embed_token, "X-Webchat-Embed": "1"})
    assert sent.status_code == 200
    # The embed goes on with its own latest conversation; the main page lists only its own.
    assert "embedded" in client.get("/embed").get_data(as_text=True)
    main = client.get("/").get_data(as_text=True)
    assert ">main<" in main and "embedded" not in main


def test_embed_page_options_are_validated(tmp_path: Path) -> None:
    client = make_app(tmp_path, EMBED_ORIGINS=[HOST_ORIGIN]).test_client()
    html = client.get("/embed?theme=dark&color=%23aa0000&lang=zh-Hans&sidebar=1").get_data(
        as_text=True)
    html_tag = re.search(r"<html[^>]*>", html)
    assert html_tag and 'lang="zh-Hans"' in html_tag[0] and 'data-theme="dark"' in html_tag[0]
    assert ">发送<" in html  # the language of the host's choice, not the browser's
    assert '"Accept-Language": "zh-Hans"' in html  # and so are the page's htmx requests
    assert 'class="embed with-sidebar"' in html
    assert f'data-embed-origins="{HOST_ORIGIN}"' in html
    assert "color=%23aa0000" in html
    html = client.get('/embed?theme=x&color=red;x&lang="><b>&sidebar=2').get_data(as_text=True)
    html_tag = re.search(r"<html[^>]*>", html)
    assert html_tag and 'lang="en"' in html_tag[0] and "data-theme" not in html_tag[0]
    assert 'class="embed"' in html and "<b>" not in html and "Accept-Language" not in html
    # A language without a catalog gets English.
    html = client.get("/embed?lang=de").get_data(as_text=True)
    assert re.search(r'<html[^>]*lang="en"', html) and ">Send<" in html
    assert 'id="sidebar"' not in html  # no sidebar unless asked


def test_embed_js_is_served_for_other_sites(tmp_path: Path) -> None:
    response = make_app(tmp_path).test_client().get("/embed.js")
    assert response.status_code == 200
    assert response.mimetype in ("text/javascript", "application/javascript")
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert "window.webchat" in response.get_data(as_text=True)


def test_embed_opens_a_conversation_only_of_its_owner(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    owner = app.test_client()
    token = csrf_of(owner.get("/embed").get_data(as_text=True))
    sent = owner.post("/chat", data={"text": "mine"}, headers={
        "HX-Request": "true", "X-CSRF-Token": token, "X-Webchat-Embed": "1"})
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    assert "mine" in owner.get(f"/embed?c={cid}").get_data(as_text=True)
    assert "mine" not in owner.get("/embed?new=1").get_data(as_text=True)
    assert app.test_client().get(f"/embed?c={cid}").status_code == 404


# In a real browser, across sites ------------------------------------------

class HostSite:
    """A static web site on its own port: the intranet page that embeds webchat."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = pages.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # "localhost", not 127.0.0.1: another site than webchat's, for cookies too.
        self.origin = f"http://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def host_site() -> Iterator[Callable[[], HostSite]]:
    sites: list[HostSite] = []

    def make() -> HostSite:
        sites.append(HostSite())
        return sites[-1]

    yield make
    for site in sites:
        site.close()


def snippet(server: Server, **data: str) -> str:
    attributes = " ".join(f'data-{name}="{value}"' for name, value in data.items())
    return (f"<!doctype html><html><head><title>Intranet</title></head><body>"
            f"<h1>Intranet home</h1><p>Welcome.</p>"
            f'<script src="{server.url}/embed.js" async {attributes}></script></body></html>')


@pytest.fixture(scope="module")
def cookieless_browser(browser: Any) -> Iterator[Any]:
    """A Chromium that blocks third-party cookies, as browsers are heading to."""
    cookieless = browser.browser_type.launch(executable_path=CHROMIUM, args=[
        *CHROMIUM_ARGS, "--test-third-party-cookie-phaseout"])
    yield cookieless
    cookieless.close()


def send_in(frame: Any, text: str) -> None:
    box = frame.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


@pytest.mark.e2e
def test_snippet_opens_a_chat_that_works_in_a_cross_site_frame_without_third_party_cookies(
        server_factory: Callable[..., Server], host_site: Callable[[], HostSite],
        cookieless_browser: Any) -> None:
    site = host_site()
    server = server_factory(env={"WEBCHAT_EMBED_ORIGINS": site.origin,
                                 "WEBCHAT_DEMO_TOKENS_PER_SECOND": "150"})
    site.pages["/"] = snippet(server, title="Ask IT", color="#0a7d55")
    context = cookieless_browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        page = context.new_page()
        page.goto(site.origin + "/")
        launcher = page.locator("[data-webchat] .launcher")
        assert launcher.text_content() == "Ask IT"
        assert page.locator("[data-webchat] iframe").count() == 0  # nothing loads until opened
        launcher.click()
        frame = page.frame_locator("[data-webchat] iframe")
        frame.locator(".composer").wait_for()

        # The browser really refuses third-party cookies here, except partitioned ones.
        probe = page.frames[1].evaluate("""() => {
            document.cookie = "probe_plain=1; SameSite=None; Secure; Path=/";
            document.cookie = "probe_chips=1; SameSite=None; Secure; Partitioned; Path=/";
            return document.cookie; }""")
        assert "probe_chips=1" in probe and "probe_plain" not in probe

        send_in(frame, "Hello from the intranet")
        final = frame.locator(".msg.assistant[data-status=complete]")
        final.wait_for(timeout=30_000)
        expected = demo_reply([ChatMessage("user", "Hello from the intranet")])
        assert final.locator(".body").text_content() == text_of(render_markdown(expected))
        assert "/embed?" in page.frames[1].url and "c=" in page.frames[1].url
        screenshot(page, "embed-host-page")

        [cookie] = [c for c in context.cookies() if c["name"] == "session_embed"]
        assert cookie["sameSite"] == "None" and cookie["secure"] and cookie["httpOnly"]
        assert not [c for c in context.cookies() if c["name"] == "session"]

        # Another visit to the intranet: the chat goes on where it was.
        page.reload()
        page.locator("[data-webchat] .launcher").click()
        frame = page.frame_locator("[data-webchat] iframe")
        frame.locator(".msg.user", has_text="Hello from the intranet").wait_for()
        assert frame.locator(".msg.assistant[data-status=complete]").count() == 1

        # Links to the main pages (which refuse frames) lead to their /embed counterparts.
        frame.get_by_role("link", name="New chat").click()
        frame.locator("#empty-state").wait_for()  # shown once the chat is empty
        assert "new=1" in page.frames[1].url and "color=%230a7d55" in page.frames[1].url
        assert frame.locator(".msg").count() == 0
    finally:
        context.close()


@pytest.mark.e2e
def test_host_page_steers_the_chat_and_only_allowed_origins_are_heard(
        server_factory: Callable[..., Server], host_site: Callable[[], HostSite],
        page: Any) -> None:
    site = host_site()
    server = server_factory(env={"WEBCHAT_EMBED_ORIGINS": site.origin})
    site.pages["/"] = snippet(server, open="true", position="bottom-left", theme="light",
                              lang="zh-Hans")
    page.goto(site.origin + "/")
    panel = page.locator("[data-webchat] .panel")
    panel.wait_for()  # data-open="true": open on load
    frame = page.frame_locator("[data-webchat] iframe")
    frame.locator(".composer").wait_for()
    inner = page.frames[1]
    assert inner.evaluate("document.documentElement.lang") == "zh-Hans"
    assert frame.locator("button.send").text_content() == "发送"
    assert inner.evaluate("document.documentElement.dataset.theme") == "light"
    assert frame.locator("#sidebar").count() == 0

    page.evaluate("window.webchat.close()")
    assert panel.is_hidden() and page.evaluate("window.webchat.isOpen()") is False
    page.evaluate("window.webchat.toggle()")
    assert panel.is_visible()

    page.evaluate("window.webchat.setTheme({color: '#aa0000', scheme: 'dark'})")
    inner.wait_for_function("document.documentElement.dataset.theme === 'dark'")
    accent = inner.evaluate(
        "getComputedStyle(document.documentElement).getPropertyValue('--accent').trim()")
    assert accent == "#aa0000"

    # A message from anyone but the allowed host page is ignored (here: the frame itself).
    inner.evaluate("window.postMessage({type: 'webchat:theme', scheme: 'light'}, '*')")
    page.wait_for_timeout(300)
    assert inner.evaluate("document.documentElement.dataset.theme") == "dark"
    unexpected = [error for error in page.console_errors
                  if "autofocusing" not in error and "favicon.ico" not in error]
    assert unexpected == []


@pytest.mark.e2e
def test_other_sites_and_the_main_pages_cannot_frame_the_chat(
        server_factory: Callable[..., Server], host_site: Callable[[], HostSite],
        page: Any) -> None:
    allowed, stranger = host_site(), host_site()
    server = server_factory(env={"WEBCHAT_EMBED_ORIGINS": allowed.origin})
    stranger.pages["/"] = snippet(server, open="true")
    frames = "".join(f'<iframe src="{server.url}{path}" title="{path}"></iframe>'
                     for path in ("/embed", "/", "/healthz"))
    allowed.pages["/plain"] = f"<!doctype html><title>Plain</title>{frames}"

    def loaded(selector: str) -> Any:
        frame = page.locator(selector).element_handle().content_frame()
        for _ in range(200):  # past the iframe's first about:blank
            if frame.url not in ("", "about:blank"):
                break
            page.wait_for_timeout(50)
        frame.wait_for_load_state()
        return frame

    page.goto(stranger.origin + "/")
    blocked = loaded("[data-webchat] iframe")
    assert blocked.url.startswith("chrome-error:")  # the browser's own page, not webchat's
    assert page.frame_locator("[data-webchat] iframe").locator(".composer").count() == 0

    page.goto(allowed.origin + "/plain")
    assert loaded('iframe[title="/embed"]').url == server.url + "/embed"
    page.frame_locator('iframe[title="/embed"]').locator(".composer").wait_for()
    for title in ("/", "/healthz"):
        assert loaded(f'iframe[title="{title}"]').url.startswith("chrome-error:"), title
    assert page.frame_locator('iframe[title="/"]').locator(".composer").count() == 0
