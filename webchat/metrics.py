"""Prometheus metrics: what replies and streams are doing, summed over every worker.

gunicorn runs several worker processes, so the metrics use prometheus_client's
multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (``webchat.gunicorn_conf``
makes a fresh directory for each server): each worker writes its numbers to files
there and ``/metrics``, answered by any worker, adds them up.

Caveat: the variable must be set before this module is first imported in a worker;
gunicorn's master sets it before forking. Without it (tests, one process) the
numbers are this process's. No Flask here: ``runs`` may call the ``record_*``
functions.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REPLIES_STARTED = Counter(
    "webchat_replies_started", "Replies whose generation started.")
REPLIES_FINISHED = Counter(
    "webchat_replies_finished",
    "Replies that ended, by final status (complete, stopped, error, interrupted).", ["status"])
REPLIES_IN_PROGRESS = Gauge(
    "webchat_replies_in_progress", "Replies being generated now.", multiprocess_mode="livesum")
FIRST_TOKEN_SECONDS = Histogram(
    "webchat_first_token_seconds", "Time from the start of a reply to its first text.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60))
TOKENS = Counter(
    "webchat_tokens", "Tokens the model reported, by kind (prompt, completion).", ["kind"])
UPSTREAM_ERRORS = Counter(
    "webchat_upstream_errors", "Replies that failed because the model backend failed.")
ACTIVE_STREAMS = Gauge(
    "webchat_active_streams", "Open SSE connections (browsers following a reply).",
    multiprocess_mode="livesum")
HTTP_RESPONSES = Counter(
    "webchat_http_responses", "HTTP responses, by status code.", ["status"])


def record_reply_started() -> None:
    """Count a reply whose generation just started (call once per run)."""
    REPLIES_STARTED.inc()
    REPLIES_IN_PROGRESS.inc()


def record_reply_finished(status: str, *, first_token_ms: float | None = None,
                          prompt_tokens: int | None = None,
                          completion_tokens: int | None = None) -> None:
    """Count a reply that ended with ``status``, its time to first token and its tokens."""
    REPLIES_FINISHED.labels(status=status).inc()
    REPLIES_IN_PROGRESS.dec()
    if first_token_ms is not None:
        FIRST_TOKEN_SECONDS.observe(first_token_ms / 1000)
    if prompt_tokens:
        TOKENS.labels(kind="prompt").inc(prompt_tokens)
    if completion_tokens:
        TOKENS.labels(kind="completion").inc(completion_tokens)


def record_upstream_error() -> None:
    """Count a reply that failed because the model's API failed (a BackendError)."""
    UPSTREAM_ERRORS.inc()


def stream_opened() -> None:
    """Count an SSE connection that opened."""
    ACTIVE_STREAMS.inc()


def stream_closed() -> None:
    """Count an SSE connection that closed."""
    ACTIVE_STREAMS.dec()


def record_response(status: int) -> None:
    """Count one HTTP response."""
    HTTP_RESPONSES.labels(status=str(status)).inc()


def exposition() -> tuple[bytes, str]:
    """Return every metric in Prometheus' text format, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

