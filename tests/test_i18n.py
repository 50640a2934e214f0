"""Languages: English and Simplified Chinese, the switch, localised numbers and times."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from babel.messages.frontend import CommandLineInterface
from babel.messages.mofile import read_mo, write_mo
from babel.messages.pofile import read_po
from flask_babel import force_locale
from werkzeug import exceptions

from webchat import create_app, i18n, views
from webchat.runs import Update

from .conftest import ROOT, Server, csrf_of, screenshot

CATALOG = ROOT / "translations" / "zh_Hans" / "LC_MESSAGES" / "messages.po"
CHINESE = {"Accept-Language": "zh-CN,zh;q=0.9"}


def html_lang(html: str) -> str:
    match = re.search(r'<html lang="([^"]+)"', html)
    assert match, "no <html lang>"
    return match.group(1)


def start_turn(client: Any, text: str = "Hello", headers: dict[str, str] | None = None) -> str:
    """Send a message as htmx would; return the reply's stream URL."""
    page = client.get("/", headers=headers).get_data(as_text=True)
    response = client.post("/chat", data={"text": text, "request_key": "r" * 22},
                           headers={**(headers or {}), "HX-Request": "true",
                                    "X-CSRF-Token": csrf_of(page)})
    assert response.status_code == 200, response.get_data(as_text=True)
    url = re.search(r'sse-connect="([^"]+)"', response.get_data(as_text=True))
    assert url
    return url.group(1)


# Choosing the language ------------------------------------------------------

def test_a_chinese_browser_gets_the_chinese_page(client: Any) -> None:
    response = client.get("/", headers=CHINESE)
    html = response.get_data(as_text=True)
    assert html_lang(html) == "zh-Hans"
    assert "有什么可以帮你的？" in html and "新对话" in html
    assert 'placeholder="给 webchat 发消息…"' in html
    assert "What can I help with?" not in html and "New chat" not in html
    assert "Accept-Language" in response.headers["Vary"]


@pytest.mark.parametrize("accept", ["en-US,en;q=0.9", "zh-TW", "zh-Hant", "zh-HK,zh;q=0.9",
                                    "fr-FR,fr;q=0.9", ""])
def test_other_browsers_get_the_english_page(client: Any, accept: str) -> None:
    html = client.get("/", headers={"Accept-Language": accept}).get_data(as_text=True)
    assert html_lang(html) == "en"
    assert "What can I help with?" in html and "New chat" in html


@pytest.mark.parametrize(("accept", "language"), [
    ("zh", "zh_Hans"), ("zh-CN", "zh_Hans"), ("zh-Hans", "zh_Hans"), ("zh-SG", "zh_Hans"),
    ("zh_Hans", "zh_Hans"), ("zh-Hans-HK", "zh_Hans"), ("de-DE,de;q=0.9,zh;q=0.5", "zh_Hans"),
    ("zh-TW,zh-CN;q=0.5", "zh_Hans"),  # asks for Simplified too, if less
    ("zh-TW", "en"), ("zh-Hant", "en"), ("zh-Hant-CN", "en"), ("zh-MO", "en"),
    ("zh-TW,zh;q=0.9,en;q=0.8", "en"), ("en,zh-CN;q=0.9", "en"), ("en;q=0.5,zh-CN", "zh_Hans"),
    ("*", "en"), ("", "en"), ("zh-CN;q=0,en;q=0.1", "en"),
    # Longer than any browser's list (not kept in the cache of headers): still read.
    (",".join(f"x{i}" for i in range(60)) + ",zh-CN;q=0.1", "zh_Hans"),
])
def test_accept_language_is_matched_to_a_catalog(app: Any, accept: str, language: str) -> None:
    with app.test_request_context("/", headers={"Accept-Language": accept}):
        assert i18n.select_language() == language


def test_the_templates_catalog_follows_the_locale_and_a_forced_one(app: Any) -> None:
    with app.test_request_context("/", headers={"Accept-Language": "en"}):
        assert i18n.catalog().ugettext("Send") == "Send"
        with force_locale("zh_Hans"):  # as the embedded chat's ?lang= does
            assert i18n.catalog().ugettext("Send") == "发送"
        assert i18n.catalog().ugettext("Send") == "Send"
    with app.test_request_context("/", headers=CHINESE):
        assert i18n.catalog().ugettext("Send") == "发送"


def test_the_cookie_beats_the_header(client: Any) -> None:
    client.set_cookie("lang", "en")
    assert html_lang(client.get("/", headers=CHINESE).get_data(as_text=True)) == "en"
    client.set_cookie("lang", "zh_Hans")
    html = client.get("/", headers={"Accept-Language": "en-US"}).get_data(as_text=True)
    assert html_lang(html) == "zh-Hans" and "新对话" in html
    client.set_cookie("lang", "klingon")  # not ours: the header decides
    assert html_lang(client.get("/", headers=CHINESE).get_data(as_text=True)) == "zh-Hans"


def test_the_switch_sets_the_cookie_and_redirects_back(client: Any) -> None:
    page = client.get("/").get_data(as_text=True)
    assert 'action="/lang"' in page and 'aria-label="Language"' in page
    assert '<button type="submit" name="lang" value="zh_Hans" lang="zh-Hans"' in page
    response = client.post("/lang", data={"csrf_token": csrf_of(page), "lang": "zh_Hans",
                                          "next": "/search?q=tea"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/search?q=tea"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("lang=zh_Hans;") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    html = client.get("/search?q=tea", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert html_lang(html) == "zh-Hans" and "搜索对话" in html
    assert 'value="zh_Hans" lang="zh-Hans" class="ghost" aria-current="true"' in html

    back = client.post("/lang", data={"csrf_token": csrf_of(html), "lang": "en",
                                      "next": "//elsewhere.example/"})
    assert back.headers["Location"] == "/"  # only local paths
    assert html_lang(client.get("/", headers=CHINESE).get_data(as_text=True)) == "en"


def test_the_switch_needs_the_csrf_token(client: Any) -> None:
    response = client.post("/lang", data={"lang": "zh_Hans"}, headers=CHINESE)
    assert response.status_code == 403
    assert "Set-Cookie" not in response.headers or "lang=" not in response.headers["Set-Cookie"]
    assert "会话已过期或表单已失效" in response.get_data(as_text=True)


# What is translated ---------------------------------------------------------

def test_error_messages_are_translated(client: Any) -> None:
    csrf = csrf_of(client.get("/").get_data(as_text=True))
    htmx = {"HX-Request": "true", "X-CSRF-Token": csrf}
    empty = client.post("/chat", data={"text": "  "}, headers={**htmx, **CHINESE})
    assert empty.status_code == 400 and "请先输入消息。" in empty.get_data(as_text=True)
    english = client.post("/chat", data={"text": "  "}, headers=htmx)
    assert "Type a message first." in english.get_data(as_text=True)

    missing = client.get("/c/" + "x" * 22, headers=CHINESE).get_data(as_text=True)
    assert "<h1>404 · 未找到</h1>" in missing and "此对话不存在，或不属于你。" in missing
    assert "返回 webchat" in missing
    werkzeug_default = client.get("/no-such-page", headers=CHINESE).get_data(as_text=True)
    assert "服务器上找不到所请求的网址" in werkzeug_default  # werkzeug's own description
    assert "<h1>404 · Not Found</h1>" in client.get("/no-such-page").get_data(as_text=True)


def test_numbers_in_messages_are_localised(tmp_path: Path) -> None:
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "BACKEND": "demo", "MAX_MESSAGE_CHARS": 1000})
    client = app.test_client()
    csrf = csrf_of(client.get("/").get_data(as_text=True))
    htmx = {"HX-Request": "true", "X-CSRF-Token": csrf}
    english = client.post("/chat", data={"text": "a" * 1500}, headers=htmx)
    assert english.status_code == 413
    assert ("The message is too long: 1,500 characters, the limit is 1,000."
            in english.get_data(as_text=True))
    chinese = client.post("/chat", data={"text": "a" * 1500}, headers={**htmx, **CHINESE})
    assert "消息太长：共 1,500 个字符，上限为 1,000 个。" in chinese.get_data(as_text=True)


def test_the_reply_footer_is_localised_with_its_time(client: Any) -> None:
    url = start_turn(client, headers=CHINESE)
    body = client.get(url, headers=CHINESE).get_data(as_text=True)
    done = body[body.index("event: done"):]
    assert "个 token" in done and "token/秒" in done and "复制回复" in done and "重新生成" in done
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00" title="[^"]+">'
                     r"\d\d:\d\d</time>", done), done
    english = client.get(url).get_data(as_text=True)
    assert re.search(r" tokens?</span>", english) and "tok/s" in english
    assert re.search(r"<time [^>]+>\d{1,2}:\d\d\s[AP]M</time>", english)


def test_the_streams_status_and_failure_are_translated(app: Any, client: Any,
                                                     monkeypatch: Any) -> None:
    url = start_turn(client, headers=CHINESE)
    runner = app.extensions["webchat.runner"]

    def tail(_mid: str, _load: Any, _row: Any = None) -> Iterator[Update]:
        yield Update("status", "queued", "1")
        raise RuntimeError("the run broke")

    monkeypatch.setattr(runner, "claim_and_start", lambda *args: True)
    monkeypatch.setattr(runner, "tail", tail)
    body = client.get(url, headers=CHINESE).get_data(as_text=True)
    assert "event: status\nid: 1\ndata: 排队中：正在等待模型…" in body
    assert "数据流中断了。请刷新页面查看回复。" in body
    english = client.get(url).get_data(as_text=True)
    assert "data: Queued: waiting for the model…" in english


def test_times_are_in_the_readers_language_and_zone(app: Any) -> None:
    moment = datetime(2024, 1, 5, 6, 30, tzinfo=UTC).timestamp()
    headers = {"Accept-Language": "zh-CN", "Cookie": "tz=Asia/Shanghai"}
    with app.test_request_context("/", headers=headers):
        tag = str(i18n.time_tag(moment))
    assert tag.startswith('<time datetime="2024-01-05T06:30:00+00:00"')
    assert ">2024/1/5 14:30</time>" in tag
    with app.test_request_context("/", headers={"Accept-Language": "en-US"}):
        assert ">1/5/24, 6:30\u202fAM</time>" in str(i18n.time_tag(moment))
        today = str(i18n.time_tag(datetime.now(UTC).timestamp()))
    assert re.search(r">\d{1,2}:\d\d\u202f[AP]M</time>", today), "today's time has no date"


def test_the_script_takes_its_words_from_the_page(client: Any) -> None:
    script = (ROOT / "static" / "app.js").read_text(encoding="utf-8")
    for english in ("Generating", "Reply complete", "The reply failed", "Copied"):
        assert english not in script
    html = client.get("/", headers=CHINESE).get_data(as_text=True)
    for attribute in ('data-i18n-generating="正在生成…"', 'data-i18n-complete="回复已完成。"',
                      'data-i18n-failed="回复失败。"', 'data-i18n-copied="已复制"',
                      'data-i18n-copy="复制"', 'data-i18n-copy-code="复制代码"'):
        assert attribute in html


# The catalogs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The messages the code holds now, as `pybabel extract -F babel.cfg` finds them."""
    pot = tmp_path_factory.mktemp("pot") / "messages.pot"
    CommandLineInterface().run(["pybabel", "-q", "extract", "-F", str(ROOT / "babel.cfg"),
                                "--no-location", "-o", str(pot), str(ROOT)])
    with pot.open("rb") as handle:
        return read_po(handle)


def test_every_message_has_a_chinese_translation(extracted: Any) -> None:
    with CATALOG.open("rb") as handle:
        catalog = read_po(handle)
    wanted = {message.id for message in extracted if message.id}
    assert len(wanted) > 80
    have = {message.id: message for message in catalog if message.id}
    untranslated = [mid for mid in wanted if mid not in have or have[mid].fuzzy
                    or not all(have[mid].string if isinstance(mid, tuple)
                               else [have[mid].string])]
    assert not untranslated, ("translate these in messages.po (pybabel update, then compile): "
                              f"{untranslated}")
    stale = [mid for mid in have if mid not in wanted]
    assert not stale, f"messages.po has messages the code no longer uses: {stale}"
    problems = [(message.id, errors) for message, errors in catalog.check()]
    assert not problems, problems  # e.g. a %(name)s placeholder lost in translation


def test_the_committed_mo_matches_the_po() -> None:
    with CATALOG.open("rb") as handle:
        catalog = read_po(handle)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    with CATALOG.with_suffix(".mo").open("rb") as handle:
        committed = read_mo(handle)

    def strings(mo: Any) -> dict[Any, Any]:
        def key(value: Any) -> Any:
            return tuple(value) if isinstance(value, list | tuple) else value
        return {(key(message.id), message.context): key(message.string)
                for message in mo if message.id}

    assert len(strings(committed)) > 80
    assert strings(committed) == strings(read_mo(compiled)), (
        "messages.mo is out of date: run `pybabel compile -d translations`")


def test_known_texts_are_still_said_the_same_way() -> None:
    sources = "".join((ROOT / "webchat" / name).read_text(encoding="utf-8")
                      for name in ("runs.py", "store.py"))
    werkzeug = {text for cls in vars(exceptions).values()
                if isinstance(cls, type) and issubclass(cls, exceptions.HTTPException)
                and cls.code for text in (cls().name, cls.description)}
    werkzeug.add(views.TooManyRequests.name)
    for text in i18n.KNOWN_TEXTS:
        assert f'"{text}"' in sources or text in werkzeug, text


# In a browser ------------------------------------------------------------------

@pytest.fixture
def zh_page(browser: Any) -> Iterator[Any]:
    """A browser set up for Simplified Chinese in Shanghai; console errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, locale="zh-CN",
                                  timezone_id="Asia/Shanghai")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.console_errors = errors
    yield page
    context.close()


@pytest.mark.e2e
def test_a_chinese_browser_sees_chinese_and_can_switch_to_english(
        server_factory: Any, zh_page: Any) -> None:
    server: Server = server_factory(env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "400"})
    page = zh_page
    page.goto(server.url + "/")
    assert page.locator("html").get_attribute("lang") == "zh-Hans"
    page.get_by_role("heading", name="有什么可以帮你的？").wait_for()
    box = page.get_by_label("消息", exact=True)
    box.fill("你好，请介绍一下你自己")
    box.press("Enter")
    reply = page.locator(".msg.assistant[data-status=complete]")
    reply.wait_for(timeout=20_000)
    meta = reply.locator(".meta").text_content() or ""
    assert "个 token" in meta and "token/秒" in meta
    # The page was first drawn in UTC; the reply came after app.js sent the zone.
    shown = reply.locator(".meta time").text_content() or ""
    iso = reply.locator(".meta time").get_attribute("datetime") or ""
    local = datetime.fromisoformat(iso).astimezone(views.ZoneInfo("Asia/Shanghai"))
    assert shown == local.strftime("%H:%M"), (shown, iso)
    assert page.locator("#announcer").text_content() == "回复已完成。"
    reply.locator(".code button.copy").first.wait_for()
    assert reply.locator(".code button.copy").first.text_content() == "复制"
    assert page.get_by_role("group", name="语言").get_by_role("button",
                                                            name="English").is_visible()
    path = screenshot(page, "zh-desktop")
    assert path.exists()

    conversation_url = page.url  # htmx put it in the address bar after the page was drawn
    assert "/c/" in conversation_url
    page.get_by_role("group", name="语言").get_by_role("button", name="English").click()
    page.get_by_role("button", name="Regenerate this reply").wait_for()
    assert page.url == conversation_url
    assert page.locator("html").get_attribute("lang") == "en"
    assert "tokens" in (page.locator(".msg.assistant .meta").text_content() or "")
    page.reload()
    assert page.locator("html").get_attribute("lang") == "en"
    page.get_by_role("link", name="New chat").first.wait_for()
    page.get_by_role("group", name="Language").get_by_role("button", name="简体中文").click()
    page.get_by_role("button", name="重新生成此回复").wait_for()
    assert page.console_errors == []
