"""The Procfile runs unchanged under a Procfile runner (honcho), as on a PaaS."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .chat_client import ChatClient
from .conftest import ROOT, free_port

pytestmark = pytest.mark.e2e

TOKEN = "procfile-metrics-token-0123"


def honcho_command() -> list[str]:
    if shutil.which("honcho") is None:
        pytest.importorskip("honcho")
    return [sys.executable, "-m", "honcho", "start", "--no-colour"]


def platform_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment a platform gives the process: PORT and what the operator set."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("WEBCHAT_", "PROMETHEUS_")) and key not in (
               "SECRET_KEY", "DATABASE_URL", "PORT")}
    env.update({"PORT": str(port), "WEB_CONCURRENCY": "2",
                "DATABASE_URL": f"sqlite:///{tmp_path / 'webchat.sqlite3'}",
                "WEBCHAT_BACKEND": "demo", "WEBCHAT_DEMO_TOKENS_PER_SECOND": "100",
                "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.fixture
def honcho(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test; each is stopped with SIGTERM (then killed) at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_procfile_serves_and_streams_under_honcho(
        tmp_path: Path, honcho: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    log = tmp_path / "honcho.log"
    env = platform_env(tmp_path, port, SECRET_KEY="procfile-secret-key-0123456789",
                       WEBCHAT_METRICS_TOKEN=TOKEN)
    process = subprocess.Popen(honcho_command(), cwd=ROOT, env=env, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    honcho.append(process)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 40
    while True:
        assert process.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        try:
            if httpx.get(url + "/healthz", timeout=1).json() == {"status": "ok"}:
                break
        except httpx.HTTPError:
            time.sleep(0.2)

    chat = ChatClient(url)
    try:
        _cid, stream = chat.send("Hello from the platform")
        events = chat.events(stream, limit=60)
    finally:
        chat.close()
    assert events[0].name == "snapshot" and events[-1].name == "done"
    assert 'data-status="complete"' in events[-1].data
    assert len(events) > 3, [event.name for event in events]  # it streamed, not one lump

    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert metrics.status_code == 200
    assert "webchat_active_streams" in metrics.text
    assert 'webchat_http_responses_total{status="200"}' in metrics.text
    assert httpx.get(url + "/metrics", timeout=5).status_code == 401

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) is not None
    output = log.read_text(errors="replace")
    assert f"Listening at: http://0.0.0.0:{port}" in output
    assert output.count("Booting worker") >= 2  # WEB_CONCURRENCY=2
    assert "webchat ready" in output


def test_procfile_without_secret_key_stops_and_says_why(
        tmp_path: Path, honcho: list[subprocess.Popen[bytes]]) -> None:
    process = subprocess.Popen(honcho_command(), cwd=ROOT, env=platform_env(tmp_path, free_port()),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    honcho.append(process)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"honcho kept running without SECRET_KEY:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert process.returncode != 0, text
    assert "SECRET_KEY is not set" in text
