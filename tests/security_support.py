"""Helpers shared by the security tests (``test_security_*.py``)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from webchat import create_app

from .conftest import csrf_of
from .upstream import Upstream

ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")


def make_app(tmp_path: Path, **config: Any) -> Any:
    """Return an app on a fresh SQLite file with the demo backend at a fast pace.

    The limits are lifted unless ``config`` sets them, so a test only meets the one it is about.
    """
    return create_app({
        "TESTING": True,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'webchat.sqlite3'}",
        "BACKEND": "demo",
        "DEMO_TOKENS_PER_SECOND": 5000.0,
        "COALESCE_MS": 1,
        "MESSAGES_PER_MINUTE": 10_000,
        "ADDRESS_MESSAGES_PER_MINUTE": 10_000,
        "REPLIES_IN_FLIGHT": 10_000,
        "ADDRESS_REPLIES_IN_FLIGHT": 10_000,
        **config,
    })


def htmx_headers(token: str) -> dict[str, str]:
    return {"HX-Request": "true", "X-CSRF-Token": token}


def token_of(client: Any, path: str = "/") -> str:
    """Open a page with a Flask test client and return its CSRF token."""
    return csrf_of(client.get(path).get_data(as_text=True))


def send_turn(client: Any, text: str, conversation: str = "") -> dict[str, str]:
    """Send a message as htmx does through a Flask test client; return the ids it made."""
    token = token_of(client)
    response = client.post("/chat", data={"text": text, "conversation": conversation},
                           headers=htmx_headers(token))
    assert response.status_code == 200, response.get_data(as_text=True)
    html = response.get_data(as_text=True)
    stream = re.search(r'sse-connect="([^"]+)"', html)
    cid = re.search(r'id="conversation-id" value="([^"]+)"', html)
    user = re.search(r'<article class="msg user" id="m-([^"]+)"', html)
    assert stream and cid and user, html
    reply = stream.group(1).split("/")[4]
    return {"cid": cid.group(1), "user": user.group(1), "reply": reply, "stream": stream.group(1),
            "token": token}


def db_rows(database: str | Path, cid: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Return a conversation's row and its messages' rows, every column, for comparisons."""
    db = sqlite3.connect(str(database))
    try:
        conv = db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchall()
        messages = db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY position",
                              (cid,)).fetchall()
    finally:
        db.close()
    return conv, messages


def message_row(database: str | Path, mid: str) -> dict[str, Any]:
    db = sqlite3.connect(str(database))
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM messages WHERE id = ?", (mid,)).fetchone()
    finally:
        db.close()
    assert row is not None, mid
    return dict(row)


def integrity_check(database: str | Path) -> str:
    db = sqlite3.connect(str(database))
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def parse_csp(header: str) -> dict[str, list[str]]:
    """Split a Content-Security-Policy header into {directive: [values]}."""
    policy: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            policy[words[0].lower()] = words[1:]
    return policy


def upstream_env(up: Upstream, **extra: str) -> dict[str, str]:
    """Environment for a gunicorn server that talks to ``up`` as an OpenAI-compatible API."""
    return {"WEBCHAT_BACKEND": "openai", "OPENAI_BASE_URL": up.url, "OPENAI_API_KEY": "sk-test",
            "WEBCHAT_MODELS": "test-model", "WEBCHAT_MAX_RETRIES": "0", **extra}


def openai_sse(pieces: list[str], model: str = "test-model") -> bytes:
    """Build an OpenAI Chat Completions stream whose content deltas are ``pieces``.

    ``json.dumps`` escapes every control character, so newlines, CR and NUL in a piece
    travel inside the JSON string exactly as a provider would send them.
    """
    base = {"id": "chatcmpl-security", "object": "chat.completion.chunk", "created": 0,
            "model": model}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    parts = [event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None}])]
    parts += [event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
              for piece in pieces]
    parts.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def raw_exchange(url: str, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the server and return everything it answers until it closes.

    Stops early once a whole response head and the body its Content-Length announces
    have arrived, so a keep-alive connection does not make the test wait.
    """
    with socket.create_connection(host_port(url), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            if not piece:
                break
            data += piece
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
        return data


def status_of(raw: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    assert match, raw[:200]
    return int(match.group(1))


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """Return a process's resident memory (or its peak with ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@contextlib.contextmanager
def other_site(html: str, host: str = "127.0.0.2") -> Iterator[str]:
    """Serve one HTML page from another loopback address (another site); yield its URL.

    A real server rather than a browser route, so Chromium knows the page is on loopback
    too and its private-network checks don't stop the page's requests to webchat.
    """
    body = html.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Stay quiet."""

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
