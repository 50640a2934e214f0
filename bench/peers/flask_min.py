"""The floor of webchat's stack: a minimal Flask generator route on gunicorn gevent.

Same named events as webchat (``snapshot``, ``delta``…, ``done``), similar data
sizes, the demo backend's pacing; no store, no session, no markdown, no templates.
Run it as webchat runs (the harness does):

    gunicorn -k gevent --worker-connections 4000 --workers 1 --chdir bench/peers \
        --bind 127.0.0.1:PORT flask_min:app

``GET /stream?tokens=T&rate=R&coalesce_ms=C&sid=S`` streams T tokens at R tokens/s;
with C > 0, tokens due within C ms of the last event go out together (as
webchat's WEBCHAT_COALESCE_MS does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask, Response, request
from reply import Reply, snapshot_html

app = Flask(__name__)


def encode(event: str, data: str, event_id: str) -> bytes:
    """Encode one SSE event: each line of ``data`` on its own ``data:`` line."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\nid: {event_id}\n{lines}\n".encode()


def events(sid: str, tokens: int, rate: float, coalesce: float) -> Iterator[bytes]:
    """Yield retry and snapshot at once, then deltas on the schedule, then done."""
    yield b"retry: 2000\n\n"
    yield encode("snapshot", snapshot_html(sid), "0")
    reply = Reply(sid)
    start = time.monotonic()
    last_sent = float("-inf")
    index = 0
    while index < tokens:
        delay = max(start + index / rate, last_sent + coalesce) - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # gevent's sleep: the gevent worker patches time
        now, before = time.monotonic(), index
        while index < tokens and start + index / rate <= now:
            reply.add(index)
            index += 1
        if index == before:  # woke a little early: nothing is due yet
            continue
        yield encode("delta", reply.delta_html(), str(len(reply.text)))
        last_sent = time.monotonic()
    yield encode("done", reply.done_html(tokens), str(len(reply.text)))


@app.get("/stream")
def stream() -> Response:
    """Stream one reply."""
    tokens = int(request.args.get("tokens", "200"))
    rate = float(request.args.get("rate", "20"))
    coalesce = float(request.args.get("coalesce_ms", "0")) / 1000
    sid = request.args.get("sid", "0")
    response = Response(events(sid, tokens, rate, coalesce), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache, no-transform"
    response.headers["X-Accel-Buffering"] = "no"
    return response


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Answer the harness's readiness probe."""
    return {"status": "ok"}
