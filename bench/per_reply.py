"""What one reply costs webchat apart from its tokens: the fixed CPU of a stream, by part.

    python bench/per_reply.py            # 300 replies; about 10 s

In one process, with the Flask test client and the demo backend at an unbounded pace
(every token is generated at once, so the stream's own fixed work dominates): POST
a message (not measured), then read its stream to ``done`` (measured: the stream
request, claim, history, the run, the renders, the final save, the closing
message). Prints CPU per reply, and the parts timed inside it (nested parts are
also counted in the part around them). Not part of the test suite; the figures
are for comparing commits on one machine. Runs differ by up to 10% on a shared
machine: compare two commits by alternating them a few rounds, each from its own
checkout (``git worktree add /tmp/old <commit>``, then
``PYTHONPATH=/tmp/old python bench/per_reply.py`` and the same without it).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from webchat import create_app, render, store, views  # noqa: E402

MESSAGE = " ".join(["w"] * 100)  # the benchmark's message: a 190-token demo reply
PARTS: list[tuple[Any, str]] = [
    (store, "claim_message"), (store, "finish_message"), (store, "get_message"),
    (store, "history_before"), (render.StreamRenderer, "feed"),
    (render.StreamRenderer, "feed_growing"), (views, "_start_if_pending"),
    (views, "_owned_reply"),
]


def timed(owner: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap ``owner.name`` so that its CPU time adds up in ``totals``."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.process_time() - started

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=300)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="webchat-per-reply-")
    unlimited = 10**9
    app = create_app({
        "SECRET_KEY": "per-reply-benchmark-" + "x" * 20,
        "DATABASE_URL": f"sqlite:///{folder}/webchat.sqlite3", "BACKEND": "demo",
        "DEMO_TOKENS_PER_SECOND": 1e9, "MESSAGES_PER_MINUTE": unlimited,
        "ADDRESS_MESSAGES_PER_MINUTE": unlimited, "REPLIES_IN_FLIGHT": unlimited,
        "ADDRESS_REPLIES_IN_FLIGHT": unlimited, "MAX_REPLIES_PER_WORKER": unlimited})
    client = app.test_client()
    page = client.get("/").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None

    def post() -> str:
        answer = client.post("/chat", data={"text": MESSAGE, "conversation": ""},
                             headers={"HX-Request": "true", "X-CSRF-Token": token.group(1)})
        url = re.search(r'sse-connect="([^"]+)"', answer.get_data(as_text=True))
        assert answer.status_code == 200 and url is not None
        return url.group(1)

    warm = 20
    urls = [post() for _ in range(args.replies + warm)]
    for url in urls[:warm]:
        assert b"event: done" in client.get(url).get_data()
    totals: dict[str, float] = {}
    for owner, name in PARTS:
        timed(owner, name, totals)
    started = time.process_time()
    for url in urls[warm:]:
        assert b"event: done" in client.get(url).get_data()
    per_reply = (time.process_time() - started) / args.replies
    print(f"CPU per reply (stream to done, {args.replies} replies): {per_reply * 1000:.2f} ms")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {name:<20} {seconds / args.replies * 1000:.3f} ms")


if __name__ == "__main__":
    main()
