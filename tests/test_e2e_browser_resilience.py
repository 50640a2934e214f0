"""Stop, reload, second tabs and many tabs, in a real browser on a real server."""

from __future__ import annotations

from typing import Any

import pytest

from webchat.backends.base import ChatMessage
from webchat.backends.demo import demo_reply

from .conftest import Server, screenshot

pytestmark = pytest.mark.e2e


def send(page: Any, text: str) -> None:
    page.wait_for_load_state("domcontentloaded")  # app.js (Enter sends) has run
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def stored_reply(server: Server) -> tuple[str, str]:
    row = server.row("SELECT status, content FROM messages WHERE role = 'assistant'"
                     " ORDER BY created_at DESC, position DESC LIMIT 1")
    assert row is not None, "no reply in the store"
    return row["status"], row["content"]


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from .conftest import start_server
    server = start_server(tmp_path_factory.mktemp("slow"), workers=2,
                          env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "12"})
    yield server
    server.stop()


@pytest.mark.parametrize("how", ["button", "escape"])
def test_stop_keeps_the_partial_text(slow_server: Server, page: Any, how: str) -> None:
    page.goto(slow_server.url + "/")
    send(page, f"stop me with the {how}")
    reply = page.locator(".msg.assistant")
    reply.locator(".tail p").first.wait_for()
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .body')?.textContent ?? '').length > 40")
    if how == "button":
        reply.get_by_role("button", name="Stop generating").click()
    else:
        page.keyboard.press("Escape")
    stopped = page.locator(".msg.assistant[data-status=stopped]")
    stopped.wait_for(timeout=5_000)
    assert stopped.locator(".badge").text_content() == "Stopped"
    status, content = stored_reply(slow_server)
    full = demo_reply([ChatMessage("user", f"stop me with the {how}")])
    assert status == "stopped"
    assert 0 < len(content) < len(full) and full.startswith(content)
    assert stopped.get_by_role("button", name="Continue this reply").is_visible()
    screenshot(page, f"stopped-{how}")
    # The composer is usable again at once.
    send(page, "after the stop")
    page.locator(".msg.assistant").nth(1).wait_for()
    assert page.locator(".msg.user").count() == 2
    assert page.console_errors == []


def test_reload_mid_reply_resumes_and_completes(slow_server: Server, page: Any) -> None:
    page.goto(slow_server.url + "/")
    send(page, "reload in the middle")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .body')?.textContent ?? '').length > 60")
    page.reload()
    reply = page.locator(".msg.assistant")
    assert reply.get_attribute("aria-busy") == "true"
    # The text so far is there at once (from the store's last checkpoint, <= 0.5 s old).
    assert len(reply.locator(".body").text_content()) > 20
    done = page.locator(".msg.assistant[data-status=complete]")
    done.wait_for(timeout=30_000)
    expected = demo_reply([ChatMessage("user", "reload in the middle")])
    assert stored_reply(slow_server) == ("complete", expected)
    assert done.locator(".body").text_content().count("You wrote:") == 1
    assert page.console_errors == []


def test_two_tabs_follow_the_same_reply(slow_server: Server, page: Any) -> None:
    page.goto(slow_server.url + "/")
    send(page, "two tabs at once")
    page.wait_for_url("**/c/**")
    second = page.context.new_page()
    second.goto(page.url)
    for tab in (page, second):
        tab.locator(".msg.assistant[data-status=complete]").wait_for(timeout=30_000)
    first_text = page.locator(".msg.assistant .body").text_content()
    assert first_text == second.locator(".msg.assistant .body").text_content()
    assert first_text.count("You wrote:") == 1


def test_eight_tabs_each_get_their_reply(server_factory: Any, browser: Any) -> None:
    server = server_factory(env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "200"})
    context = browser.new_context()
    try:
        tabs = [context.new_page() for _ in range(8)]
        for tab in tabs:
            tab.goto(server.url + "/")
        # Idle tabs hold no stream.
        for tab in tabs:
            assert tab.locator("[sse-connect]").count() == 0
        for number, tab in enumerate(tabs):
            send(tab, f"tab number {number}")
        for number, tab in enumerate(tabs):
            done = tab.locator(".msg.assistant[data-status=complete]")
            try:
                done.wait_for(timeout=30_000)
            except Exception as exc:
                states = [(t.locator(".msg").count(), t.locator("#form-error").inner_text(),
                           t.locator(".msg.assistant").evaluate_all(
                               "els => els.map(e => e.dataset.status)")) for t in tabs]
                streams = [line for line in server.log_text().splitlines() if "/stream" in line]
                raise AssertionError(f"tab {number} never completed: {states}\n"
                                     + "\n".join(streams[-30:])) from exc
            assert f"tab number {number}" in done.locator(".body").text_content()
            assert tab.locator("[sse-connect]").count() == 0  # finished: the stream is closed
    finally:
        context.close()


def test_the_page_follows_new_text_until_the_reader_scrolls_up(slow_server: Server,
                                                              browser: Any) -> None:
    context = browser.new_context(viewport={"width": 800, "height": 420})
    try:
        page = context.new_page()
        page.goto(slow_server.url + "/")
        send(page, "a long reply in a short window")
        scroller = page.locator("#scroller")
        page.wait_for_function(
            "() => { const s = document.getElementById('scroller');"
            " return s.scrollHeight > s.clientHeight + 150; }", timeout=20_000)
        at_bottom = "el => el.scrollHeight - el.scrollTop - el.clientHeight < 80"
        assert scroller.evaluate(at_bottom), "the page did not follow the reply"
        scroller.evaluate("el => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); }")
        height = scroller.evaluate("el => el.scrollHeight")
        page.wait_for_function(
            f"() => document.getElementById('scroller').scrollHeight > {height} + 40")
        assert scroller.evaluate("el => el.scrollTop") == 0, "the page yanked the reader down"
    finally:
        context.close()
