"""webchat in front of an OpenAI-compatible upstream: recorded streams, errors, stop."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from .chat_client import ChatClient
from .conftest import screenshot, share
from .upstream import Reply, Upstream, fixture_bytes, fixture_reply

pytestmark = pytest.mark.e2e


def upstream_env(up: Upstream, **extra: str) -> dict[str, str]:
    return {"WEBCHAT_BACKEND": "openai", "OPENAI_BASE_URL": up.url, "OPENAI_API_KEY": "sk-test",
            "WEBCHAT_MODELS": "test-model", **extra}


def expected_from_fixture(name: str) -> tuple[str, str]:
    """Return the (content, reasoning) a fixture's chunks add up to, by plain JSON parsing."""
    content, reasoning = "", ""
    for line in fixture_bytes(name).decode().splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        chunk = json.loads(line[5:])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
    return content, reasoning


def send(page: Any, text: str) -> None:
    page.wait_for_load_state("domcontentloaded")
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def test_a_reasoning_model_shows_thinking_then_the_answer(server_factory: Any, page: Any) -> None:
    name = "deepseek_reasoner_reasoning_content.sse"
    with Upstream() as up:
        up.next(fixture_reply(name, split="random", delay=0.005))
        server = server_factory(env=upstream_env(up))
        page.goto(server.url + "/")
        send(page, "9.11 and 9.8, which is greater?")
        done = page.locator(".msg.assistant[data-status=complete]")
        done.wait_for(timeout=30_000)
        content, reasoning = expected_from_fixture(name)
        assert done.locator(".think-text").text_content() == reasoning
        thinking = done.locator("details.thinking")
        assert thinking.is_visible()
        thinking.locator("summary").click()
        assert done.locator(".think-text").is_visible()
        assert "😊" in content and "😊" in done.locator(".body").text_content()
        meta = done.locator(".meta").text_content()
        assert "tokens" in meta
        assert up.wait_request(0).json["stream"] is True
        screenshot(page, "reasoning")


def test_an_error_mid_stream_keeps_the_text_that_arrived(server_factory: Any, page: Any) -> None:
    with Upstream() as up:
        up.next(fixture_reply("groq_gpt-oss-120b_midstream_error.sse", split=40, delay=0.01))
        server = server_factory(env=upstream_env(up))
        page.goto(server.url + "/")
        send(page, "trigger the error")
        failed = page.locator(".msg.assistant[data-status=error]")
        failed.wait_for(timeout=30_000)
        assert failed.locator(".error").is_visible()
        assert failed.locator(".error").text_content().strip()
        assert failed.get_by_role("button", name="Regenerate this reply").is_visible()


def test_a_bad_key_is_explained_in_the_chat(server_factory: Any, page: Any) -> None:
    with Upstream() as up:
        up.next(Reply.error("openai_401.json", 401))
        server = server_factory(env=upstream_env(up))
        page.goto(server.url + "/")
        send(page, "hello?")
        failed = page.locator(".msg.assistant[data-status=error]")
        failed.wait_for(timeout=30_000)
        message = failed.locator(".error").text_content()
        assert "401" in message and "sk-test" not in message
        assert "sk-test" not in page.content()


def test_stop_cancels_the_upstream_request_within_a_second(server_factory: Any,
                                                           page: Any) -> None:
    with Upstream() as up:
        up.next(Reply.generated(tokens=400, rate=20))
        server = server_factory(env=upstream_env(up))
        page.goto(server.url + "/")
        send(page, "count slowly")
        reply = page.locator(".msg.assistant")
        reply.locator(".tail p").first.wait_for(timeout=15_000)
        received = up.wait_request(0)
        clicked = time.monotonic()
        reply.get_by_role("button", name="Stop generating").click()
        assert received.disconnected.wait(2), "the upstream never saw the client leave"
        assert received.disconnected_at - clicked < 1.0
        page.locator(".msg.assistant[data-status=stopped]").wait_for(timeout=5_000)


def test_stop_from_another_instance_cancels_the_upstream(server_factory: Any,
                                                         tmp_path: Path) -> None:
    with Upstream() as up:
        up.next(Reply.generated(tokens=400, rate=20))
        first = server_factory(env=upstream_env(up))
        (tmp_path / "b").mkdir()
        second = share(first, tmp_path / "b", env=upstream_env(up))
        a, b = ChatClient(first.url), ChatClient(second.url)
        try:
            _, url = a.send("stop me elsewhere")
            a.events(url, stop_after=3)  # instance A runs the reply
            b.http.cookies = a.http.cookies
            b.open()
            received = up.wait_request(0)
            asked = time.monotonic()
            assert b.post(url.removesuffix("/stream") + "/stop").status_code == 200
            assert received.disconnected.wait(3)
            assert received.disconnected_at - asked < 1.0
            final = b.events(url)
            assert final[-1].name == "done" and 'data-status="stopped"' in final[-1].data
        finally:
            a.close()
            b.close()
            second.stop()


@pytest.mark.slow
def test_a_long_silence_survives_a_proxy_that_drops_idle_connections(server_factory: Any,
                                                                     tmp_path: Path) -> None:
    from .nginx import Nginx
    # The model thinks silently for 70 s; the proxy drops a connection idle for 55 s.
    body = fixture_bytes("openai_gpt-4o-mini_text_usage.sse")
    first_event = body.index(b"\n\n") + 2
    with Upstream() as up:
        up.next(Reply(body, stall_at=first_event, stall=70.0))
        server = server_factory(env=upstream_env(up, WEBCHAT_FIRST_TOKEN_TIMEOUT="120"))
        nginx = Nginx(tmp_path / "nginx", int(server.url.rsplit(":", 1)[1]),
                      location_extra="proxy_read_timeout 55s;")
        client = ChatClient(nginx.url)
        try:
            _, url = client.send("think for a long time")
            started = time.monotonic()
            events = client.events(url, limit=120)
            assert time.monotonic() - started > 65
            assert events[-1].name == "done", [e.name for e in events]
            assert 'data-status="complete"' in events[-1].data
        finally:
            client.close()
            nginx.stop()


def test_a_real_openai_compatible_server_streams_through_webchat(
        server_factory: Any, tmp_path: Path) -> None:
    """llama-cpp-python's own OpenAI-compatible server, serving a tiny model made here."""
    import subprocess
    import sys

    import httpx
    pytest.importorskip("llama_cpp.server")
    from .conftest import free_port
    from .tinymodel import make_tiny_model
    model = make_tiny_model(tmp_path / "tiny.gguf", eos_logit=-30.0)
    port = free_port()
    log = (tmp_path / "llama-server.log").open("wb")
    llama = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--model_alias", "tiny", "--interrupt_requests", "False",
         "--n_ctx", "512"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("llama_cpp.server did not start")
        server = server_factory(env={"WEBCHAT_BACKEND": "openai",
                                     "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
                                     "WEBCHAT_MODELS": "tiny"})
        client = ChatClient(server.url)
        try:
            _, url = client.send("hello")
            events = client.events(url, limit=60, stop_after=8)
            assert [e.name for e in events][:1] == ["snapshot"]
            assert any(e.name in ("delta", "text") for e in events)
            assert client.post(url.removesuffix("/stream") + "/stop").status_code == 200
            final = client.events(url, limit=30)
            assert final[-1].name == "done"
            assert 'data-status="stopped"' in final[-1].data
            # A second turn works after the stop (the server was left in a good state).
            cid = url.split("/")[2]
            _, url2 = client.send("again", conversation=cid)
            events2 = client.events(url2, limit=60, stop_after=6)
            assert any(e.name in ("delta", "text") for e in events2)
        finally:
            client.close()
    finally:
        llama.send_signal(signal.SIGTERM)
        try:
            llama.wait(timeout=10)
        except subprocess.TimeoutExpired:
            llama.kill()
        log.close()


def test_the_model_picker_chooses_the_model_per_conversation(server_factory: Any,
                                                             page: Any) -> None:
    with Upstream() as up:
        up.next(fixture_reply("mistral_tiny_text_usage.sse"),
                fixture_reply("openai_gpt-4o-mini_text_usage.sse"))
        server = server_factory(env={**upstream_env(up), "WEBCHAT_MODELS": "fast,smart"})
        page.goto(server.url + "/")
        picker = page.get_by_label("Model", exact=True).first
        assert picker.locator("option").all_text_contents() == ["fast", "smart"]
        picker.select_option("smart")
        send(page, "use the smart one")
        page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=30_000)
        assert up.wait_request(0).json["model"] == "smart"
        page.reload()
        assert page.get_by_label("Model", exact=True).first.input_value() == "smart"
        send(page, "and again")
        page.locator(".msg.assistant[data-status=complete]").nth(1).wait_for(timeout=30_000)
        assert up.wait_request(1).json["model"] == "smart"
