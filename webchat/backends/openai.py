"""A backend for any OpenAI-compatible Chat Completions stream.

Works with OpenAI, Azure OpenAI, DeepSeek, Groq, OpenRouter, Mistral, vLLM, Ollama and
the llama.cpp server. It uses a sync httpx client, which becomes cooperative when gevent
has monkey-patched the standard library (as in gunicorn's gevent workers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource

from .base import BackendError, ChatMessage, Delta, Settings

logger = logging.getLogger(__name__)

# Longest Retry-After we wait out ourselves; anything longer goes back to the user.
MAX_AUTO_RETRY_WAIT = 10.0
MAX_BACKOFF = 8.0
# Provider messages are shown to the user; a whole HTML page or stack trace is not useful.
MAX_MESSAGE_CHARS = 300

# Optional request fields that some servers reject with a 400; see _drop_rejected_field.
_OPTIONAL_FIELDS = ("stream_options", "max_tokens", "temperature")
_UNSUPPORTED_PATTERN = re.compile(
    r"(?i)unsupported|not supported|does not support|unrecognized|unknown|extra|not permitted"
    r"|not allowed"
)
_KEY_PATTERN = re.compile(r"\b(?:sk|gsk|xai|key)[-_][A-Za-z0-9_*\-]{6,}")
_BEARER_PATTERN = re.compile(r"(?i)bearer\s+\S+")
_TITLE_PATTERN = re.compile(r"(?is)<title[^>]*>(.*?)</title>")
_TAG_PATTERN = re.compile(r"(?s)<[^>]+>")


@dataclass(frozen=True)
class OpenAIConfig:
    """Where and how to reach an OpenAI-compatible server.

    ``first_token_timeout`` bounds the wait for the response headers and for the first
    text or reasoning token; ``read_timeout`` bounds the silence between chunks after
    that. Without access to the socket (a custom transport) the silence between chunks
    falls back to ``first_token_timeout``.
    """

    base_url: str  # e.g. https://api.openai.com/v1 ; POST {base_url}/chat/completions
    api_key: str | None
    models: list[str]  # first is default
    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0  # reasoning models can think for a long time
    read_timeout: float = 60.0
    total_timeout: float = 600.0
    max_retries: int = 2  # only before the first token
    extra_headers: dict[str, str] = field(default_factory=dict)
    retry_backoff: float = 0.5  # first retry delay in seconds; doubles each time


class OpenAIBackend:
    """Stream replies from an OpenAI-compatible ``/chat/completions`` endpoint."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, *, client: httpx.Client | None = None):
        url = httpx.URL(config.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"OpenAI base URL must be an http(s) URL, got {config.base_url!r}")
        self.config = config
        # Appending to the path keeps Azure's ?api-version=... query string.
        path = url.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        self._url = url.copy_with(path=path)
        self._host = url.host if url.port is None else f"{url.host}:{url.port}"
        self._client = client or httpx.Client(follow_redirects=False)
        self._headers = {"Accept": "text/event-stream", **config.extra_headers}
        if config.api_key:
            if url.host.endswith((".openai.azure.com", ".cognitiveservices.azure.com")):
                self._headers["api-key"] = config.api_key
            else:
                self._headers["Authorization"] = f"Bearer {config.api_key}"

    def models(self) -> list[str]:
        """Return the configured model names (the first is the default)."""
        return list(self.config.models)

    def stream(
        self, messages: list[ChatMessage], settings: Settings
    ) -> Generator[Delta, None, None]:
        """Yield the reply as deltas; raise BackendError on failure.

        Retries happen only before the first delta. Closing the generator closes the
        HTTP response, so the server sees the disconnect and stops generating.
        """
        model = settings.model or (self.config.models[0] if self.config.models else "")
        if not model:
            raise BackendError("No model is configured for the OpenAI-compatible backend.")
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if settings.temperature is not None:
            body["temperature"] = settings.temperature
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        deadline = time.monotonic() + self.config.total_timeout
        response, first_token_by = self._open(body, deadline)
        try:
            yield from self._read(response, deadline, first_token_by)
        finally:
            # Runs on GeneratorExit and greenlet kills too, so the server sees us leave.
            response.close()

    def close(self) -> None:
        """Close the HTTP client's pooled connections."""
        self._client.close()

    def _open(self, body: dict[str, Any], deadline: float) -> tuple[httpx.Response, float]:
        """Send the request until a 2xx arrives; return it and the first-token deadline.

        Retries 408, 429 and 5xx with backoff, and drops optional fields a server rejects.
        """
        cfg = self.config
        _fail_fast_on_invalid_host(self._url.host)
        attempt = 0
        while True:
            started = time.monotonic()
            first_token_by = min(started + cfg.first_token_timeout, deadline)
            timeout = httpx.Timeout(
                connect=cfg.connect_timeout,
                read=max(first_token_by - started, 0.001),
                write=cfg.connect_timeout,
                pool=cfg.connect_timeout,
            )
            request = self._client.build_request(
                "POST", self._url, json=body, headers=self._headers, timeout=timeout
            )
            try:
                response = self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, phase="connect") from exc
            if response.is_success:
                return response, first_token_by
            try:
                raw = response.read()
            except httpx.HTTPError:
                raw = b""
            finally:
                response.close()
            error = self._status_error(response.status_code, raw, response.headers)
            if _drop_rejected_field(body, response.status_code, error.message):
                continue
            wait = _retry_wait(error, attempt, cfg.retry_backoff)
            if wait is None or attempt >= cfg.max_retries or time.monotonic() + wait >= deadline:
                raise error
            attempt += 1
            logger.warning(
                "%s answered %s; retry %d/%d in %.1f s",
                self._host,
                response.status_code,
                attempt,
                cfg.max_retries,
                wait,
            )
            time.sleep(wait)

    def _read(
        self, response: httpx.Response, deadline: float, first_token_by: float
    ) -> Iterator[Delta]:
        """Turn the event stream (or a non-streamed JSON body) into deltas."""
        content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "text/event-stream":
            yield from self._read_whole(response, content_type)
            return
        watchdog = _Watchdog(_socket_of(response), deadline)
        events = EventSource(response).iter_sse()
        model_seen = started = finished = done = False
        try:
            while True:
                if started:
                    watchdog.arm(time.monotonic() + self.config.read_timeout, "stall")
                else:
                    watchdog.arm(first_token_by, "first_token")
                try:
                    event = next(events)
                except StopIteration:
                    break
                finally:
                    watchdog.pause()
                if time.monotonic() > deadline:
                    raise self._timeout_error("total")
                data = event.data.strip()
                if data == "[DONE]":
                    done = True
                    break
                if event.event == "error":
                    try:
                        payload: object = json.loads(data)
                    except ValueError:
                        payload = data
                    raise self._inband_error(payload)
                if not data:
                    continue
                chunk = _loads(data)
                if not isinstance(chunk, dict):
                    raise BackendError(
                        f"The model provider at {self._host} sent a malformed chunk "
                        "(not a JSON object); the reply is incomplete."
                    )
                if not model_seen and isinstance(chunk.get("model"), str) and chunk["model"]:
                    model_seen = True
                    yield Delta(model=chunk["model"])
                delta = _chunk_delta(chunk)
                if delta.text or delta.reasoning or delta.usage or delta.finish_reason:
                    started = started or bool(delta.text or delta.reasoning)
                    finished = finished or delta.finish_reason is not None
                    yield delta
                if chunk.get("error"):
                    raise self._inband_error(chunk)
        except httpx.HTTPError as exc:
            if watchdog.expired:
                raise self._timeout_error(watchdog.expired) from exc
            if isinstance(exc, httpx.ReadTimeout):
                raise self._timeout_error("stall" if started else "first_token") from exc
            if finished and isinstance(exc, httpx.RemoteProtocolError):
                # The reply is complete; only the end of the HTTP body was sloppy.
                return
            raise self._transport_error(exc, phase="stream") from exc
        finally:
            watchdog.stop()
        if watchdog.expired and not done:
            # Shutting the socket down can also look like a clean end of the body.
            raise self._timeout_error(watchdog.expired)

    def _read_whole(self, response: httpx.Response, content_type: str) -> Iterator[Delta]:
        """Yield a non-streamed reply, for servers that ignore ``stream: true``."""
        if "json" not in content_type:
            raise BackendError(
                f"The model provider at {self._host} answered with "
                f"{content_type or 'no content type'} instead of an event stream; "
                "check the base URL."
            )
        try:
            raw = response.read()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, phase="stream") from exc
        reply = _loads(raw.decode("utf-8", "replace"))
        if not isinstance(reply, dict):
            raise BackendError(f"The model provider at {self._host} sent a malformed reply.")
        if reply.get("error"):
            raise self._inband_error(reply)
        if isinstance(reply.get("model"), str) and reply["model"]:
            yield Delta(model=reply["model"])
        yield _chunk_delta(reply)

    def _status_error(self, status: int, raw: bytes, headers: httpx.Headers) -> BackendError:
        """Describe an HTTP error status for the user."""
        said = self._redact(_body_message(raw))
        detail = f" Provider said: {said}" if said else ""
        retry_after = _parse_retry_after(headers)
        if status in (401, 403):
            message = (
                f"The model provider rejected the API key ({status}). "
                f"Check the key configured for {self._host}.{detail}"
            )
        elif status == 404:
            message = (
                f"The model provider at {self._host} answered 404: unknown model or wrong "
                f"base URL.{detail}"
            )
        elif status == 429:
            wait = f" Try again in {retry_after:.0f} s." if retry_after is not None else ""
            message = f"The model provider is rate limiting requests (429).{wait}{detail}"
        elif 300 <= status < 400:
            message = (
                f"The model provider at {self._host} redirected the request ({status}); "
                "check the base URL (http or https, trailing path)."
            )
        elif status >= 500:
            message = f"The model provider at {self._host} failed ({status}).{detail}"
        else:
            message = f"The model provider at {self._host} refused the request ({status}).{detail}"
        return BackendError(message, status=status, retry_after=retry_after)

    def _inband_error(self, payload: object) -> BackendError:
        """Describe an error the provider sent inside a 200 stream."""
        said = self._redact(_provider_message(payload) or _clip(str(payload)))
        status = None
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            code = payload["error"].get("status_code", payload["error"].get("code"))
            status = code if isinstance(code, int) else None
        return BackendError(f"The model provider reported an error: {said}", status=status)

    def _timeout_error(self, reason: str) -> BackendError:
        """Describe which time limit ran out."""
        cfg = self.config
        if reason == "first_token":
            message = (
                f"The model provider at {self._host} sent no reply within "
                f"{cfg.first_token_timeout:g} s."
            )
        elif reason == "stall":
            message = (
                f"The model provider at {self._host} stopped sending for "
                f"{cfg.read_timeout:g} s; the reply is incomplete."
            )
        else:
            message = f"The reply took longer than {cfg.total_timeout:g} s and was cut off."
        return BackendError(message, status=504)

    def _transport_error(self, exc: httpx.HTTPError, *, phase: str) -> BackendError:
        """Describe a network failure without echoing request headers."""
        host = self._host
        if isinstance(exc, httpx.ConnectTimeout):
            message = (
                f"Timed out connecting to the model provider at {host} "
                f"after {self.config.connect_timeout:g} s."
            )
        elif isinstance(exc, httpx.ReadTimeout):
            return self._timeout_error("first_token")
        elif isinstance(exc, httpx.TimeoutException):
            message = f"Timed out talking to the model provider at {host}."
        elif _caused_by(exc, socket.gaierror):
            message = f"Could not resolve the model provider's host name ({self._url.host})."
        elif (tls := _caused_by(exc, ssl.SSLError)) is not None:
            reason = getattr(tls, "reason", None) or type(tls).__name__
            message = f"The TLS connection to the model provider at {host} failed ({reason})."
        elif isinstance(exc, httpx.ConnectError):
            refused = _caused_by(exc, ConnectionRefusedError) or "refused" in str(exc).lower()
            why = "connection refused" if refused else self._redact(_clip(str(exc), 120))
            message = f"Could not connect to the model provider at {host} ({why})."
        elif phase == "stream":
            message = (
                f"The connection to the model provider at {host} was lost before the "
                "reply finished."
            )
        else:
            message = f"The request to the model provider at {host} failed ({type(exc).__name__})."
        return BackendError(message)

    def _redact(self, text: str) -> str:
        """Remove anything that looks like an API key from provider text."""
        key = self.config.api_key
        if key and len(key) >= 4:
            text = text.replace(key, "[redacted key]")
        text = _BEARER_PATTERN.sub("Bearer [redacted]", text)
        return _KEY_PATTERN.sub("[redacted key]", text)


class _Watchdog:
    """Shut the socket down when the stream has been quiet for too long.

    httpx fixes a response's read timeout when the body starts, so this is how the wait
    for the first token and the silence between chunks get different limits, and how
    keep-alive comments cannot keep a stream open past the total timeout. A read blocked
    in another thread or greenlet then fails at once, and ``expired`` says which limit
    ran out. Without a socket it does nothing.
    """

    def __init__(self, sock: socket.socket | None, total_deadline: float):
        self.expired: str | None = None
        self._total = total_deadline
        self._at = total_deadline
        self._reason = "total"
        self._stopped = False
        self._cond = threading.Condition()
        if sock is not None:
            threading.Thread(
                target=self._run, args=(sock,), name="openai-watchdog", daemon=True
            ).start()

    def arm(self, at: float, reason: str) -> None:
        """Fire at ``at`` (a ``time.monotonic()`` value) unless re-armed or paused."""
        with self._cond:
            earlier = at < self._at
            self._at, self._reason = (at, reason) if at < self._total else (self._total, "total")
            if earlier:  # a later deadline is picked up when the current wait ends
                self._cond.notify()

    def pause(self) -> None:
        """Keep only the total deadline, while the consumer handles a delta."""
        with self._cond:
            self._at, self._reason = self._total, "total"

    def stop(self) -> None:
        """End the watchdog thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self, sock: socket.socket) -> None:
        with self._cond:
            while not self._stopped:
                remaining = self._at - time.monotonic()
                if remaining <= 0:
                    self.expired = self._reason
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    return
                self._cond.wait(remaining)


def _socket_of(response: httpx.Response) -> socket.socket | None:
    """Return the response's socket, if the transport exposes it."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, socket.socket) else None


def _chunk_delta(chunk: Mapping[str, Any]) -> Delta:
    """Extract text, reasoning, usage and finish reason from one chunk (or a whole reply).

    Only the first choice counts. Unknown fields are ignored.
    """
    result = Delta(usage=_usage(chunk))
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return result
    choice = choices[0]
    if isinstance(choice.get("finish_reason"), str):
        result.finish_reason = choice["finish_reason"]
    delta = choice.get("delta")
    if delta is None:
        delta = choice.get("message")  # a non-streamed reply
    if not isinstance(delta, dict):
        return result
    content = delta.get("content")
    if isinstance(content, str):
        result.text = content
    elif isinstance(content, list):
        # Mistral's reasoning models send typed parts instead of a string.
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                result.text += part["text"]
            elif part.get("type") == "thinking":
                result.reasoning += _texts(part.get("thinking"))
    # A provider may send the same reasoning both as a string and as reasoning_details.
    for key in ("reasoning_content", "reasoning"):
        if isinstance(delta.get(key), str):
            result.reasoning += delta[key]
            break
    else:
        result.reasoning += _texts(delta.get("reasoning_details"))
    return result


def _texts(parts: object) -> str:
    """Join the readable text of reasoning parts (``text`` or ``summary``); skip encrypted."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        return ""
    out = []
    for part in parts:
        if isinstance(part, dict):
            value = part.get("text", part.get("summary"))
            if isinstance(value, str):
                out.append(value)
    return "".join(out)


def _usage(chunk: Mapping[str, Any]) -> dict[str, int] | None:
    """Return token counts from ``usage`` or Groq's ``x_groq.usage``."""
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        x_groq = chunk.get("x_groq")
        usage = x_groq.get("usage") if isinstance(x_groq, dict) else None
    if not isinstance(usage, dict):
        return None
    counts = {
        key: value
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(value := usage.get(key), int) and not isinstance(value, bool)
    }
    for details, key in (
        ("completion_tokens_details", "reasoning_tokens"),
        ("prompt_tokens_details", "cached_tokens"),
    ):
        sub = usage.get(details)
        if isinstance(sub, dict) and isinstance(value := sub.get(key), int):
            counts[key] = value
    return counts or None


def _loads(text: str) -> Any:
    """Parse one chunk's JSON; raise BackendError if it is malformed."""
    try:
        return json.loads(text)
    except ValueError:
        raise BackendError(
            "The model provider sent a malformed chunk (not valid JSON); the reply is incomplete."
        ) from None


def _body_message(raw: bytes) -> str:
    """Return the provider's message from an error body of any shape, clipped."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return ""
    try:
        parsed = json.loads(text)
    except ValueError:
        # An HTML page from a proxy or load balancer: its title is the useful part.
        title = _TITLE_PATTERN.search(text)
        if title:
            return _clip(title.group(1))
        return _clip(_TAG_PATTERN.sub(" ", text))
    return _clip(_provider_message(parsed) or text)


def _provider_message(payload: object) -> str | None:
    """Find the message in ``{"error": {...}}``, ``{"error": "..."}``, ``{"message"}``, ...

    OpenRouter puts the upstream provider's own words in ``error.metadata.raw``.
    """
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if isinstance(payload, str):
        return _clip(payload)
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, str):
        return _clip(error)
    if isinstance(error, dict):
        message = error.get("message")
        metadata = error.get("metadata")
        raw = metadata.get("raw") if isinstance(metadata, dict) else None
        if isinstance(message, str):
            if isinstance(raw, str) and raw and raw not in message:
                message = f"{message}: {raw}"
            return _clip(message)
        if error.get("code") is not None:
            return _clip(f"error code {error['code']}")
    for key in ("message", "detail"):
        value = payload.get(key)
        if isinstance(value, str):
            return _clip(value)
        if isinstance(value, list):  # FastAPI validation errors (vLLM)
            msgs = [
                d["msg"] for d in value if isinstance(d, dict) and isinstance(d.get("msg"), str)
            ]
            if msgs:
                return _clip("; ".join(msgs))
    return None


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Collapse whitespace and cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    """Return the wait the server asked for, from ``retry-after-ms`` or ``Retry-After``."""
    with contextlib.suppress(ValueError):
        if "retry-after-ms" in headers:
            return max(float(headers["retry-after-ms"]) / 1000, 0.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(float(value), 0.0)
    with contextlib.suppress(TypeError, ValueError):
        when = parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0)
    return None


def _retry_wait(error: BackendError, attempt: int, backoff: float) -> float | None:
    """Return how long to wait before retrying, or None if this error is final."""
    status = error.status or 0
    if status not in (408, 429) and (status < 500 or status == 501):
        return None
    if error.retry_after is not None:
        return error.retry_after if error.retry_after <= MAX_AUTO_RETRY_WAIT else None
    delay = min(backoff * 2.0**attempt, MAX_BACKOFF)
    return delay * (1 + random.random() * 0.25)  # jitter spreads out a thundering herd


def _drop_rejected_field(body: dict[str, Any], status: int, message: str) -> bool:
    """Adapt the request once when a 400 names an optional field; say if it changed.

    Some servers reject ``stream_options``; OpenAI's reasoning models want
    ``max_completion_tokens`` and refuse a custom ``temperature``.
    """
    if status not in (400, 422):
        return False
    for name in _OPTIONAL_FIELDS:
        if name not in body or name not in message:
            continue
        if name == "stream_options" or _UNSUPPORTED_PATTERN.search(message):
            value = body.pop(name)
            if name == "max_tokens" and "max_completion_tokens" in message:
                body["max_completion_tokens"] = value
            logger.info("the server rejected %r; retrying without it", name)
            return True
    return False


_E = TypeVar("_E", bound=BaseException)


def _caused_by(exc: BaseException, kind: type[_E]) -> _E | None:
    """Return the first exception of ``kind`` in the cause/context chain."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fail_fast_on_invalid_host(host: str) -> None:
    """Refuse names under ``.invalid`` without asking DNS.

    RFC 6761 reserves them to never resolve; answering at once keeps the failure instant
    even where the resolver is slow or unreachable.
    """
    if host == "invalid" or host.endswith(".invalid"):
        raise BackendError(f"Could not resolve the model provider's host name ({host}).")
