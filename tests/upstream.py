"""A scriptable OpenAI-compatible server on 127.0.0.1 that replays recorded streams.

It serves real HTTP from a background thread, sends the recorded bytes exactly as they
are (only the HTTP framing is added), and records what it received and when the client
went away. Use it in-process::

    from tests.upstream import Reply, Upstream, fixture_reply  # or .upstream in tests/

    with Upstream() as up:                      # up.url == "http://127.0.0.1:PORT/v1"
        up.next(fixture_reply("openai_gpt-4o-mini_text_usage.sse", split=7, delay=0.01))
        up.next(Reply.error("openai_401.json", 401))
        ...                                     # point the client at up.url
        req = up.wait_request(0)                # the first request, as received
        req.json["model"]; req.headers["authorization"]
        req.disconnected.wait(1)                # the client left before the reply ended

Each POST takes the next queued ``Reply`` (``up.next(*replies)``, alias ``up.script``);
with the queue empty, ``Upstream(default=...)`` answers (e.g. ``Reply.generated()``),
else a 500 saying nothing was scripted. ``GET .../models`` lists ``Upstream(models=...)``.
``Reply.error(name_or_bytes, status, headers)`` sends an error body with Content-Length;
``Reply.generated(tokens, rate)`` streams ``generated_text(tokens)`` at ``rate`` tokens/s.
``Reply`` knobs, all optional:

- ``status``, ``headers``: the status line and headers (``Content-Type`` included).
- ``split``: where to cut the body into separately flushed HTTP chunks: an int (every
  n bytes), a list of byte offsets, ``"random"`` (1..``max_piece`` bytes, ``seed``),
  ``"events"`` (after each blank line) or None (one piece). Cuts may fall inside a line
  or a multi-byte UTF-8 character; ``utf8_cuts()`` lists offsets that do.
- ``delay``: seconds between pieces. ``hang``: seconds before the status line.
- ``stall_at`` / ``stall``: at that byte offset stop sending for ``stall`` seconds
  (``math.inf``: until the client leaves). ``abort_at``: drop the connection there.
- ``framing``: ``"chunked"`` (default for streams), ``"length"`` (Content-Length) or
  ``"close"`` (no length; the end of the body is the end of the connection).

``event_offsets(body)`` gives the byte offset after each SSE event, for ``stall_at``.
Every response closes its connection, so each request is a fresh one. ``up.requests``
holds a ``Received`` per request: ``path`` (with query), ``headers`` (lower-case names),
``body``/``json``, ``started_at``, ``bytes_sent``, ``pieces_sent``, ``finished`` (an Event),
``disconnected`` (an Event) and ``disconnected_at`` (``time.monotonic()``).

From another process::

    python tests/upstream.py --port 0 --mode generated --tokens 200 --rate 20
    python tests/upstream.py --mode fixture --fixture deepseek_reasoner_reasoning_content.sse

It prints ``listening on http://127.0.0.1:PORT/v1`` once ready and serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

# How often a waiting handler checks whether its client has gone.
POLL_INTERVAL = 0.02


def fixtures_dir() -> Path:
    """Return the recorded upstream fixtures directory (``WEBCHAT_FIXTURES`` overrides)."""
    override = os.environ.get("WEBCHAT_FIXTURES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream"


def fixture_bytes(name: str) -> bytes:
    """Return one fixture file's bytes, unchanged."""
    return (fixtures_dir() / name).read_bytes()


def event_offsets(body: bytes) -> list[int]:
    """Return the byte offset just after each SSE event (each blank-line separator)."""
    offsets, start = [], 0
    while (at := body.find(b"\n\n", start)) != -1:
        offsets.append(at + 2)
        start = at + 2
    return offsets


def utf8_cuts(body: bytes) -> list[int]:
    """Return offsets that fall inside a multi-byte UTF-8 character."""
    return [i for i, byte in enumerate(body) if byte & 0xC0 == 0x80]


SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
Split = int | Sequence[int] | Literal["random", "events"] | None


@dataclass
class Reply:
    """What the server sends for one request; see the module docstring for each knob."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: dict(SSE_HEADERS))
    split: Split = None
    seed: int = 0
    max_piece: int = 64
    delay: float = 0.0
    hang: float = 0.0
    stall_at: int | None = None
    stall: float = math.inf
    abort_at: int | None = None
    framing: Literal["chunked", "length", "close"] = "chunked"

    @classmethod
    def error(
        cls, name_or_body: str | bytes, status: int, headers: dict[str, str] | None = None
    ) -> Reply:
        """Reply with an error body: a fixture file name, or the bytes themselves.

        ``headers`` replaces the default JSON content type, so ``{}`` sends none (as Azure).
        """
        body = fixture_bytes(name_or_body) if isinstance(name_or_body, str) else name_or_body
        if headers is None:
            headers = {"Content-Type": "application/json"}
        return cls(body=body, status=status, headers=headers, framing="length")

    @classmethod
    def generated(
        cls, tokens: int = 200, rate: float = 20.0, model: str = "upstream-generated", **kw: Any
    ) -> Reply:
        """Stream ``tokens`` OpenAI-format content chunks at ``rate`` per second.

        The text is ``generated_text(tokens)``; usage and ``[DONE]`` follow.
        """
        kw.setdefault("split", "events")
        kw.setdefault("delay", 1.0 / rate if rate > 0 else 0.0)
        return cls(body=generated_body(tokens, model), **kw)


def fixture_reply(name: str, **kw: Any) -> Reply:
    """Reply with a recorded ``.sse`` stream, byte for byte."""
    return Reply(body=fixture_bytes(name), **kw)


def generated_tokens(n: int) -> list[str]:
    """Return the tokens a generated reply streams: ``t0 t1 ...``, a paragraph every 25."""
    return [f"t{i}" + ("\n\n" if i % 25 == 24 else " ") for i in range(n)]


def generated_text(n: int) -> str:
    """Return the full text of a generated reply of ``n`` tokens."""
    return "".join(generated_tokens(n))


def generated_body(n: int, model: str = "upstream-generated") -> bytes:
    """Build an OpenAI-style stream of ``n`` content tokens."""
    base = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 0}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**base, "model": model, "choices": choices, **extra}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish}

    parts = [event([choice({"role": "assistant", "content": ""})])]
    parts += [event([choice({"content": token})]) for token in generated_tokens(n)]
    parts.append(event([choice({}, "stop")]))
    usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
    parts.append(event([], usage=usage))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


@dataclass
class Received:
    """One request as the server saw it, and what became of its connection."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes
    started_at: float  # time.monotonic()
    bytes_sent: int = 0  # of the body
    pieces_sent: int = 0
    # Set when the client left before the whole reply was sent (or the server closed).
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnected_at: float | None = None  # time.monotonic() when that was noticed
    finished: threading.Event = field(default_factory=threading.Event)  # handler is done

    @property
    def json(self) -> Any:
        """Return the request body parsed as JSON."""
        return json.loads(self.body)

    def mark_disconnected(self) -> None:
        """Record that the client went away (first time only)."""
        if not self.disconnected.is_set():
            self.disconnected_at = time.monotonic()
            self.disconnected.set()


class _ClientGone(Exception):
    """The client closed the connection (or the server is shutting down)."""


class Upstream:
    """A real HTTP server on 127.0.0.1 in a background thread; see the module docstring."""

    def __init__(
        self, *, default: Reply | None = None, port: int = 0, models: Sequence[str] = ("m",)
    ):
        self.default = default
        self.models = list(models)
        self.requests: list[Received] = []
        self._queue: list[Reply] = []
        self._lock = threading.Condition()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._server.upstream = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; stalled handlers give up within ``POLL_INTERVAL``."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def next(self, *replies: Reply) -> Upstream:
        """Queue replies for the next requests, in order."""
        with self._lock:
            self._queue.extend(replies)
        return self

    script = next

    def wait_request(self, index: int = 0, timeout: float = 3.0) -> Received:
        """Return the ``index``-th request, waiting for it to arrive."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.requests) > index, timeout):
                raise TimeoutError(f"upstream: request {index} did not arrive in {timeout} s")
            return self.requests[index]

    def _take(self, received: Received) -> Reply | None:
        with self._lock:
            self.requests.append(received)
            self._lock.notify_all()
            return self._queue.pop(0) if self._queue else self.default


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet; tests read ``Upstream.requests`` instead."""

    def do_GET(self) -> None:
        up: Upstream = self.server.upstream  # type: ignore[attr-defined]
        if self.path.rstrip("/").endswith("/models"):
            data = {"object": "list", "data": [{"id": m, "object": "model"} for m in up.models]}
            self._send_simple(200, json.dumps(data).encode())
        else:
            self._send_simple(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        up: Upstream = self.server.upstream  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        received = Received(
            method="POST",
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length),
            started_at=time.monotonic(),
        )
        reply = up._take(received)
        if reply is None:
            reply = Reply.error(b'{"error": {"message": "upstream.py: no reply scripted"}}', 500)
        try:
            self._play(reply, received, up._closing)
        except (_ClientGone, ConnectionError, OSError):
            received.mark_disconnected()
        finally:
            self.close_connection = True
            received.finished.set()

    def _send_simple(self, status: int, body: bytes) -> None:
        self.close_connection = True
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        self.wfile.write(head.encode() + body)

    def _play(self, reply: Reply, received: Received, closing: threading.Event) -> None:
        sock = self.connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reply.hang:
            self._wait(reply.hang, received, closing)
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = "Unknown"
        head = [f"HTTP/1.1 {reply.status} {phrase}"]
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        if reply.framing == "chunked":
            head.append("Transfer-Encoding: chunked")
        elif reply.framing == "length":
            head.append(f"Content-Length: {len(reply.body)}")
        head.append("Connection: close")
        self._write(("\r\n".join(head) + "\r\n\r\n").encode())
        for start, piece in _pieces(reply):
            if reply.stall_at is not None and start == reply.stall_at:
                self._wait(reply.stall, received, closing)
            if reply.abort_at is not None and start == reply.abort_at:
                # No terminating chunk: the client sees the body cut short.
                sock.shutdown(socket.SHUT_RDWR)
                return
            if not piece:
                continue
            if start and reply.delay:
                self._wait(reply.delay, received, closing)
            if reply.framing == "chunked":
                self._write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self._write(piece)
            received.bytes_sent += len(piece)
            received.pieces_sent += 1
        if reply.framing == "chunked":
            self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        if _client_gone(self.connection):
            raise _ClientGone
        self.wfile.write(data)
        self.wfile.flush()

    def _wait(self, seconds: float, received: Received, closing: threading.Event) -> None:
        """Sleep, but notice within POLL_INTERVAL when the client leaves."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if closing.is_set() or _client_gone(self.connection, min(left, POLL_INTERVAL)):
                raise _ClientGone


def _client_gone(sock: socket.socket, timeout: float = 0.0) -> bool:
    """Say whether the peer closed the connection, waiting up to ``timeout`` to find out."""
    poller = select.poll()  # unlike select(), works for any file descriptor number
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    try:
        return bool(poller.poll(timeout * 1000)) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _pieces(reply: Reply) -> Iterator[tuple[int, bytes]]:
    """Cut the body where ``split`` says, plus at the stall and abort offsets."""
    body, split = reply.body, reply.split
    cuts: set[int] = set()
    if isinstance(split, int):
        cuts.update(range(split, len(body), max(split, 1)))
    elif split == "random":
        rng, at = random.Random(reply.seed), 0
        while (at := at + rng.randint(1, reply.max_piece)) < len(body):
            cuts.add(at)
    elif split == "events":
        cuts.update(event_offsets(body))
    elif split is not None:
        cuts.update(split)
    cuts.update(x for x in (reply.stall_at, reply.abort_at) if x is not None)
    bounds = sorted({0, *(c for c in cuts if 0 < c < len(body)), len(body)})
    for start, end in zip(bounds, bounds[1:], strict=False):
        yield start, body[start:end]
    # A stall or abort at the very end still has to happen.
    if len(body) in (reply.stall_at, reply.abort_at):
        yield len(body), b""


def main(argv: Sequence[str] | None = None) -> None:
    """Serve one reply shape for every request until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["generated", "fixture"], default="generated")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens per second")
    parser.add_argument("--fixture", help="an .sse file name (with --mode fixture)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between events")
    args = parser.parse_args(argv)
    if args.mode == "generated":
        default = Reply.generated(args.tokens, args.rate)
    else:
        if not args.fixture:
            parser.error("--mode fixture needs --fixture NAME")
        default = fixture_reply(args.fixture, split="events", delay=args.delay)
    # Each request gets a fresh copy of the default; the queue stays empty.
    with Upstream(default=default, port=args.port) as up:
        print(f"listening on {up.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
