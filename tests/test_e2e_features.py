"""The everyday features of the chat page, used as a person would, in Chromium."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from webchat import store

from .conftest import Server, screenshot

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from .conftest import start_server
    started = start_server(tmp_path_factory.mktemp("features"),
                           env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "400"})
    yield started
    started.stop()


def send(page: Any, text: str) -> Any:
    page.wait_for_load_state("domcontentloaded")
    before = page.locator(".msg.assistant").count()
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")
    done = page.locator(".msg.assistant").nth(before)
    page.locator(f".msg.assistant >> nth={before}").and_(
        page.locator(".msg.assistant:not([aria-busy])")).wait_for(timeout=20_000)
    return done


def open_menu(page: Any) -> Any:
    page.get_by_label("Conversation options").click()
    return page.locator(".menu-panel")


def test_rename_settings_export_and_delete(server: Server, page: Any) -> None:
    page.goto(server.url + "/")
    send(page, "A conversation about tea")
    panel = open_menu(page)
    panel.get_by_label("Title").fill("Tea notes")
    panel.get_by_role("button", name="Rename").click()
    page.locator("#chat-title", has_text="Tea notes").wait_for()
    assert page.locator("#conversations a[aria-current=page]").text_content() == "Tea notes"

    panel.get_by_label("System prompt").fill("Answer like a pirate.")
    panel.get_by_label("Temperature").fill("0.7")
    panel.get_by_role("button", name="Save").click()
    panel.get_by_text("Saved.").wait_for()
    page.reload()
    panel = open_menu(page)
    assert panel.get_by_label("System prompt").input_value() == "Answer like a pirate."
    assert panel.get_by_label("Temperature").input_value() == "0.7"

    with page.expect_download() as download_info:
        panel.get_by_role("link", name="JSON").click()
    data = json.loads(Path(download_info.value.path()).read_text(encoding="utf-8"))
    assert data["title"] == "Tea notes" and data["system_prompt"] == "Answer like a pirate."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == "A conversation about tea"
    with page.expect_download() as download_info:
        panel.get_by_role("link", name="Markdown").click()
    markdown = Path(download_info.value.path()).read_text(encoding="utf-8")
    assert markdown.startswith("# Tea notes") and "## You\n\nA conversation about tea" in markdown

    page.once("dialog", lambda dialog: dialog.accept())
    panel.get_by_role("button", name="Delete conversation").click()
    page.wait_for_url(server.url + "/")
    assert page.locator("#conversations a", has_text="Tea notes").count() == 0


def test_edit_a_message_replaces_the_later_turns(server: Server, page: Any) -> None:
    page.goto(server.url + "/")
    send(page, "first question")
    send(page, "second question")
    assert page.locator(".msg.user").count() == 2
    first = page.locator(".msg.user").first
    first.hover()
    first.get_by_role("link", name="Edit this message").click()
    editor = page.get_by_role("textbox", name="Your message")
    editor.fill("first question, edited")
    page.get_by_role("button", name="Save and send").click()
    page.wait_for_function("() => document.querySelectorAll('.msg.user').length === 1")
    page.locator(".msg.assistant[data-status=complete]").first.wait_for(timeout=20_000)
    assert page.url == page.url.split("?")[0], "the address bar still says ?edit="
    assert page.locator(".msg.user .text").text_content() == "first question, edited"
    assert "first question, edited" in page.locator(".msg.assistant .body").text_content()
    page.reload()
    assert page.locator(".msg").count() == 2


def test_regenerate_and_copy_a_reply(server: Server, page: Any) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(server.url + "/")
    reply = send(page, "copy this")
    reply.get_by_role("button", name="Copy reply").click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith("This is the **demo model**") and "“copy this”" in copied
    page.locator(".msg.assistant .code button.copy").click()
    assert page.evaluate("() => navigator.clipboard.readText()").startswith("def greet(")
    reply.get_by_role("button", name="Regenerate this reply").click()
    page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=20_000)
    assert page.locator(".msg.assistant").count() == 1


def test_search_finds_messages_in_any_conversation(server: Server, page: Any) -> None:
    page.goto(server.url + "/")
    send(page, "the zebra crossing question")
    page.get_by_role("link", name="New chat").first.click()
    send(page, "汉语拼音的问题")
    search = page.get_by_role("searchbox", name="Search conversations").first
    search.fill("zebra")
    search.press("Enter")
    page.wait_for_url("**/search?q=zebra")
    results = page.locator(".results li")
    assert results.count() >= 1
    assert results.first.locator("mark").first.text_content().lower().startswith("zeb")
    page.get_by_role("searchbox", name="Search conversations").last.fill("拼音")
    page.get_by_role("button", name="Search").click()
    page.locator(".results li mark", has_text="拼音").first.wait_for()
    results.first.locator("a").click()
    page.locator(".msg.user", has_text="汉语拼音的问题").wait_for()


def test_sidebar_groups_by_day_and_long_conversations_load_on_scroll(server: Server,
                                                                     page: Any) -> None:
    page.goto(server.url + "/")
    send(page, "a long conversation")
    cid = page.url.rsplit("/", 1)[1]
    send(page, "today's second conversation")  # same conversation, still today
    now = time.time()
    db = store.connect(server.store_location)
    try:
        owner = db.execute("SELECT owner FROM conversations WHERE id = ?", (cid,)).fetchone()[0]
        # Two older conversations, and a hundred more messages in this one.
        for days, title in ((3, "From three days ago"), (30, "From last month")):
            db.execute("INSERT INTO conversations (id, owner, title, created_at, updated_at)"
                       " VALUES (?, ?, ?, ?, ?)", (f"old{days:019d}", owner, title,
                                                   now - days * 86400, now - days * 86400))
        db.execute("UPDATE messages SET position = position + 100 WHERE conversation_id = ?",
                   (cid,))
        for position in range(100):
            db.execute("INSERT INTO messages (id, conversation_id, position, role, content,"
                       " status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'complete', ?, ?)",
                       (f"m{position:021d}", cid, position,
                        "user" if position % 2 == 0 else "assistant", f"Old message {position}",
                        now - 1000 + position, now - 1000 + position))
    finally:
        db.close()
    page.goto(f"{server.url}/c/{cid}")
    groups = page.locator("#conversations h2.group").all_text_contents()
    assert groups == ["Today", "Previous 7 days", "Older"]
    assert page.locator("#conversations a", has_text="From last month").count() == 1
    assert page.locator(".msg").count() == 40
    page.locator("#scroller").evaluate("el => el.scrollTop = 0")
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 80")
    page.locator("#scroller").evaluate("el => el.scrollTop = 0")
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 104")
    assert page.locator(".msg .text").first.text_content() == "Old message 0"
    assert page.locator("#older").count() == 0


def test_dark_mode_toggle_persists_and_phone_layout(server: Server, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        page = context.new_page()
        page.goto(server.url + "/")
        send(page, "Show me **markdown** and code, 请")
        screenshot(page, "desktop-light")
        page.get_by_role("button", name="Light / dark").click()
        assert page.locator("html").get_attribute("data-theme") == "dark"
        page.reload()
        assert page.locator("html").get_attribute("data-theme") == "dark"
        screenshot(page, "desktop-dark")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(23, 25, 29)"
    finally:
        context.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                has_touch=True, device_scale_factor=2)
    try:
        page = phone.new_page()
        page.goto(server.url + "/")
        send(page, "Hello from a phone")
        assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()[
            "x"] < -100
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways on a phone"
        screenshot(page, "phone")
        page.get_by_label("Show conversations").click()
        page.wait_for_function(
            "() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
        screenshot(page, "phone-sidebar")
        assert page.locator("#conversations a", has_text="Hello from a phone").is_visible()
    finally:
        phone.close()
