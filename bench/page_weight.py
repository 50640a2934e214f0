"""Page weight and time to first paint: webchat's chat page vs a plain static page.

    python bench/page_weight.py [--runs 7]

Both pages hold the same conversation (one question, the demo model's reply), both
are served from 127.0.0.1 in the same run: webchat by its gunicorn gevent worker,
the static page (the same text as bare HTML, no CSS, no JavaScript) by Python's
http.server. Headless Chromium loads each page ``--runs`` times in a fresh context
(cold cache) and reads the Resource Timing and Paint Timing APIs: bytes transferred
(every resource; uncompressed, as webchat serves them — a compressing proxy shrinks
both), number of requests, first paint and first contentful paint. Medians and the
ratio webchat / static are printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chat_client import ChatClient  # noqa: E402
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, start_server  # noqa: E402
from webchat.backends.base import ChatMessage  # noqa: E402
from webchat.backends.demo import demo_reply  # noqa: E402
from webchat.render import render_markdown  # noqa: E402

MEASURE = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const resources = performance.getEntriesByType("resource");
  const paint = Object.fromEntries(performance.getEntriesByType("paint")
                                   .map(p => [p.name, p.startTime]));
  const bytes = nav.transferSize + resources.reduce((n, r) => n + r.transferSize, 0);
  return {bytes, requests: 1 + resources.length, first_paint: paint["first-paint"],
          first_contentful_paint: paint["first-contentful-paint"]};
}"""


def measure(browser: Any, url: str, cookies: list[dict[str, Any]], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        context = browser.new_context()
        if cookies:
            context.add_cookies(cookies)
        page = context.new_page()
        page.goto(url, wait_until="load")
        page.wait_for_function("() => performance.getEntriesByType('paint').length >= 2")
        samples.append(page.evaluate(MEASURE))
        context.close()
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp())
    server = start_server(tmp, env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "1000"})
    question = "What does a reply look like?"
    static_dir = tmp / "static"
    static_dir.mkdir()
    reply_html = render_markdown(demo_reply([ChatMessage("user", question)]))
    (static_dir / "index.html").write_text(
        f"<!doctype html><html lang=en><meta charset=utf-8><title>static</title>"
        f"<p>{question}</p>{reply_html}</html>", encoding="utf-8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(static_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = ChatClient(server.url)
    try:
        cid, url = client.send(question)
        client.events(url)
        cookies = [{"name": c.name, "value": c.value, "url": server.url}
                   for c in client.http.cookies.jar]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            chat = measure(browser, f"{server.url}/c/{cid}", cookies, args.runs)
            static = measure(browser, f"http://127.0.0.1:{httpd.server_address[1]}/",
                             [], args.runs)
            browser.close()
    finally:
        client.close()
        httpd.shutdown()
        server.stop()
    print(f"{'':24} {'webchat':>10} {'static':>10} {'ratio':>7}")
    for key in ("bytes", "requests", "first_paint", "first_contentful_paint"):
        unit = " ms" if "paint" in key else ""
        print(f"{key + unit:24} {chat[key]:>10.0f} {static[key]:>10.0f} "
              f"{chat[key] / static[key]:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"webchat": chat, "static": static}, indent=2))


if __name__ == "__main__":
    main()
