"""The OpenAI-compatible backend against recorded provider streams served over real HTTP.

Every test talks to a local server on 127.0.0.1 (``tests/upstream.py``); none needs the
internet. Expected values are computed from the fixture files with ``json`` directly, not
through the backend's own parsing.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math
import random
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from webchat.backends.base import BackendError, ChatMessage, Delta, Settings
from webchat.backends.openai import OpenAIBackend, OpenAIConfig

from .upstream import (
    Reply,
    Upstream,
    event_offsets,
    fixture_bytes,
    fixture_reply,
    fixtures_dir,
    generated_text,
    utf8_cuts,
)

REPO = Path(__file__).resolve().parents[1]
SSE_FIXTURES = sorted(p.name for p in fixtures_dir().glob("*.sse"))
API_KEY = "sk-test-DO-NOT-LEAK-0123456789"
MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hello")]
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


@pytest.fixture
def up() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


def backend(base_url: str, **overrides: Any) -> OpenAIBackend:
    """Build a backend with small timeouts, so failures show up in well under a second."""
    options: dict[str, Any] = {
        "connect_timeout": 1.0,
        "first_token_timeout": 2.0,
        "read_timeout": 2.0,
        "total_timeout": 10.0,
        "retry_backoff": 0.05,
    }
    client = overrides.pop("client", None)
    options.update(overrides)
    return OpenAIBackend(
        OpenAIConfig(base_url=base_url, api_key=API_KEY, models=["test-model"], **options),
        client=client,
    )


@dataclass
class Seen:
    """What a user ends up with after consuming a stream."""

    text: str = ""
    reasoning: str = ""
    usage: dict[str, int] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    error: BackendError | None = None
    deltas: int = 0


def consume(deltas: Iterator[Delta], *, pause: float = 0.0) -> Seen:
    seen = Seen()
    try:
        for delta in deltas:
            seen.deltas += 1
            seen.text += delta.text
            seen.reasoning += delta.reasoning
            seen.usage = delta.usage or seen.usage
            if delta.finish_reason:
                seen.finish_reasons.append(delta.finish_reason)
            if delta.model:
                seen.models.append(delta.model)
            time.sleep(pause)
    except BackendError as exc:
        seen.error = exc
    return seen


@dataclass
class Expected:
    text: str = ""
    reasoning: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    model: str | None = None
    error: str | None = None


def expected_from(body: bytes) -> Expected:
    """Read a recorded stream line by line with plain json: what a user should see."""
    out = Expected()
    event_name = ""
    for line in body.decode("utf-8").split("\n"):
        if line == "":
            event_name = ""
        elif line.startswith("event:"):
            event_name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if event_name == "error":
                out.error = chunk["error"]["message"]
                break
            out.model = out.model or chunk.get("model") or None
            usage = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
            out.usage = usage or out.usage
            for choice in chunk["choices"][:1]:
                delta = choice.get("delta") or {}
                out.text += delta.get("content") or ""
                out.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if "error" in chunk:
                out.error = chunk["error"]["message"]
                break
    return out


def awkward_cuts(body: bytes, seed: str) -> list[int]:
    """Cut inside every multi-byte character, inside every line, and at random."""
    rng = random.Random(seed)
    cuts = set(utf8_cuts(body))
    cuts.update(start + 7 for start in [0, *event_offsets(body)])  # inside "data: {"
    cuts.update(rng.sample(range(1, len(body)), min(len(body) - 1, len(body) // 40)))
    return sorted(c for c in cuts if 0 < c < len(body))


def test_every_fixture_is_exercised() -> None:
    names = {p.name for p in fixtures_dir().iterdir() if p.suffix in (".sse", ".json")}
    error_bodies = {"openai_401.json", "openai_404.json", "openrouter_429.json", "azure_404.json"}
    assert len(SSE_FIXTURES) >= 11
    assert names == set(SSE_FIXTURES) | error_bodies


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_recorded_stream_reaches_the_user_intact(up: Upstream, name: str) -> None:
    body = fixture_bytes(name)
    expected = expected_from(body)
    up.next(Reply(body=body, split=awkward_cuts(body, name)))

    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.text == expected.text
    assert seen.reasoning == expected.reasoning
    assert seen.models == [m for m in [expected.model] if m]  # reported once, if at all
    if expected.usage:
        assert seen.usage is not None
        assert {k: seen.usage[k] for k in USAGE_KEYS} == {k: expected.usage[k] for k in USAGE_KEYS}
    else:
        assert seen.usage is None
    assert (seen.finish_reasons[-1] if seen.finish_reasons else None) == expected.finish_reason
    if expected.error:
        assert seen.error is not None
        assert expected.error in seen.error.message
    else:
        assert seen.error is None


def test_fixture_expectations_match_what_sources_md_promises() -> None:
    # Guards the independent parser above against silently reading nothing.
    def get(name: str) -> Expected:
        return expected_from(fixture_bytes(name))

    assert get("openai_gpt-4o-mini_text_usage.sse").text == "The capital of the UK is London."
    assert "😄" in get("azure_gpt-4.1-mini_text_content_filter.sse").text
    deepseek = get("deepseek_reasoner_reasoning_content.sse")
    assert "😊" in deepseek.text and deepseek.reasoning.startswith("Hmm")
    ollama = get("ollama_nemotron-3-nano_reasoning_usage.sse")
    assert ollama.text == "51" and ollama.reasoning.startswith("We need to answer")
    assert get("openrouter_minimax-m2_keepalive_length_error.sse").error == "Token limit reached"
    assert str(get("groq_gpt-oss-120b_midstream_error.sse").error).startswith("Tool call valid")
    assert get("groq_gpt-oss-120b_tool_call_x_groq.sse").finish_reason == "tool_calls"


def test_upstream_replays_bytes_exactly_with_the_requested_cuts(up: Upstream) -> None:
    name = "deepseek_reasoner_reasoning_content.sse"
    body = fixture_bytes(name)
    cuts = awkward_cuts(body, name)
    up.next(Reply(body=body, split=cuts))
    with httpx.stream("POST", f"{up.url}/chat/completions", json={}, timeout=2) as response:
        pieces = list(response.iter_raw())
    assert b"".join(pieces) == body
    # Chunked framing keeps every cut visible to the client (TCP may add a few more).
    boundaries = set(itertools.accumulate(len(piece) for piece in pieces))
    assert set(cuts) <= boundaries


def test_request_carries_model_messages_settings_and_bearer_key(up: Upstream) -> None:
    up.next(fixture_reply("vllm_crusoe_llama-3.3-70b_text_usage.sse"))
    settings = Settings(model="picked-model", temperature=0.3, max_tokens=50)
    consume(backend(up.url, extra_headers={"X-Title": "webchat"}).stream(MESSAGES, settings))

    request = up.wait_request(0)
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["x-title"] == "webchat"
    assert request.json == {
        "model": "picked-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.3,
        "max_tokens": 50,
    }


def test_default_model_is_the_first_configured(up: Upstream) -> None:
    up.next(fixture_reply("mistral_tiny_text_usage.sse"))
    chat = backend(up.url)
    consume(chat.stream(MESSAGES, Settings()))
    assert chat.models() == ["test-model"]
    assert up.wait_request(0).json["model"] == "test-model"


def test_azure_deployment_url_keeps_api_version_and_sends_api_key_header(up: Upstream) -> None:
    # The client uses the local server as an HTTP proxy, so the Azure host name is kept
    # in the request line without any DNS lookup.
    client = httpx.Client(proxy=up.base)
    base = "http://res.openai.azure.com/openai/deployments/dep?api-version=2024-02-01"
    up.next(fixture_reply("azure_gpt-4.1-mini_text_content_filter.sse"))
    up.next(Reply.error("azure_404.json", 404, headers={}))
    chat = backend(base, client=client)

    seen = consume(chat.stream(MESSAGES, Settings()))
    failed = consume(chat.stream(MESSAGES, Settings()))

    request = up.wait_request(0)
    assert request.path == (
        "http://res.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-02-01"
    )
    assert request.headers["api-key"] == API_KEY
    assert "authorization" not in request.headers
    assert seen.text.startswith("Sure!") and seen.error is None
    assert failed.error is not None and failed.error.status == 404
    assert "The API deployment for this resource does not exist" in failed.error.message
    assert "res.openai.azure.com" in failed.error.message


def test_bad_key_401_says_so_without_leaking_any_key(up: Upstream) -> None:
    up.next(Reply.error("openai_401.json", 401))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.error is not None and seen.error.status == 401
    assert "rejected the API key (401)" in seen.error.message
    assert "Incorrect API key provided" in seen.error.message
    assert API_KEY not in seen.error.message and "sk-svcac" not in seen.error.message
    assert len(up.requests) == 1  # not retried


def test_provider_echoing_our_key_is_redacted(up: Upstream) -> None:
    body = json.dumps({"error": {"message": f"Key {API_KEY} is not allowed here"}}).encode()
    up.next(Reply.error(body, 403))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is not None and "(403)" in seen.error.message
    assert API_KEY not in seen.error.message and "[redacted key]" in seen.error.message


def test_unknown_model_404_includes_provider_message(up: Upstream) -> None:
    up.next(Reply.error("openai_404.json", 404))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is not None and seen.error.status == 404
    assert "The model `gpt-5.2-proo` does not exist" in seen.error.message
    assert "127.0.0.1" in seen.error.message


def test_rate_limit_with_long_retry_after_is_reported_not_retried(up: Upstream) -> None:
    up.next(Reply.error("openrouter_429.json", 429, {"Retry-After": "30"}))
    started = time.monotonic()
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert time.monotonic() - started < 1.0
    assert seen.error is not None and seen.error.status == 429
    assert seen.error.retry_after == 30
    assert "rate limiting" in seen.error.message and "30 s" in seen.error.message
    assert "temporarily rate-limited upstream" in seen.error.message  # OpenRouter's raw text
    assert len(up.requests) == 1


def test_rate_limit_with_short_retry_after_waits_then_succeeds(up: Upstream) -> None:
    up.next(Reply.error("openrouter_429.json", 429, {"Retry-After": "1"}))
    up.next(fixture_reply("openai_gpt-4o-mini_text_usage.sse"))
    started = time.monotonic()
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.error is None and seen.text == "The capital of the UK is London."
    assert up.wait_request(1).started_at - up.wait_request(0).started_at >= 0.95
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("kind", ["http-date", "milliseconds"])
def test_retry_after_as_http_date_or_milliseconds(up: Upstream, kind: str) -> None:
    if kind == "http-date":
        headers = {"Retry-After": email.utils.formatdate(time.time() + 20, usegmt=True)}
    else:
        headers = {"retry-after-ms": "20000"}
    up.next(Reply.error(b'{"error": {"message": "slow down"}}', 429, headers))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is not None and seen.error.retry_after is not None
    assert 18 <= seen.error.retry_after <= 20
    assert len(up.requests) == 1


def test_server_errors_are_retried_before_the_first_token(up: Upstream) -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    up.next(Reply.error(html, 502, {"Content-Type": "text/html"}))
    up.next(Reply.error(b'{"error": {"message": "overloaded"}}', 503))
    up.next(fixture_reply("openai_gpt-4o-mini_text_usage.sse", split=11))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.error is None and seen.text == "The capital of the UK is London."
    assert len(up.requests) == 3


def test_server_errors_give_up_after_max_retries_with_a_readable_message(up: Upstream) -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    for _ in range(3):
        up.next(Reply.error(html, 502, {"Content-Type": "text/html"}))
    seen = consume(backend(up.url, max_retries=2).stream(MESSAGES, Settings()))

    assert seen.error is not None and seen.error.status == 502
    assert "failed (502)" in seen.error.message and "502 Bad Gateway" in seen.error.message
    assert "<" not in seen.error.message
    assert len(up.requests) == 3


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"error": "model is required"}', "model is required"),
        (b'{"message": "Invalid model name"}', "Invalid model name"),
        (b'{"detail": "Not authenticated"}', "Not authenticated"),
        (b'{"detail": [{"loc": ["body"], "msg": "field required"}]}', "field required"),
        (b'{"error": {"code": "400", "message": "Bad deployment"}}', "Bad deployment"),
        (b'[{"error": {"code": 400, "message": "Gemini says no"}}]', "Gemini says no"),
        (b"upstream connect error or disconnect/reset before headers", "upstream connect"),
    ],
)
def test_error_bodies_of_every_shape_show_the_provider_message(
    up: Upstream, body: bytes, said: str
) -> None:
    up.next(Reply.error(body, 400))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is not None and seen.error.status == 400
    assert said in seen.error.message


def test_rejected_stream_options_are_dropped_once(up: Upstream) -> None:
    rejected = b'{"error": {"message": "Unrecognized request argument supplied: stream_options"}}'
    up.next(Reply.error(rejected, 400))
    up.next(fixture_reply("llamacpp_b6224_qwen2.5-1.5b_text_timings.sse"))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.error is None and seen.text.startswith("Hello!")
    assert "stream_options" in up.wait_request(0).json
    assert "stream_options" not in up.wait_request(1).json


def test_max_tokens_becomes_max_completion_tokens_when_asked(up: Upstream) -> None:
    rejected = json.dumps(
        {
            "error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                "model. Use 'max_completion_tokens' instead.",
                "param": "max_tokens",
            }
        }
    ).encode()
    up.next(Reply.error(rejected, 400), fixture_reply("openai_gpt-4o-mini_text_usage.sse"))
    seen = consume(backend(up.url).stream(MESSAGES, Settings(max_tokens=64)))

    assert seen.error is None
    retried = up.wait_request(1).json
    assert "max_tokens" not in retried and retried["max_completion_tokens"] == 64


def test_connection_refused_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    seen = consume(backend(f"http://127.0.0.1:{port}/v1").stream(MESSAGES, Settings()))
    assert time.monotonic() - started < 1.0
    assert seen.error is not None
    assert f"127.0.0.1:{port}" in seen.error.message and "refused" in seen.error.message


def test_unresolvable_invalid_host_fails_fast_offline() -> None:
    started = time.monotonic()
    seen = consume(backend("https://no-such-provider.invalid/v1").stream(MESSAGES, Settings()))
    assert time.monotonic() - started < 0.5
    assert seen.error is not None
    assert "Could not resolve" in seen.error.message
    assert "no-such-provider.invalid" in seen.error.message


def test_dns_failure_from_the_resolver_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    seen = consume(backend("https://llm.example.test/v1").stream(MESSAGES, Settings()))
    assert seen.error is not None
    assert "Could not resolve the model provider's host name (llm.example.test)" in (
        seen.error.message
    )


def test_tls_failure_is_reported_as_tls(up: Upstream) -> None:
    # The local server speaks plain HTTP, so the TLS handshake cannot succeed.
    seen = consume(backend(f"https://127.0.0.1:{up.port}/v1").stream(MESSAGES, Settings()))
    assert seen.error is not None
    assert "TLS connection" in seen.error.message


def test_hang_before_headers_times_out_and_hangs_up(up: Upstream) -> None:
    up.next(Reply(hang=math.inf))
    started = time.monotonic()
    seen = consume(backend(up.url, first_token_timeout=0.5).stream(MESSAGES, Settings()))

    assert 0.4 < time.monotonic() - started < 3.0  # generous: the machine may be busy
    assert seen.error is not None and "sent no reply within 0.5 s" in seen.error.message
    assert up.wait_request(0).disconnected.wait(1.0)


def test_keepalive_comments_do_not_count_as_a_first_token(up: Upstream) -> None:
    # OpenRouter-style ": PROCESSING" comments forever, never any data.
    up.next(Reply(body=b": OPENROUTER PROCESSING\n\n" * 200, split="events", delay=0.05))
    started = time.monotonic()
    seen = consume(backend(up.url, first_token_timeout=0.6).stream(MESSAGES, Settings()))

    assert 0.5 < time.monotonic() - started < 3.0  # generous: the machine may be busy
    assert seen.error is not None and "sent no reply within 0.6 s" in seen.error.message
    assert up.wait_request(0).disconnected.wait(1.0)


def test_stall_mid_stream_keeps_the_text_before_it(up: Upstream) -> None:
    name = "openai_gpt-4o-mini_text_usage.sse"
    body = fixture_bytes(name)
    stall_at = event_offsets(body)[5]
    up.next(fixture_reply(name, split="events", stall_at=stall_at, stall=math.inf))
    started = time.monotonic()
    chat = backend(up.url, first_token_timeout=5.0, read_timeout=0.5)
    seen = consume(chat.stream(MESSAGES, Settings()))

    assert 0.4 < time.monotonic() - started < 3.0  # generous: the machine may be busy
    assert seen.text == expected_from(body[:stall_at]).text == "The capital of the UK"
    assert seen.error is not None and "stopped sending for 0.5 s" in seen.error.message
    assert up.wait_request(0).disconnected.wait(1.0)


def test_slow_consumer_is_not_mistaken_for_a_stalled_server(up: Upstream) -> None:
    up.next(fixture_reply("vllm_crusoe_llama-3.3-70b_text_usage.sse", split="events"))
    chat = backend(up.url, first_token_timeout=0.3, read_timeout=0.3)
    seen = consume(chat.stream(MESSAGES, Settings()), pause=0.05)  # 14 deltas ~ 0.7 s
    assert seen.error is None and seen.text == "1, 2, 3, 4, 5"


def test_total_timeout_cuts_a_slow_reply_off(up: Upstream) -> None:
    up.next(Reply.generated(tokens=100, rate=20))
    started = time.monotonic()
    seen = consume(backend(up.url, total_timeout=0.8).stream(MESSAGES, Settings()))

    assert time.monotonic() - started < 3.0  # generous: the machine may be busy
    assert seen.error is not None and "longer than 0.8 s" in seen.error.message
    assert seen.text and generated_text(100).startswith(seen.text)


def test_malformed_chunk_raises_after_the_text_before_it(up: Upstream) -> None:
    body = fixture_bytes("openai_gpt-4o-mini_text_usage.sse")
    cut = event_offsets(body)[3]
    broken = b'data: {"choices": [{"delta": {"content": "x"\n\n'
    up.next(Reply(body=body[:cut] + broken + body[cut:]))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.text == expected_from(body[:cut]).text == "The capital of"
    assert seen.error is not None and "malformed" in seen.error.message


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_stream_without_done_ends_normally(up: Upstream, framing: Any) -> None:
    body = fixture_bytes("openai_gpt-4o-mini_text_usage.sse").replace(b"data: [DONE]\n\n", b"")
    up.next(Reply(body=body, framing=framing, split=13))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is None
    assert seen.text == "The capital of the UK is London."
    assert seen.usage is not None and seen.usage["total_tokens"] == 87


def test_connection_dropped_mid_reply_is_an_error_after_the_text(up: Upstream) -> None:
    body = fixture_bytes("mistral_tiny_text_usage.sse")
    cut = event_offsets(body)[10]
    up.next(Reply(body=body, split="events", abort_at=cut))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.text == expected_from(body[:cut]).text
    assert seen.text
    assert seen.error is not None and "lost before the reply finished" in seen.error.message


def test_connection_dropped_after_the_finish_reason_is_not_an_error(up: Upstream) -> None:
    body = fixture_bytes("mistral_tiny_text_usage.sse")
    up.next(Reply(body=body, split="events", abort_at=body.index(b"data: [DONE]")))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is None and seen.finish_reasons == ["stop"]


def test_unusual_but_valid_stream_shapes(up: Upstream) -> None:
    lines = [
        "retry: 3000",
        "id: 1",
        ": a comment",
        'data:{"model":"odd","choices":[{"index":0}]}',  # no space after the colon, no delta
        "",
        'data: {"object":"chat.completion.chunk"}',  # no choices at all
        "",
        'data: {"choices":[{"delta":{"reasoning_details":[{"type":"reasoning.summary",'
        '"summary":"Plan. "},{"type":"reasoning.encrypted","data":"xyz"}]}}]}',
        "",
        'data: {"choices":[{"delta":{"content":[{"type":"thinking","thinking":'
        '[{"type":"text","text":"Think."}]},{"type":"text","text":"Grüße"}]}}]}',
        "",
        'data: {"choices":[{"delta":{"content":" und"},',  # one JSON value on two data lines
        'data:  "finish_reason":null, "future_field":{"x":1}}]}',
        "",
        'data: {"choices":[{"delta":{},"finish_reason":"content_filter"}]}',
        "",
        "data: [DONE]",
        "",
        "",
    ]
    body = "\r\n".join(lines).encode()  # CRLF line endings are valid SSE
    up.next(Reply(body=body, split=[*utf8_cuts(body), body.index(b"\r\n") + 1]))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))

    assert seen.error is None
    assert seen.models == ["odd"]
    assert seen.reasoning == "Plan. Think."
    assert seen.text == "Grüße und"
    assert seen.finish_reasons == ["content_filter"]


def test_inband_error_event_with_plain_text_data(up: Upstream) -> None:
    first = fixture_bytes("llamacpp_b6224_qwen2.5-1.5b_text_timings.sse")
    head = first[: event_offsets(first)[3]]
    up.next(Reply(body=head + b"event: error\ndata: upstream overloaded\n\n"))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.text == "Hello! It"
    assert seen.error is not None and "upstream overloaded" in seen.error.message


def test_non_streaming_json_reply_is_accepted(up: Upstream) -> None:
    reply = {
        "model": "plain-json",
        "choices": [{"message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    up.next(Reply.error(json.dumps(reply).encode(), 200))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is None and seen.text == "Hi!" and seen.models == ["plain-json"]
    assert seen.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_html_page_with_200_is_a_clear_error(up: Upstream) -> None:
    up.next(Reply.error(b"<html>Sign in to the Wi-Fi</html>", 200, {"Content-Type": "text/html"}))
    seen = consume(backend(up.url).stream(MESSAGES, Settings()))
    assert seen.error is not None and "text/html instead of an event stream" in seen.error.message


def test_closing_the_generator_hangs_up_on_the_server_within_a_second(up: Upstream) -> None:
    up.next(Reply.generated(tokens=200, rate=50))
    deltas = backend(up.url).stream(MESSAGES, Settings())
    text = ""
    for delta in deltas:
        text += delta.text
        if len(text) > 10:
            break
    closed_at = time.monotonic()
    deltas.close()

    request = up.wait_request(0)
    assert request.disconnected.wait(1.0)
    assert request.disconnected_at is not None and request.disconnected_at - closed_at < 1.0
    sent = request.bytes_sent
    time.sleep(0.1)
    assert request.bytes_sent == sent < len(Reply.generated(tokens=200).body)


def test_closing_while_the_server_stalls_hangs_up_too(up: Upstream) -> None:
    name = "deepseek_reasoner_reasoning_content.sse"
    up.next(fixture_reply(name, split="events", stall_at=event_offsets(fixture_bytes(name))[20]))
    deltas = backend(up.url).stream(MESSAGES, Settings())
    for _ in range(5):
        next(deltas)
    time.sleep(0.1)  # the server is now stalled, waiting forever
    closed_at = time.monotonic()
    deltas.close()
    request = up.wait_request(0)
    assert request.disconnected.wait(1.0)
    assert request.disconnected_at is not None and request.disconnected_at - closed_at < 1.0


def test_upstream_command_line_serves_generated_tokens() -> None:
    command = [sys.executable, str(REPO / "tests" / "upstream.py"), "--port", "0"]
    command += ["--tokens", "30", "--rate", "200"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("listening on http://127.0.0.1:")
            seen = consume(backend(line.split()[-1]).stream(MESSAGES, Settings()))
            assert seen.error is None and seen.text == generated_text(30)
            assert seen.usage is not None and seen.usage["completion_tokens"] == 30
        finally:
            process.terminate()
            process.wait(timeout=3)


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json, sys, time
    import gevent
    from webchat.backends.base import BackendError, ChatMessage, Settings
    from webchat.backends.openai import OpenAIBackend, OpenAIConfig

    url = sys.argv[1]
    ticks = []

    def tick():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    # Built up front, as the app does once: creating the TLS context is CPU work that
    # blocks the hub for a moment, and is not what this test measures.
    backend = OpenAIBackend(OpenAIConfig(base_url=url, api_key="k", models=["m"]))
    impatient = OpenAIBackend(
        OpenAIConfig(base_url=url, api_key="k", models=["m"], read_timeout=0.3)
    )

    def run(chat=backend):
        text, error = "", None
        try:
            for delta in chat.stream([ChatMessage("user", "hi")], Settings()):
                text += delta.text
        except BackendError as exc:
            error = exc.message
        return text, error

    ticker = gevent.spawn(tick)
    gevent.sleep(0.05)
    started = time.monotonic()
    text, error = gevent.spawn(run).get(timeout=10)
    elapsed = time.monotonic() - started
    during = [t for t in ticks if t >= started]
    max_gap = max(b - a for a, b in zip(during, during[1:]))
    stall_text, stall_error = gevent.spawn(run, impatient).get(timeout=10)
    victim = gevent.spawn(run)  # its server stalls forever after a few tokens
    gevent.sleep(0.3)
    killed_at = time.monotonic()
    victim.kill()
    gevent.sleep(1.2)  # stay alive: process exit would close the socket anyway
    ticker.kill()
    print(json.dumps({"text": text, "error": error, "elapsed": elapsed, "max_gap": max_gap,
                      "stall_text": stall_text, "stall_error": stall_error,
                      "killed_at": killed_at}))
    """
)


def test_backend_is_cooperative_under_gevent(up: Upstream) -> None:
    # A hang before the headers and paced chunks: a blocking client would starve the ticker.
    up.next(Reply.generated(tokens=20, rate=40, hang=0.5))
    # Then a stall after a few tokens, cut by the watchdog greenlet.
    stalled = Reply.generated(tokens=20, rate=100)
    stalled.stall_at = event_offsets(stalled.body)[5]
    up.next(stalled, stalled)
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, up.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )
    if "has no attribute 'epoll'" in result.stderr:
        pytest.fail("trio < 0.26 is installed: httpx cannot be imported after gevent patching")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] is None and report["text"] == generated_text(20)
    # A blocking client would stop the 10 ms ticker for the whole 0.5 s hang at least;
    # a busy machine only delays single ticks.
    assert report["elapsed"] >= 0.5
    assert report["max_gap"] < 0.3
    assert report["stall_text"] == generated_text(5)  # the role chunk, then 5 tokens
    assert "stopped sending for 0.3 s" in report["stall_error"]
    # Killing the greenlet closed the connection (CLOCK_MONOTONIC is shared on Linux).
    victim = up.wait_request(2)
    assert victim.disconnected_at is not None
    assert 0 <= victim.disconnected_at - report["killed_at"] < 1.0
