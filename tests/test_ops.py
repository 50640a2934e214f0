"""Operations: request ids, JSON logs, /metrics across workers, the client behind proxies."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from webchat import create_app, metrics
from webchat.config import ConfigError, load_config
from webchat.ops import JsonFormatter, RequestIdFilter

from .chat_client import ChatClient
from .conftest import Server, csrf_of

TOKEN = "metrics-token-0123456789"
LogLines = Callable[[], list[dict[str, Any]]]


def make_app(tmp_path: Path, **config: Any) -> Any:
    return create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                       "BACKEND": "demo", "DEMO_TOKENS_PER_SECOND": 5000.0, "COALESCE_MS": 1,
                       **config})


def sample(text: str, name: str) -> float:
    """Return the value of one sample (name with labels, as printed) in Prometheus text."""
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    """Capture what the webchat loggers write; call the result to get the JSON objects."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger("webchat")
    log.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    log.removeHandler(handler)


# Request ids and logs -------------------------------------------------------

def test_a_well_formed_request_id_is_kept_and_echoed(tmp_path: Path, log_lines: LogLines) -> None:
    client = make_app(tmp_path).test_client()
    response = client.get("/", headers={"X-Request-ID": "req-1234.abcd"})
    response.close()
    assert response.headers["X-Request-ID"] == "req-1234.abcd"
    [access] = [line for line in log_lines() if line["logger"] == "webchat.access"]
    assert access["request_id"] == "req-1234.abcd"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/", 200)
    assert access["level"] == "INFO" and access["duration_ms"] >= 0
    assert access["message"].startswith("GET / 200 ")


@pytest.mark.parametrize("incoming", [None, "", "x" * 200, "bad id", "a\u00e9b", "-leading"])
def test_a_missing_or_malformed_request_id_is_replaced(tmp_path: Path,
                                                       incoming: str | None) -> None:
    client = make_app(tmp_path).test_client()
    headers = {} if incoming is None else {"X-Request-ID": incoming}
    rid = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert client.get("/healthz").headers["X-Request-ID"] != rid


def test_log_lines_written_during_a_request_carry_its_id(tmp_path: Path,
                                                         log_lines: LogLines) -> None:
    app = make_app(tmp_path)

    @app.get("/_log")
    def log_something() -> str:
        logging.getLogger("webchat.test").warning("something %s", "happened", extra={"n": 3})
        return "ok"

    app.test_client().get("/_log", headers={"X-Request-ID": "abc-123"}).close()
    [line] = [line for line in log_lines() if line["logger"] == "webchat.test"]
    assert line == {"time": line["time"], "level": "WARNING", "logger": "webchat.test",
                    "message": "something happened", "request_id": "abc-123", "n": 3}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])


def test_exceptions_are_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("webchat", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed" and "ValueError: boom" in data["exception"]


# Metrics --------------------------------------------------------------------

def test_metrics_are_off_without_a_token(tmp_path: Path) -> None:
    assert make_app(tmp_path).test_client().get("/metrics").status_code == 404


def test_metrics_require_the_bearer_token(tmp_path: Path) -> None:
    client = make_app(tmp_path, METRICS_TOKEN=TOKEN).test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert wrong.status_code == 401
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert ok.mimetype == "text/plain" and "version=" in ok.headers["Content-Type"]
    assert "# TYPE webchat_first_token_seconds histogram" in ok.get_data(as_text=True)


def test_metrics_token_must_be_long() -> None:
    with pytest.raises(ConfigError, match="WEBCHAT_METRICS_TOKEN"):
        load_config({"WEBCHAT_METRICS_TOKEN": "short"})


def test_recorded_replies_show_in_the_metrics(tmp_path: Path) -> None:
    client = make_app(tmp_path, METRICS_TOKEN=TOKEN).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = client.get("/metrics", headers=auth).get_data(as_text=True)
    metrics.record_reply_started()
    metrics.record_reply_finished("complete", first_token_ms=420, prompt_tokens=12,
                                  completion_tokens=30)
    metrics.record_reply_started()
    metrics.record_upstream_error()
    metrics.record_reply_finished("error")
    after = client.get("/metrics", headers=auth).get_data(as_text=True)

    def delta(name: str) -> float:
        return sample(after, name) - sample(before, name)

    assert delta("webchat_replies_started_total") == 2
    assert delta('webchat_replies_finished_total{status="complete"}') == 1
    assert delta('webchat_replies_finished_total{status="error"}') == 1
    assert delta("webchat_replies_in_progress") == 0
    assert delta('webchat_first_token_seconds_bucket{le="0.5"}') == 1
    assert delta('webchat_first_token_seconds_bucket{le="0.25"}') == 0
    assert delta('webchat_tokens_total{kind="prompt"}') == 12
    assert delta('webchat_tokens_total{kind="completion"}') == 30
    assert delta("webchat_upstream_errors_total") == 1
    assert delta('webchat_http_responses_total{status="200"}') >= 1


# The client behind a proxy --------------------------------------------------

def test_behind_one_proxy_the_forwarded_scheme_and_address_are_used(
        tmp_path: Path, log_lines: LogLines) -> None:
    def post(app: Any) -> int:
        client = app.test_client()
        token = csrf_of(client.get("/").get_data(as_text=True))
        response = client.post("/chat", data={"text": "hi"}, headers={
            "HX-Request": "true", "X-CSRF-Token": token, "Origin": "https://chat.example.com",
            "X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example.com",
            "X-Forwarded-For": "203.0.113.9"})
        response.close()  # the access line is written when the response ends
        return int(response.status_code)

    # The browser says https://chat.example.com: only the proxy's headers make that true.
    assert post(make_app(tmp_path)) == 403
    assert post(make_app(tmp_path, PROXY_HOPS=1)) == 200
    clients = {line["client"] for line in log_lines()
               if line["logger"] == "webchat.access" and line["method"] == "POST"}
    assert "203.0.113.9" in clients


def test_proxy_hops_must_be_a_count() -> None:
    assert load_config({})["PROXY_HOPS"] == 0
    with pytest.raises(ConfigError, match="WEBCHAT_PROXY_HOPS"):
        load_config({"WEBCHAT_PROXY_HOPS": "-1"})


# Several gunicorn workers ---------------------------------------------------

@pytest.mark.e2e
def test_metrics_add_up_every_worker_and_logs_are_json_with_the_request_id(
        server_factory: Callable[..., Server]) -> None:
    server = server_factory(workers=2, env={"WEBCHAT_METRICS_TOKEN": TOKEN,
                                            "WEBCHAT_DEMO_TOKENS_PER_SECOND": "20"})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    chat = ChatClient(server.url)
    try:
        _cid, url = chat.send("Count me while I stream")
        opened = threading.Event()
        finished = threading.Event()

        def follow() -> None:
            for event in chat.iter_events(url, limit=60):
                if event.name == "snapshot":
                    opened.set()
            finished.set()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert opened.wait(15)
        seen = []
        for _ in range(8):  # fresh connections: they land on both workers
            with httpx.Client(base_url=server.url, timeout=5) as http:
                text = http.get("/metrics", headers=auth).text
            seen.append(sample(text, "webchat_active_streams"))
        assert all(value == 1 for value in seen), seen
        assert finished.wait(60)
        reader.join(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = httpx.get(server.url + "/metrics", headers=auth, timeout=5).text
            if sample(text, "webchat_active_streams") == 0:
                break
            time.sleep(0.1)
        assert sample(text, "webchat_active_streams") == 0
        assert sample(text, 'webchat_http_responses_total{status="200"}') >= 10

        rid = httpx.get(server.url + "/", headers={"X-Request-ID": "e2e-trace-42"}).headers[
            "X-Request-ID"]
        assert rid == "e2e-trace-42"
    finally:
        chat.close()
    deadline = time.monotonic() + 5
    while "e2e-trace-42" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    ours = [json.loads(line) for line in server.log_text().splitlines()
            if line.startswith('{"time"')]
    assert any(line.get("request_id") == "e2e-trace-42" and line["path"] == "/" for line in ours)
    assert any(line["message"].startswith("webchat ready") for line in ours)
