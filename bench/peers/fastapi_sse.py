"""What many Python teams would pick: FastAPI + sse-starlette on uvicorn.

The same reply as the other peers (``reply.py``). Run as uvicorn's and FastAPI's
deployment docs recommend for production (uvloop and httptools from
``uvicorn[standard]``, no reload), on one process (the harness does):

    uvicorn fastapi_sse:app --app-dir bench/peers --host 127.0.0.1 --port PORT \
        --workers 1 --loop uvloop --http httptools --backlog 4096

``GET /stream?tokens=T&rate=R&coalesce_ms=C&sid=S`` as in ``flask_min.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from reply import Reply, snapshot_html
from sse_starlette import EventSourceResponse, ServerSentEvent

app = FastAPI()


async def events(sid: str, tokens: int, rate: float, coalesce: float
                 ) -> AsyncIterator[ServerSentEvent]:
    """Yield retry and snapshot at once, then deltas on the schedule, then done."""
    yield ServerSentEvent(retry=2000)
    yield ServerSentEvent(snapshot_html(sid), event="snapshot", id="0")
    reply = Reply(sid)
    start = time.monotonic()
    last_sent = float("-inf")
    index = 0
    while index < tokens:
        delay = max(start + index / rate, last_sent + coalesce) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now, before = time.monotonic(), index
        while index < tokens and start + index / rate <= now:
            reply.add(index)
            index += 1
        if index == before:  # woke a little early: nothing is due yet
            continue
        yield ServerSentEvent(reply.delta_html(), event="delta", id=str(len(reply.text)))
        last_sent = time.monotonic()
    yield ServerSentEvent(reply.done_html(tokens), event="done", id=str(len(reply.text)))


@app.get("/stream")
async def stream(tokens: int = 200, rate: float = 20, coalesce_ms: float = 0,
                 sid: str = "0") -> EventSourceResponse:
    """Stream one reply."""
    return EventSourceResponse(events(sid, tokens, rate, coalesce_ms / 1000),
                               headers={"Cache-Control": "no-cache, no-transform",
                                        "X-Accel-Buffering": "no"})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Answer the harness's readiness probe."""
    return {"status": "ok"}
