"""Limits: sizes, rates and slow clients, on real gunicorn gevent servers configured by env.

Rates are counted in the store, so they hold across workers: the servers here run
several workers and switch on a gunicorn access log (through GUNICORN_CMD_ARGS) that
names the worker (its pid) of each request, so a test can show they were spread over them.
"""

from __future__ import annotations

import collections
import re
import socket
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .chat_client import ChatClient
from .conftest import Server, start_server
from .security_support import host_port, raw_exchange, rss_kb, status_of

pytestmark = pytest.mark.e2e

# The access log line of every request: the worker's pid, the X-Probe header, the status.
ACCESS_LOG = "--access-logfile - --access-logformat '%(p)s probe=%({x-probe}i)s %(s)s'"
MAX_CHARS = 2000


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Four workers; small per-session limits, all set through the environment."""
    server = start_server(tmp_path_factory.mktemp("limited"), workers=4, env={
        "WEBCHAT_MESSAGES_PER_MINUTE": "3",
        "WEBCHAT_REPLIES_IN_FLIGHT": "2",
        "WEBCHAT_MAX_MESSAGE_CHARS": str(MAX_CHARS),
        "WEBCHAT_MAX_CONVERSATION_MESSAGES": "4",
        "WEBCHAT_DEMO_TOKENS_PER_SECOND": "3000",
        "GUNICORN_CMD_ARGS": ACCESS_LOG,
    })
    yield server
    server.stop()


@pytest.fixture(scope="module")
def by_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers; small per-address limits and generous per-session ones."""
    server = start_server(tmp_path_factory.mktemp("address"), workers=2, env={
        "WEBCHAT_MESSAGES_PER_MINUTE": "100",
        "WEBCHAT_ADDRESS_MESSAGES_PER_MINUTE": "4",
        "WEBCHAT_ADDRESS_REPLIES_IN_FLIGHT": "2",
        "WEBCHAT_DEMO_TOKENS_PER_SECOND": "3000",
        "GUNICORN_CMD_ARGS": ACCESS_LOG,
    })
    yield server
    server.stop()


def post_fresh(server: Server, client: ChatClient, text: str, *, conversation: str = "",
               probe: str = "", user: str = "") -> httpx.Response:
    """POST a message as htmx does, on a new connection (so any worker may take it)."""
    headers = {"HX-Request": "true", "X-CSRF-Token": client.csrf, "X-Probe": probe,
               "Connection": "close"}
    if user:
        headers["X-Forwarded-User"] = user
    with httpx.Client(base_url=server.url, cookies=client.http.cookies, timeout=20) as http:
        response = http.post("/chat", data={"text": text, "conversation": conversation},
                             headers=headers)
        client.http.cookies.update(http.cookies)  # whatever session cookie the server set
    return response


def stream_url(response: httpx.Response) -> str:
    match = re.search(r'sse-connect="([^"]+)"', response.text)
    assert match, response.text[:300]
    return match.group(1)


def cid_of(response: httpx.Response) -> str:
    match = re.search(r'id="conversation-id" value="([^"]+)"', response.text)
    assert match, response.text[:300]
    return match.group(1)


def finish(client: ChatClient, response: httpx.Response) -> None:
    events = client.events(stream_url(response), limit=20)
    assert events[-1].name == "done", [e.name for e in events]


def worker_of(server: Server, probe: str) -> str:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        match = re.search(rf"^<(\d+)> probe={re.escape(probe)} ", server.log_text(), re.M)
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {probe}")


def assert_429(response: httpx.Response, words: str) -> None:
    assert response.status_code == 429, (response.status_code, response.text[:300])
    assert 1 <= int(response.headers["Retry-After"]) <= 61, response.headers
    assert words in response.text and 'role="alert"' in response.text, response.text


def new_client(server: Server) -> ChatClient:
    client = ChatClient(server.url)
    client.open()
    return client


# Rates across workers ------------------------------------------------------------

def test_messages_per_minute_hold_across_workers(limited: Server) -> None:
    client = new_client(limited)
    try:
        workers: collections.Counter[str] = collections.Counter()
        for i in range(3):
            response = post_fresh(limited, client, f"message {i}", probe=f"rate-ok-{i}")
            assert response.status_code == 200, response.text[:300]
            workers[worker_of(limited, f"rate-ok-{i}")] += 1
            finish(client, response)  # so the in-flight limit stays out of the way
        for i in range(20):  # until the refusals came from another worker as well
            response = post_fresh(limited, client, f"one too many {i}", probe=f"rate-no-{i}")
            assert_429(response, "too fast")
            workers[worker_of(limited, f"rate-no-{i}")] += 1
            if i >= 2 and len(workers) >= 3:
                break
        assert len(workers) >= 2, f"every request went to one worker: {workers}"
    finally:
        client.close()


def test_replies_in_flight_per_session_are_limited(limited: Server) -> None:
    client = new_client(limited)
    try:
        first = post_fresh(limited, client, "pending one")
        second = post_fresh(limited, client, "pending two")
        assert first.status_code == second.status_code == 200
        assert_429(post_fresh(limited, client, "a third at once"), "Too many replies")
        # Stopping one frees its place.
        stop = stream_url(first).removesuffix("/stream") + "/stop"
        assert client.post(stop).status_code == 200
        assert post_fresh(limited, client, "now it fits").status_code == 200
    finally:
        client.close()


def test_a_full_conversation_is_refused(limited: Server) -> None:
    client = new_client(limited)
    try:
        first = post_fresh(limited, client, "one")
        finish(client, first)
        cid = cid_of(first)
        second = post_fresh(limited, client, "two", conversation=cid)
        finish(client, second)
        third = post_fresh(limited, client, "three", conversation=cid)
        assert third.status_code == 409 and "full" in third.text, third.text
    finally:
        client.close()


def test_a_long_message_is_413_with_a_readable_error(limited: Server) -> None:
    client = new_client(limited)
    try:
        response = post_fresh(limited, client, "x" * (MAX_CHARS + 1))
        assert response.status_code == 413
        assert "too long" in response.text and f"{MAX_CHARS:,}" in response.text
        assert response.text.startswith('<p class="error" role="alert">')
        plain = client.http.post("/chat", data={"text": "y" * (MAX_CHARS + 1),
                                                "csrf_token": client.csrf})
        assert plain.status_code == 413 and "<h1>413" in plain.text and "too long" in plain.text
        assert post_fresh(limited, client, "z" * MAX_CHARS).status_code == 200
    finally:
        client.close()


def test_limits_are_shown_in_the_page(limited: Server, page: Any) -> None:
    page.goto(limited.url + "/")
    error = page.locator("#form-error")
    box = page.get_by_label("Message", exact=True)

    def send(text: str) -> None:
        box.fill(text)
        box.press("Enter")

    send("one")
    page.locator(".msg.assistant[data-status=complete]").nth(0).wait_for(timeout=15_000)
    send("two")
    page.locator(".msg.assistant[data-status=complete]").nth(1).wait_for(timeout=15_000)
    send("three")  # the conversation holds 4 messages: full
    page.locator("#form-error", has_text="full").wait_for(timeout=10_000)
    page.goto(limited.url + "/")
    page.locator("#composer-text").evaluate("box => box.removeAttribute('maxlength')")
    send("w" * (MAX_CHARS + 1))
    page.locator("#form-error", has_text="too long").wait_for(timeout=10_000)
    send("three")
    page.locator(".msg.assistant[data-status=complete]").nth(0).wait_for(timeout=15_000)
    send("four")  # the fourth message within a minute, three allowed
    page.locator("#form-error", has_text="too fast").wait_for(timeout=10_000)
    text = error.inner_text()
    assert re.search(r"Try again in \d+ s", text), text
    assert error.is_visible()
    page.console_errors.clear()  # the 4xx answers are logged by the browser, as they should be



def test_a_concurrent_burst_cannot_pass_the_rate_limits_in_several_workers(
        server_factory: Any) -> None:
    """Several workers take one owner's messages at the same moment: the limits still hold.

    The owner is a signed-in user (named by the trusted proxy header), whose requests write
    nothing before the check; an anonymous session's first write (recording the session)
    happens before it, which narrows the window without closing it. A fresh server: no
    worker has run a reply yet, so none is busy writing checkpoints.
    """
    server = server_factory(workers=4, env={
        "WEBCHAT_MESSAGES_PER_MINUTE": "3", "WEBCHAT_REPLIES_IN_FLIGHT": "2",
        "WEBCHAT_TRUSTED_USER_HEADER": "X-Forwarded-User",
        "WEBCHAT_TRUSTED_PROXIES": "127.0.0.1"})
    client = new_client(server)
    user = "burst-user"
    try:
        assert post_fresh(server, client, "the first message", user=user).status_code == 200
        # Another writer holds the store's write lock for a moment (a checkpoint, a slow
        # disk). A worker that takes a message now waits for the lock to write, frozen
        # (sqlite3 does not yield to gevent; the kernel shows it asleep in nanosleep), so the
        # next message goes to another worker. All within the store's busy timeout (5 s).
        blocker = sqlite3.connect(server.database, isolation_level=None, timeout=1)
        statuses: list[int] = []
        frozen: set[int] = set()
        threads = []
        try:
            blocker.execute("BEGIN IMMEDIATE")
            locked_at = time.monotonic()
            for i in range(4):
                thread = threading.Thread(target=lambda i=i: statuses.append(
                    post_fresh(server, client, f"burst {i}", user=user).status_code))
                thread.start()
                threads.append(thread)
                while len(frozen) <= i and time.monotonic() - locked_at < 3.5:
                    frozen |= {pid for pid in server.worker_pids()
                               if "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()}
                    time.sleep(0.01)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        for thread in threads:
            thread.join(20)
        assert len(frozen) >= 3, f"only {len(frozen)} workers took part"
        assert len(statuses) == 4 and set(statuses) <= {200, 429}, statuses
        db = sqlite3.connect(server.database)
        try:
            sent, in_flight = db.execute(
                "SELECT SUM(role = 'user'), SUM(role = 'assistant' AND status = 'pending')"
                " FROM messages WHERE owner = ?", (f"u:{user}",)).fetchone()
        finally:
            db.close()
        assert sent <= 3 and in_flight <= 2, (
            f"{sent} messages and {in_flight} replies in flight for limits of 3 and 2; "
            f"the burst got {statuses}")
    finally:
        client.close()


def test_per_address_limits_count_every_session(by_address: Server) -> None:
    clients = [new_client(by_address) for _ in range(6)]
    try:
        first = post_fresh(by_address, clients[0], "a")
        second = post_fresh(by_address, clients[1], "b")
        assert first.status_code == second.status_code == 200
        # Two replies in progress from this address: a third session is refused too.
        assert_429(post_fresh(by_address, clients[2], "c"), "Too many replies")
        finish(clients[0], first)
        finish(clients[1], second)
        for client, text in ((clients[2], "c"), (clients[3], "d")):
            response = post_fresh(by_address, client, text)
            assert response.status_code == 200
            finish(client, response)
        # Four messages this minute from this address, each from its own session.
        assert_429(post_fresh(by_address, clients[4], "e"), "too fast")
        assert_429(post_fresh(by_address, clients[5], "f"), "too fast")
    finally:
        for client in clients:
            client.close()


# Request size and shape -------------------------------------------------------------

def peak_memory_kb(server: Server) -> int:
    return sum(rss_kb(pid, "VmHWM") for pid in server.worker_pids())


def send_huge_body(server: Server, head: bytes, chunked: bool, total: int) -> tuple[int, int]:
    """Stream up to ``total`` body bytes; return (status, bytes sent when it arrived)."""
    sent = 0
    stop = threading.Event()
    failed: list[BaseException] = []
    with socket.create_connection(host_port(server.url), timeout=10) as sock:
        sock.sendall(head)
        piece = b"a" * 65536

        def pump() -> None:
            nonlocal sent
            try:
                while sent < total and not stop.is_set():
                    data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
                    sock.sendall(data)
                    sent += len(piece)
            except OSError as exc:  # the server closed: fine, it has answered
                failed.append(exc)

        sender = threading.Thread(target=pump, daemon=True)
        sender.start()
        answer = b""
        deadline = time.monotonic() + 15
        while b"\r\n" not in answer and time.monotonic() < deadline:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                break
            if not data:
                break
            answer += data
        at = sent
        stop.set()
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(5)
    return status_of(answer), at


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mb_body_is_refused_early_without_growing_memory(by_address: Server,
                                                               chunked: bool) -> None:
    client = new_client(by_address)
    try:
        cookie = "; ".join(f"{name}={value}" for name, value in client.http.cookies.items())
        total = 100 * 1024 * 1024
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else \
            b"Content-Length: %d\r\n" % (total + 5)
        head = (b"POST /chat HTTP/1.1\r\nHost: " + by_address.url.removeprefix("http://").encode()
                + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n" + framing
                + b"HX-Request: true\r\nX-CSRF-Token: " + client.csrf.encode()
                + b"\r\nCookie: " + cookie.encode() + b"\r\n\r\n")
        head += b"5\r\ntext=\r\n" if chunked else b"text="
        before = peak_memory_kb(by_address)
        status, sent = send_huge_body(by_address, head, chunked, total)
        assert status == 413
        assert sent < total // 2, f"the answer came after {sent:,} bytes"
        grown = peak_memory_kb(by_address) - before
        assert grown < 20 * 1024, f"the workers' peak memory grew by {grown:,} KiB"
        # The server still answers normally.
        assert httpx.get(by_address.url + "/healthz", timeout=5).status_code == 200
    finally:
        client.close()


@pytest.mark.parametrize("what,request_bytes", [
    ("request line", b"GET /" + b"a" * 10_240 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("header field", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_240 + b"\r\n\r\n"),
    ("header count", b"GET / HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n"),
])
def test_oversized_request_heads_get_a_quick_4xx(by_address: Server, what: str,
                                                 request_bytes: bytes) -> None:
    started = time.monotonic()
    answer = raw_exchange(by_address.url, request_bytes, timeout=5)
    assert 400 <= status_of(answer) < 500, (what, answer[:200])
    assert time.monotonic() - started < 3, what


def test_slow_clients_do_not_starve_others(by_address: Server) -> None:
    """50 slowloris connections send one header byte a second; others are served at once.

    gunicorn's gevent worker gives a request head ``keepalive`` seconds (5, in
    webchat.gunicorn_conf) to arrive, so the slow connections are also cut off.
    """
    slow: dict[socket.socket, float | None] = {}
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100
    try:
        for _ in range(50):
            sock = socket.create_connection(host_port(by_address.url), timeout=5)
            sock.setblocking(False)
            slow[sock] = None
        latencies: list[float] = []
        started = time.monotonic()
        with httpx.Client(base_url=by_address.url, timeout=10) as http:
            for second in range(8):
                for sock, closed in slow.items():  # one more byte on every slow connection
                    if closed is None:
                        try:
                            sock.send(head[second:second + 1])
                        except OSError:
                            slow[sock] = time.monotonic() - started
                for path in ("/healthz", "/"):
                    asked = time.monotonic()
                    response = http.get(path, headers={"Connection": "close"})
                    latencies.append(time.monotonic() - asked)
                    assert response.status_code == 200, path
                time.sleep(max(0.0, started + second + 1 - time.monotonic()))
        assert max(latencies) < 2.0, latencies
        assert statistics.median(latencies) < 0.5, latencies
        for sock, closed in slow.items():
            if closed is None:
                try:
                    sock.recv(1)  # an answer or the end: the server is done with it
                    slow[sock] = time.monotonic() - started
                except BlockingIOError:
                    pass
        cut = [at for at in slow.values() if at is not None]
        assert len(cut) == len(slow), f"{len(slow) - len(cut)} slow connections still held"
        assert min(cut) >= 3, "slow connections were dropped before the head timeout"
    finally:
        for sock in slow:
            sock.close()
