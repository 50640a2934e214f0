"""Operations: the real client behind proxies, request ids, JSON logs, /metrics.

- ``WEBCHAT_PROXY_HOPS`` > 0 wraps the app in werkzeug's ``ProxyFix``: the client
  address, scheme, host and port come from that many proxies' X-Forwarded-* headers.
  (The sign-in header is checked against the direct peer, which ProxyFix keeps.)
- Every request has an id: the incoming ``X-Request-ID`` if it is well formed, else
  a new one. It is echoed in the response and is in every log line of the request.
- Logs are JSON lines on stdout (``WEBCHAT_LOG_FORMAT=json``), one access line per
  request, written when the response ends (for a stream: when it closes).
- ``/metrics`` (Prometheus) needs ``Authorization: Bearer $WEBCHAT_METRICS_TOKEN``;
  without a token configured it is 404.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, g, has_request_context, request
from werkzeug.middleware.proxy_fix import ProxyFix

from . import metrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("webchat.access")
bp = Blueprint("ops", __name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,127}$")
_QUIET_PATHS = ("/healthz", "/metrics")  # polled often: their access lines are DEBUG
_TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
_warned_unproxied = False


def init_app(app: Flask) -> None:
    """Wire ProxyFix, request ids, the log format, access lines and /metrics."""
    hops = app.config["PROXY_HOPS"]
    if hops:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)
    configure_log_format(app.config["LOG_FORMAT"])
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.register_blueprint(bp)


# Request ids and access lines ---------------------------------------------

def request_id() -> str:
    """Return this request's id: the proxy's X-Request-ID if well formed, else a new one."""
    if "request_id" not in g:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    value: str = g.request_id
    return value


def _start_request() -> None:
    g.request_started = time.monotonic()
    request_id()
    _warn_if_unproxied()


def _finish_request(response: Response) -> Response:
    rid = request_id()
    response.headers[REQUEST_ID_HEADER] = rid
    started = g.get("request_started", time.monotonic())
    fields = {"method": request.method, "path": request.path, "status": response.status_code,
              "client": request.remote_addr or "", "request_id": rid}
    quiet = request.path in _QUIET_PATHS
    streaming = response.mimetype == "text/event-stream" and response.status_code == 200
    metrics.record_response(response.status_code)
    if streaming:
        metrics.stream_opened()

    def done() -> None:
        if streaming:
            metrics.stream_closed()
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        access_logger.log(logging.DEBUG if quiet else logging.INFO, "%s %s %s %.1f ms",
                          fields["method"], fields["path"], fields["status"], duration_ms,
                          extra={**fields, "duration_ms": duration_ms})

    response.call_on_close(done)
    return response


def _warn_if_unproxied() -> None:
    """Say once if a proxy seems to be in front while WEBCHAT_PROXY_HOPS is 0."""
    global _warned_unproxied
    if _warned_unproxied or current_app.config["PROXY_HOPS"]:
        return
    if "X-Forwarded-For" not in request.headers and "X-Forwarded-Proto" not in request.headers:
        return
    try:
        loopback = ipaddress.ip_address(request.environ.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        _warned_unproxied = True
        logger.warning("requests carry X-Forwarded-For/-Proto but WEBCHAT_PROXY_HOPS is 0: the "
                       "proxy's address and scheme are used. Behind one proxy set "
                       "WEBCHAT_PROXY_HOPS=1.")


# Logging --------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "request_id"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            data["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


class RequestIdFilter(logging.Filter):
    """Put the current request's id on every record logged while handling it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None) and has_request_context():
            record.request_id = g.get("request_id")
        return True


_request_id_filter = RequestIdFilter()


def configure_log_format(log_format: str) -> None:
    """Give the ``webchat`` log handlers (made by create_app) the chosen format."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    for handler in logging.getLogger("webchat").handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_request_id_filter)


# Metrics --------------------------------------------------------------------

@bp.get("/metrics")
def metrics_page() -> Response:
    """Answer Prometheus: every worker's metrics, for the bearer of the metrics token."""
    token = current_app.config.get("METRICS_TOKEN")
    if not token:
        abort(404)
    sent = request.headers.get("Authorization", "")
    scheme, _, credentials = sent.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(),
                                                             str(token).encode()):
        return Response("A bearer token is required.\n", status=401, mimetype="text/plain",
                        headers={"WWW-Authenticate": 'Bearer realm="webchat metrics"'})
    body, content_type = metrics.exposition()
    response = Response(body, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response
