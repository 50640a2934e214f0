"""The SSE encoder: what goes in comes out of real SSE parsers unchanged."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from webchat.sse import encode_comment, encode_event, encode_retry

TRICKY = [
    "plain",
    "",
    "two\nlines",
    "carriage\rreturn",
    "windows\r\nline",
    "mixed\n\r\r\n\n\rend",
    "\n",
    "\n\n",
    "trailing newline\n",
    "  leading spaces",
    " one leading space",
    "line separator\u2028and paragraph separator\u2029inside",
    "data: looks like a field\nevent: forged\nid: 999\nretry: 1",
    ": a comment-looking line",
    "NUL \x00 inside",
    "emoji 😄 and 中文",
    "<p>HTML</p>\n<pre>  indented\n\tcode</pre>",
]


def parse_with_httpx_sse(body: bytes) -> list[tuple[str, str, str]]:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, content=body,
                                       headers={"Content-Type": "text/event-stream"}))
    with httpx.Client(transport=transport) as client, \
            connect_sse(client, "GET", "http://127.0.0.1/stream") as source:
        # httpx-sse also reports a bare ``retry:`` block, which browsers don't dispatch.
        return [(event.event, event.data, event.id) for event in source.iter_sse()
                if event.retry is None]


@pytest.mark.parametrize("data", TRICKY)
def test_a_real_parser_gets_back_exactly_the_data(data: str) -> None:
    body = encode_event("delta", data, "42")
    assert b"\r" not in body, "only LF line endings are sent"
    assert parse_with_httpx_sse(body) == [("delta", data.replace("\r\n", "\n").replace("\r", "\n"),
                                           "42")]


def test_line_breaks_become_data_lines() -> None:
    assert encode_event("x", "a\r\nb\rc\nd") == b"event: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n"


def test_empty_data_still_has_a_data_line() -> None:
    assert encode_event("done", "") == b"event: done\ndata: \n\n"


def test_event_name_and_id_cannot_break_the_frame() -> None:
    body = encode_event("na\nme\r", "x", "1\n2\x003")
    assert body == b"event: name\nid: 123\ndata: x\n\n"


def test_many_events_in_one_body_stay_separate() -> None:
    body = encode_retry(2000) + encode_comment("ping") + b"".join(
        encode_event("delta", data, str(i)) for i, data in enumerate(TRICKY))
    parsed = parse_with_httpx_sse(body)
    assert [p[2] for p in parsed] == [str(i) for i in range(len(TRICKY))]
    assert [p[1] for p in parsed] == [d.replace("\r\n", "\n").replace("\r", "\n") for d in TRICKY]


def test_comment_is_a_comment() -> None:
    assert encode_comment("ping") == b": ping\n\n"
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    assert parse_with_httpx_sse(encode_comment("ping\nevent: x")) == []


@pytest.mark.e2e
def test_the_browsers_event_source_gets_back_exactly_the_data(browser: Any) -> None:
    # The same bytes, parsed by Chromium's own EventSource.
    body = b"".join(encode_event("delta", data, str(i)) for i, data in enumerate(TRICKY))
    body += encode_event("end", "")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.route("http://127.0.0.1:9/", lambda route: route.fulfill(
            status=200, body="<!doctype html><title>sse</title>", content_type="text/html"))
        page.route("http://127.0.0.1:9/stream", lambda route: route.fulfill(
            status=200, body=body, content_type="text/event-stream"))
        page.goto("http://127.0.0.1:9/")
        received = page.evaluate("""() => new Promise((resolve) => {
            const got = [];
            const source = new EventSource("/stream");
            source.addEventListener("delta", (e) => got.push([e.data, e.lastEventId]));
            source.addEventListener("end", () => { source.close(); resolve(got); });
        })""")
    finally:
        context.close()
    expected = [[d.replace("\r\n", "\n").replace("\r", "\n"), str(i)] for i, d in enumerate(TRICKY)]
    assert json.dumps(received, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)
