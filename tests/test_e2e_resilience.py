"""Replies survive: closed tabs, dropped connections, other workers, crashes, deploys."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from webchat.backends.base import ChatMessage
from webchat.backends.demo import demo_reply
from webchat.render import render_markdown

from .chat_client import ChatClient
from .conftest import Server, screenshot, share
from .proxy import CuttingProxy
from .reassemble import Reader

pytestmark = pytest.mark.e2e


def reply_row(server: Server, url: str) -> dict[str, Any]:
    mid = url.split("/")[4]
    row = server.row("SELECT * FROM messages WHERE id = ?", (mid,))
    assert row is not None, f"no message {mid} in the store"
    return row


def wait_for_status(server: Server, url: str, statuses: set[str],
                    limit: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        row = reply_row(server, url)
        if row["status"] in statuses:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"reply still {row['status']} after {limit} s")
        time.sleep(0.1)


def owner_pid(row: dict[str, Any]) -> int:
    return int(row["worker_id"].split(":")[1])


def test_a_reply_keeps_generating_with_no_tab_open(live_server: Server) -> None:
    client = ChatClient(live_server.url)
    try:
        _, url = client.send("nobody is watching")
        first = client.events(url, stop_after=3)  # then the tab closes
        assert first[0].name == "snapshot"
        row = wait_for_status(live_server, url, {"complete"})
        expected = demo_reply([ChatMessage("user", "nobody is watching")])
        assert row["content"] == expected
        back = client.events(url)
        assert [e.name for e in back] == ["snapshot", "done"]
        reader = Reader()
        for event in back:
            reader.apply(event)
        assert reader.html == render_markdown(expected)
    finally:
        client.close()


def test_a_dropped_connection_resumes_with_nothing_lost_or_doubled(live_server: Server) -> None:
    port = int(live_server.url.rsplit(":", 1)[1])
    with CuttingProxy(("127.0.0.1", port), cut_after=2500) as proxy:
        direct = ChatClient(live_server.url)
        _, url = direct.send("cut me off")
        client = ChatClient(f"http://127.0.0.1:{proxy.port}")  # the stream goes through the proxy
        client.http.cookies = direct.http.cookies
        direct.close()
        try:
            reader = Reader()
            with pytest.raises(Exception):  # noqa: B017 - any transport error: the cut
                for event in client.iter_events(url):
                    reader.apply(event)
            assert reader.html, "nothing arrived before the cut"
            full = render_markdown(demo_reply([ChatMessage("user", "cut me off")]))
            assert full.startswith(reader.blocks), "finished blocks differ before the cut"
            events = client.events(url, headers={"Last-Event-ID": reader.last_id})
            assert events[0].name == "snapshot"
            for event in events:
                reader.apply(event)
                # After every swap the finished blocks are exactly the start of the reply.
                assert full.startswith(reader.blocks), "text lost or doubled after resuming"
            final = reply_row(live_server, url)
            assert final["status"] == "complete"
            assert render_markdown(final["content"]) == full
            assert events[-1].name == "done"
            assert reader.html == full, "the page does not end with the whole reply"
            assert proxy.connections == 2
        finally:
            client.close()


def test_another_instance_tails_and_stops_a_reply(server_factory: Any, tmp_path: Path) -> None:
    slow = {"WEBCHAT_DEMO_TOKENS_PER_SECOND": "8"}
    first = server_factory(env=slow)
    second = share(first, tmp_path, env=slow)
    a, b = ChatClient(first.url), ChatClient(second.url)
    try:
        _, url = a.send("two instances")
        a_events = a.events(url, stop_after=4)  # instance A claims and runs the reply
        b.http.cookies = a.http.cookies  # the same browser, its next request on instance B
        b.csrf = a.csrf
        b_events = b.events(url, stop_after=2)
        assert b_events[0].name == "snapshot"
        row = reply_row(first, url)
        assert owner_pid(row) in first.worker_pids()
        started = time.monotonic()
        assert b.post(url.removesuffix("/stream") + "/stop").status_code == 200
        stopped = wait_for_status(first, url, {"stopped"}, limit=5)
        assert time.monotonic() - started < 1.5
        assert stopped["content"] and len(stopped["content"]) < len(
            demo_reply([ChatMessage("user", "two instances")]))
        tail = b.events(url)
        assert tail[-1].name == "done" and "Stopped" in tail[-1].data
        assert a_events[0].name == "snapshot"
    finally:
        a.close()
        b.close()
        second.stop()


def test_sigkill_mid_reply_keeps_the_text_and_offers_continue(server_factory: Any,
                                                              page: Any) -> None:
    server = server_factory(env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "10"})
    client = ChatClient(server.url)
    try:
        cid, url = client.send("crash during this reply")
        seen: list[tuple[float, int]] = []
        for event in client.iter_events(url, stop_after=25):
            seen.append((event.at, int(event.id)))
        row = reply_row(server, url)
        os.kill(owner_pid(row), signal.SIGKILL)
        killed_at = time.monotonic()
        before = [length for at, length in seen if at <= killed_at - 0.6]
        stored = reply_row(server, url)
        assert stored["status"] == "streaming"
        assert len(stored["content"]) >= max(before, default=0), (
            "the store lost text sent more than half a second before the kill")
        assert server.integrity() == "ok"

        page.context.add_cookies([{"name": c.name, "value": c.value, "url": server.url}
                                  for c in client.http.cookies.jar])
        page.goto(f"{server.url}/c/{cid}")
        reply = page.locator(".msg.assistant[data-status=interrupted]")
        reply.wait_for(timeout=15_000)  # a stale heartbeat, noticed by the page's stream
        assert reply.get_by_role("button", name="Continue this reply").is_visible()
        assert reply.get_by_role("button", name="Regenerate this reply").is_visible()
        assert reply.locator(".badge").text_content() == "Interrupted"
        screenshot(page, "interrupted")
        assert reply_row(server, url)["content"] == stored["content"]
        reply.get_by_role("button", name="Regenerate this reply").click()
        page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=30_000)
        assert reply_row(server, url)["content"] == demo_reply(
            [ChatMessage("user", "crash during this reply")])
        assert server.integrity() == "ok"
    finally:
        client.close()


def test_sigterm_finishes_short_replies_and_saves_long_ones(server_factory: Any) -> None:
    server = server_factory(env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "40"})
    quick_client = ChatClient(server.url)
    try:
        _, quick = quick_client.send("short reply")
        quick_client.events(quick, stop_after=2)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=20)
        row = reply_row(server, quick)
        assert row["status"] == "complete"
        assert server.integrity() == "ok"
    finally:
        quick_client.close()


def test_sigterm_checkpoints_a_long_reply_as_interrupted(server_factory: Any) -> None:
    server = server_factory(env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "3"})
    client = ChatClient(server.url)
    try:
        _, url = client.send("a very slow reply")
        client.events(url, stop_after=4)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=20)
        assert time.monotonic() - started < 10  # graceful timeout is 5 s in tests
        row = reply_row(server, url)
        assert row["status"] == "interrupted"
        assert row["content"], "the text written before the deploy was lost"
        assert server.integrity() == "ok"
    finally:
        client.close()
