"""A person chats in a real browser against a real gunicorn gevent server."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest

from webchat.backends.base import ChatMessage
from webchat.backends.demo import demo_reply
from webchat.render import render_markdown

from .conftest import Server, screenshot

pytestmark = pytest.mark.e2e

# Record the reply's text each time an SSE event is swapped in, so a test can
# see that it grew through intermediate states instead of arriving at once.
RECORDER = """
window.__states = [];
document.addEventListener("htmx:sseMessage", function () {
  var bodies = document.querySelectorAll(".msg.assistant .body");
  var last = bodies[bodies.length - 1];
  if (last) { window.__states.push(last.textContent); }
});
"""


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def text_of(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return "".join(parser.parts)


def send(page: Any, text: str) -> None:
    page.wait_for_load_state("domcontentloaded")  # app.js (Enter sends) has run
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def test_reply_streams_into_the_page_and_survives_reload(live_server: Server, page: Any) -> None:
    page.add_init_script(RECORDER)
    page.goto(live_server.url + "/")
    assert page.get_by_text("What can I help with?").is_visible()
    send(page, "Hello, webchat! 你好")

    page.locator(".msg.user").filter(has_text="Hello, webchat! 你好").wait_for()
    assert page.get_by_label("Message", exact=True).input_value() == ""
    page.locator(".msg.assistant[aria-busy=true]").wait_for()
    screenshot(page, "chat-streaming")
    final = page.locator(".msg.assistant[data-status=complete]")
    final.wait_for(timeout=20_000)
    screenshot(page, "chat-complete")

    expected = demo_reply([ChatMessage("user", "Hello, webchat! 你好")])
    states: list[str] = page.evaluate("window.__states")
    lengths = [len(s) for s in states]
    growing = [n for n in lengths if 0 < n < len(text_of(render_markdown(expected)))]
    assert len(set(growing)) >= 5, f"the reply did not stream: {lengths}"
    for state in states:
        assert state.count("You wrote:") <= 1 and state.count("demo model:") <= 1, (
            f"text shown twice while streaming: {state!r}")
    body = final.locator(".body").text_content()
    assert body == text_of(render_markdown(expected))

    stored = live_server.row("SELECT content, status FROM messages WHERE role = 'assistant'"
                             " ORDER BY created_at DESC LIMIT 1")
    assert stored == {"content": expected, "status": "complete"}

    assert "/c/" in page.url, "the address bar should show the conversation"
    conversation_url = page.url
    page.reload()
    assert page.locator(".msg.user").filter(has_text="Hello, webchat! 你好").count() == 1
    assert page.locator(".msg.assistant .body").text_content() == body
    sidebar = page.locator("#conversations a[aria-current=page]")
    assert sidebar.text_content() == "Hello, webchat! 你好"
    assert page.console_errors == []

    other = page.context.browser.new_context()
    try:
        stranger = other.new_page()
        response = stranger.goto(conversation_url)
        assert response.status == 404
        assert stranger.locator(".msg").count() == 0
        assert stranger.locator("#conversations a").count() == 0
    finally:
        other.close()


def test_sidebar_lists_conversations_newest_first(live_server: Server, page: Any) -> None:
    page.goto(live_server.url + "/")
    for text in ("First conversation", "Second conversation"):
        page.get_by_role("link", name="New chat").click()
        send(page, text)
        page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=20_000)
    titles = page.locator("#conversations a").all_text_contents()
    assert titles[:2] == ["Second conversation", "First conversation"]
    page.locator("#conversations a", has_text="First conversation").click()
    page.locator(".msg.user", has_text="First conversation").wait_for()
    assert page.locator(".msg.user").count() == 1
    assert page.locator("#chat-title").text_content() == "First conversation"


def test_shift_enter_makes_a_new_line_and_enter_sends(live_server: Server, page: Any) -> None:
    page.goto(live_server.url + "/")
    box = page.get_by_label("Message", exact=True)
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    assert page.locator(".msg").count() == 0
    box.press("Enter")
    page.locator(".msg.user").wait_for()
    assert page.locator(".msg.user .text").text_content() == "line one\nline two"
    page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=20_000)
    # A second turn in the same conversation streams too.
    send(page, "and again")
    page.locator(".msg.assistant[data-status=complete]").nth(1).wait_for(timeout=20_000)
    assert page.locator(".msg.user").count() == 2
    assert page.console_errors == []
