"""Secrets: the SECRET_KEY, the API key and the metrics token never reach a page, an event,
a header, a log line or an error message, whatever the upstream answers.

A gunicorn server with distinctive secrets talks to an upstream that fails in every way
it can, several of them echoing the key back (as some providers and proxies do); the
app's own error paths are walked too. Then every byte the clients received and the
whole server log are searched for the secrets (and for long pieces of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from webchat import create_app
from webchat.config import ConfigError

from .chat_client import ChatClient
from .conftest import Server
from .security_support import openai_sse, upstream_env
from .upstream import Reply, Upstream

pytestmark = pytest.mark.e2e

SECRET_KEY = "flask-secret-Qz7Lr2Vx9Nw4Kp8Tj3"
# No "sk-" prefix: only redacting the configured key itself can hide it.
API_KEY = "Wm4Nc7Yb2Kd9Hf5Js1Qa8Ue6Go3"
METRICS_TOKEN = "metrics-token-Pf6Hd1Zs8Xc5Vb2"
SECRETS = {"SECRET_KEY": SECRET_KEY, "OPENAI_API_KEY": API_KEY,
           "WEBCHAT_METRICS_TOKEN": METRICS_TOKEN}


def pieces(secret: str, size: int = 12) -> list[str]:
    """The secret and every run of ``size`` characters of it (a leak may be cut short)."""
    return [secret] + [secret[i:i + size] for i in range(len(secret) - size + 1)]


def leaks(text: str) -> list[str]:
    found = []
    for name, secret in SECRETS.items():
        if any(piece in text for piece in pieces(secret)):
            found.append(name)
    return found


def upstream_failures() -> list[tuple[str, Reply]]:
    """What the upstream answers, one per message: each an error, many echoing the key."""
    key_json = json.dumps(API_KEY)[1:-1]
    echo = {"error": {"message": f"Incorrect API key provided: {API_KEY}. Check it.",
                      "type": "invalid_request_error", "code": "invalid_api_key"}}
    sse_error = (b"event: error\ndata: " + json.dumps(
        {"error": {"message": f"key {API_KEY} revoked"}}).encode() + b"\n\n")
    half = openai_sse(["partial ", "answer "])
    return [
        ("401 echoing the key", Reply.error(json.dumps(echo).encode(), 401)),
        ("403 echoing the bearer header", Reply.error(
            f'{{"error": "forbidden for Authorization: Bearer {API_KEY}"}}'.encode(), 403)),
        ("429 echoing the key", Reply.error(
            f'{{"error": {{"message": "rate limit for key {API_KEY}"}}}}'.encode(), 429,
            {"Content-Type": "application/json", "Retry-After": "120"})),
        ("500 dumping the request", Reply.error(
            f"Traceback: headers={{'authorization': 'Bearer {API_KEY}'}}".encode(), 500,
            {"Content-Type": "text/plain"})),
        ("502 html page", Reply.error(
            f"<html><title>Bad gateway {API_KEY}</title><body>{API_KEY}</body></html>".encode(),
            502, {"Content-Type": "text/html"})),
        ("400 unsupported parameter", Reply.error(
            f'{{"error": {{"message": "unsupported parameter for {API_KEY}"}}}}'.encode(), 400)),
        ("garbage stream", Reply(f"data: {{not json {API_KEY}\n\n".encode())),
        ("stream of nonsense lines", Reply(f"{API_KEY}\n\n\x00\xff\n".encode("latin-1"))),
        ("in-band error event", Reply(sse_error)),
        ("error chunk in a 200 json", Reply(
            json.dumps({"error": {"message": f"revoked: {key_json}"}}).encode(),
            headers={"Content-Type": "application/json"}, framing="length")),
        ("html instead of a stream", Reply(f"<p>{API_KEY}</p>".encode(),
                                           headers={"Content-Type": "text/html"})),
        ("cut off mid-stream", Reply(half, abort_at=len(half) // 2)),
        ("404 unknown model", Reply.error(
            f'{{"error": {{"message": "model not found (key {API_KEY})"}}}}'.encode(), 404)),
    ]


@pytest.fixture(scope="module")
def failing() -> Any:
    with Upstream() as up:
        yield up


@pytest.fixture(scope="module")
def server(failing: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from .conftest import start_server
    server = start_server(tmp_path_factory.mktemp("secrets"), workers=2, env={
        **upstream_env(failing), "SECRET_KEY": SECRET_KEY, "OPENAI_API_KEY": API_KEY,
        "WEBCHAT_METRICS_TOKEN": METRICS_TOKEN, "WEBCHAT_LOG_LEVEL": "DEBUG",
        "WEBCHAT_MESSAGES_PER_MINUTE": "100", "WEBCHAT_FIRST_TOKEN_TIMEOUT": "5",
    })
    yield server
    server.stop()


def everything(response: httpx.Response) -> str:
    """A response as a client sees it: status line, headers and body."""
    head = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    return f"{response.status_code}\n{head}\n{response.text}"


def test_upstream_failures_never_show_the_secrets(server: Server, failing: Upstream) -> None:
    failures = upstream_failures()
    failing.next(*(reply for _, reply in failures))
    client = ChatClient(server.url)
    seen: list[tuple[str, str]] = []
    try:
        for what, _ in failures:
            _, url = client.send(f"trigger: {what}")
            events = client.events(url, limit=30)
            assert events[-1].name in ("error", "done"), (what, [e.name for e in events])
            seen.append((what, "\n".join(f"{e.name} {e.id} {e.data}" for e in events)))
            # The failure is explained in the bubble, without the key.
            assert 'role="alert"' in events[-1].data or events[-1].name == "done", what
            page = client.http.get(url.split("/m/")[0])
            seen.append((f"{what}: page", everything(page)))
            export = client.http.get(url.split("/m/")[0] + "/export.json")
            seen.append((f"{what}: export", everything(export)))
        seen.append(("index", everything(client.http.get("/"))))
        seen.append(("search", everything(client.http.get("/search?q=key"))))
    finally:
        client.close()
    # The key was in use: the upstream got it on every request.
    assert failing.wait_request(len(failures) - 1)
    assert all(r.headers.get("authorization") == f"Bearer {API_KEY}" for r in failing.requests)
    for what, text in seen:
        assert not leaks(text), f"{what} shows {leaks(text)}: {text[:500]}"


def test_error_pages_and_odd_requests_never_show_the_secrets(server: Server) -> None:
    client = ChatClient(server.url)
    seen: list[tuple[str, httpx.Response]] = []
    try:
        client.open()
        http = client.http
        seen += [
            ("404", http.get("/c/" + "A" * 22)),
            ("404 malformed", http.get("/nope")),
            ("405", http.get("/chat")),
            ("403 no token", http.post("/chat", data={"text": "x"})),
            ("403 wrong token", http.post("/chat", data={"text": "x", "csrf_token": SECRET_KEY})),
            ("403 cross-site", http.post("/chat", data={"text": "x", "csrf_token": client.csrf},
                                         headers={"Origin": "https://evil.example"})),
            ("413", client.post("/chat", {"text": "x" * 40_000})),
            ("400 last-event-id", http.get("/c/AAAAAAAAAAAAAAAAAAAAAA/m/AAAAAAAAAAAAAAAAAAAAAA"
                                           "/stream", headers={"Last-Event-ID": "x"})),
            ("metrics without token", http.get("/metrics")),
            ("metrics wrong token", http.get("/metrics", headers={
                "Authorization": f"Bearer {METRICS_TOKEN[:-1]}"})),
            ("metrics", http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})),
            ("healthz", http.get("/healthz")),
            ("static", http.get("/static/app.js")),
            ("traversal", http.get("/static/..%2F..%2Fwebchat%2F__init__.py")),
            ("instance", http.get("/instance/secret_key")),
        ]
        # A session cookie signed with another key, and one that was tampered with.
        forged = httpx.Client(base_url=server.url, cookies={"session": "eyJzaWQiOiJ4In0.x.y"})
        seen.append(("forged cookie", forged.get("/")))
        forged.close()
    finally:
        client.close()
    metrics = dict(seen)["metrics"]
    assert metrics.status_code == 200 and "webchat" in metrics.text, "the control: metrics work"
    for what, response in seen:
        text = everything(response)
        found = [name for name in leaks(text) if not (
            name == "WEBCHAT_METRICS_TOKEN" and what.startswith("metrics"))]
        # (A metrics page may not even echo its own token: checked below.)
        assert not found, f"{what} shows {found}"
        if what.startswith("metrics"):
            assert METRICS_TOKEN not in text, what
        assert "Traceback" not in text, what


def test_the_log_never_holds_the_secrets(server: Server) -> None:
    """Runs after the tests above: everything they caused is in the log by now."""
    log = server.log_text()
    assert log.count("POST /chat") >= len(upstream_failures()), "the log is not the one used"
    found = leaks(log)
    assert not found, [line[:300] for line in log.splitlines()
                       if any(p in line for n in found for p in pieces(SECRETS[n]))][:5]


def test_configuration_errors_do_not_echo_secrets(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    short = "tooShort-9"
    monkeypatch.setenv("SECRET_KEY", short)
    with pytest.raises(ConfigError) as error:
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}", "BACKEND": "demo"})
    assert short not in str(error.value) and "SECRET_KEY" in str(error.value)
