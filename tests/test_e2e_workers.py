"""Four gevent workers: the POST, the stream and a second tab land on any of them."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from webchat.backends.base import ChatMessage
from webchat.backends.demo import demo_reply
from webchat.render import render_markdown

from .chat_client import ChatClient
from .reassemble import Reader

pytestmark = pytest.mark.e2e


def test_replies_converge_whatever_worker_serves_each_request(server_factory: Any) -> None:
    server = server_factory(workers=4, env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "40"})
    failures: list[str] = []

    def conversation(number: int) -> None:
        text = f"conversation number {number}"
        poster = ChatClient(server.url)
        try:
            _, url = poster.send(text)
            readers = []
            for _ in range(2):  # a stream and a second tab, each on a fresh connection
                tab = ChatClient(server.url)
                tab.http.cookies = poster.http.cookies
                readers.append(tab)
            first = Reader()
            events = readers[0].iter_events(url)
            for _ in range(4):
                first.apply(next(events))
            second = Reader()
            for event in readers[1].iter_events(url):
                second.apply(event)
            for event in events:
                first.apply(event)
            expected = render_markdown(demo_reply([ChatMessage("user", text)]))
            for reader in (first, second):
                if reader.html != expected:
                    failures.append(f"{number}: {reader.html[-120:]!r}")
            with httpx.Client(base_url=server.url, cookies=poster.http.cookies) as plain:
                page = plain.get(url.rsplit("/m/", 1)[0]).text
            replies = page.count('class="msg assistant"')
            if replies != 1:
                failures.append(f"{number}: the page shows {replies} replies")
            for tab in readers:
                tab.close()
        finally:
            poster.close()

    threads = [threading.Thread(target=conversation, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert failures == []
    rows = server.rows("SELECT status, worker_id FROM messages WHERE role = 'assistant'")
    assert [row["status"] for row in rows] == ["complete"] * 8
    owners = {row["worker_id"].split(":")[1] for row in rows}
    assert len(owners) >= 2, "all replies ran on one worker: the test proved nothing"
