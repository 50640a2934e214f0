"""With JavaScript off, the site still works: the reply streams in as HTML."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from webchat.backends.base import ChatMessage
from webchat.backends.demo import demo_reply

from .conftest import Server, csrf_of, screenshot

pytestmark = pytest.mark.e2e


@pytest.fixture
def nojs(browser: Any) -> Any:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    yield page
    context.close()


def test_send_and_read_the_whole_reply_without_javascript(live_server: Server, nojs: Any) -> None:
    nojs.goto(live_server.url + "/")
    nojs.get_by_label("Message", exact=True).fill("no scripts here")
    nojs.get_by_role("button", name="Send message").click()
    reply = nojs.locator(".msg.assistant").last
    reply.locator("footer.meta").wait_for(timeout=30_000)
    expected = demo_reply([ChatMessage("user", "no scripts here")])
    text = reply.locator(".body").text_content()
    assert "You wrote: “no scripts here”" in text and "def greet" in text
    screenshot(nojs, "no-javascript")
    # History, the sidebar, export and delete work too.
    nojs.goto(live_server.url + "/")
    link = nojs.locator("#conversations a", has_text="no scripts here")
    link.click()
    assert nojs.locator(".msg.user .text").text_content() == "no scripts here"
    assert "This is the demo model" in nojs.locator(".msg.assistant .body").text_content()
    assert expected.startswith("This is the **demo model**")
    with nojs.expect_download() as download:
        nojs.locator(".conv-menu summary").click()
        nojs.get_by_role("link", name="Markdown").click()
    assert "no scripts here" in Path(download.value.path()).read_text(encoding="utf-8")
    nojs.get_by_role("button", name="Delete conversation").click()
    nojs.wait_for_url(live_server.url + "/")
    assert nojs.locator("#conversations a", has_text="no scripts here").count() == 0


def test_the_plain_post_streams_progressively(live_server: Server) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        token = csrf_of(client.get("/").text)
        chunks: list[tuple[float, int]] = []
        with client.stream("POST", "/chat", data={"text": "stream me", "csrf_token": token}
                           ) as response:
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("text/html")
            body = ""
            for chunk in response.iter_text():
                body += chunk
                chunks.append((time.monotonic(), body.count("</p>")))
    paragraphs = [count for _, count in chunks]
    first_reply_paragraph = next(at for at, count in chunks if count >= 3)
    assert chunks[-1][0] - first_reply_paragraph > 1.0, "the reply arrived all at once"
    assert paragraphs == sorted(paragraphs)
    assert "You wrote: “stream me”" in body and body.rstrip().endswith("</html>")
