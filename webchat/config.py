"""Settings from the environment: declared once, validated, documented.

Each setting is one row of ``SETTINGS``. A bad value stops start-up with a
``ConfigError`` that names the variable. The README's settings table is checked
against this table by a test.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting in the environment is missing or invalid."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: how to parse it and what it is for."""

    env: str
    key: str
    parse: Callable[[str], Any]
    default: Any
    help: str


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _int_at_least_zero(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _backend(value: str) -> str:
    value = value.strip().lower()
    if value not in {"auto", "local", "openai", "demo"}:
        raise ValueError("must be auto, local, openai or demo")
    return value


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _text(value: str) -> str:
    return value


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or a positive integer")
    return number


def _origins(value: str) -> list[str]:
    """Parse comma-separated web origins (``scheme://host[:port]``), normalized as browsers do."""
    origins = []
    for item in _csv(value):
        parts = urlsplit(item)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1
                or parts.path not in ("", "/") or parts.query or parts.fragment
                or parts.username or parts.password or "*" in item):
            raise ValueError(f"{item!r} is not an origin like https://intranet.example.com")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        default = 443 if parts.scheme == "https" else 80
        origins.append(f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default)
                                                       else ""))
    return origins


def _networks(value: str) -> list[str]:
    """Parse comma-separated IP addresses and CIDR ranges."""
    networks = []
    for item in _csv(value):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
    return networks


def _header_name(value: str) -> str:
    value = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", value):
        raise ValueError("must be an HTTP header name such as X-Forwarded-User")
    return value


def _token(value: str) -> str:
    if len(value) < 16:
        raise ValueError("use at least 16 random characters")
    return value


def _log_format(value: str) -> str:
    value = value.strip().lower()
    if value not in {"json", "text"}:
        raise ValueError("must be json or text")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("SECRET_KEY", "SECRET_KEY", _text, None,
            "Signs the session cookie. Required unless WEBCHAT_DEV=1; use a long random string."),
    Setting("DATABASE_URL", "DATABASE_URL", _text, None,
            "Where conversations are stored. Default: a SQLite file `webchat.sqlite3` in the "
            "instance folder; `sqlite:///path/to/file.sqlite3` chooses another file, "
            "`postgresql://user:password@host:5432/db` a PostgreSQL database (then any number "
            "of instances may share it)."),
    Setting("WEBCHAT_DATABASE_POOL_SIZE", "DATABASE_POOL_SIZE", _positive_int, 10,
            "PostgreSQL only: most connections one worker process keeps open (its greenlets "
            "share them; a query holds one only while it runs)."),
    Setting("WEBCHAT_DEV", "DEV", _bool, False,
            "Development mode: a random SECRET_KEY is made and kept in the instance folder."),
    Setting("WEBCHAT_BACKEND", "BACKEND", _backend, "auto",
            "Which model answers: `auto` (OpenAI-compatible API if OPENAI_API_KEY or "
            "OPENAI_BASE_URL is set, else the built-in local model, else demo), `local`, "
            "`openai` or `demo`."),
    Setting("OPENAI_API_KEY", "OPENAI_API_KEY", _text, None,
            "API key for the OpenAI-compatible backend (sent as a Bearer token)."),
    Setting("OPENAI_BASE_URL", "OPENAI_BASE_URL", _text, None,
            "Base URL of the OpenAI-compatible API (default `https://api.openai.com/v1`; "
            "vLLM, Ollama, llama.cpp server, ...)."),
    Setting("WEBCHAT_MODELS", "MODELS", _csv, [],
            "Comma-separated model names offered in the model picker; the first is the default."),
    Setting("WEBCHAT_CONNECT_TIMEOUT", "CONNECT_TIMEOUT", _positive_float, 10.0,
            "Seconds to wait for the API's TCP/TLS connection."),
    Setting("WEBCHAT_FIRST_TOKEN_TIMEOUT", "FIRST_TOKEN_TIMEOUT", _positive_float, 120.0,
            "Seconds to wait for the first token (reasoning models think first)."),
    Setting("WEBCHAT_READ_TIMEOUT", "READ_TIMEOUT", _positive_float, 60.0,
            "Longest silence allowed between two chunks once the reply has started."),
    Setting("WEBCHAT_TOTAL_TIMEOUT", "TOTAL_TIMEOUT", _positive_float, 600.0,
            "Longest a whole reply from the API may take."),
    Setting("WEBCHAT_MAX_RETRIES", "MAX_RETRIES", _int_at_least_zero, 2,
            "Retries (with backoff) of a failed API request, only before the first token."),
    Setting("WEBCHAT_LOCAL_MODEL", "LOCAL_MODEL", _text, None,
            "Path of a GGUF file for the built-in local model (default: SmolLM2-135M-Instruct)."),
    Setting("WEBCHAT_LOCAL_MAX_TOKENS", "LOCAL_MAX_TOKENS", _positive_int, 512,
            "Longest reply of the built-in local model, in tokens."),
    Setting("WEBCHAT_LOCAL_CONTEXT", "LOCAL_CONTEXT", _positive_int, 2048,
            "Context window of the built-in local model, in tokens (older turns are dropped)."),
    Setting("WEBCHAT_DEMO_TOKENS_PER_SECOND", "DEMO_TOKENS_PER_SECOND", _positive_float, 40.0,
            "Pace of the demo backend's replies."),
    Setting("WEBCHAT_MAX_MESSAGE_CHARS", "MAX_MESSAGE_CHARS", _positive_int, 32000,
            "Longest message a user may send, in characters."),
    Setting("WEBCHAT_MAX_CONVERSATION_MESSAGES", "MAX_CONVERSATION_MESSAGES", _positive_int, 1000,
            "Most messages (yours and replies) one conversation may hold."),
    Setting("WEBCHAT_MESSAGES_PER_MINUTE", "MESSAGES_PER_MINUTE", _positive_int, 20,
            "Messages one session may send per minute (across all workers)."),
    Setting("WEBCHAT_ADDRESS_MESSAGES_PER_MINUTE", "ADDRESS_MESSAGES_PER_MINUTE", _positive_int,
            120, "Messages one client address may send per minute (across all sessions)."),
    Setting("WEBCHAT_REPLIES_IN_FLIGHT", "REPLIES_IN_FLIGHT", _positive_int, 8,
            "Replies one session may have in progress at once."),
    Setting("WEBCHAT_ADDRESS_REPLIES_IN_FLIGHT", "ADDRESS_REPLIES_IN_FLIGHT", _positive_int, 32,
            "Replies one client address may have in progress at once."),
    Setting("WEBCHAT_MAX_REPLIES_PER_WORKER", "MAX_REPLIES_PER_WORKER", _positive_int, 400,
            "Replies one worker writes at once; past it new ones get 503 with Retry-After "
            "(better a clear 'busy' than every stream slowing down)."),
    Setting("WEBCHAT_COALESCE_MS", "COALESCE_MS", _positive_int, 40,
            "Updates of a streaming reply are gathered into windows of this many milliseconds."),
    Setting("WEBCHAT_PING_SECONDS", "PING_SECONDS", _positive_float, 15.0,
            "A keep-alive comment is sent on a silent stream this often."),
    Setting("WEBCHAT_CHECKPOINT_SECONDS", "CHECKPOINT_SECONDS", _positive_float, 0.5,
            "A streaming reply's text is saved to the store at least this often."),
    Setting("WEBCHAT_LOG_LEVEL", "LOG_LEVEL", _text, "INFO",
            "Log level of the `webchat` loggers (DEBUG, INFO, WARNING, ...)."),
    Setting("WEBCHAT_LOG_FORMAT", "LOG_FORMAT", _log_format, "json",
            "`json`: one JSON object per log line on stdout, with the request id; `text` for "
            "people."),
    Setting("WEBCHAT_EMBED_ORIGINS", "EMBED_ORIGINS", _origins, [],
            "Comma-separated origins of the sites allowed to show /embed in a frame "
            "(e.g. `https://intranet.example.com`). Empty: /embed cannot be framed."),
    Setting("WEBCHAT_TRUSTED_USER_HEADER", "TRUSTED_USER_HEADER", _header_name, None,
            "Header in which a sign-in proxy names the user (e.g. `X-Forwarded-User`); "
            "conversations then belong to that user. Off when empty."),
    Setting("WEBCHAT_TRUSTED_PROXIES", "TRUSTED_PROXIES", _networks, [],
            "Comma-separated addresses or CIDR ranges of the proxies allowed to send the "
            "user header (compared with the direct peer address)."),
    Setting("WEBCHAT_PROXY_HOPS", "PROXY_HOPS", _non_negative_int, 0,
            "How many reverse proxies stand in front of webchat; their X-Forwarded-For/-Proto/"
            "-Host/-Port are believed for that many hops. 0: none are believed."),
    Setting("WEBCHAT_METRICS_TOKEN", "METRICS_TOKEN", _token, None,
            "Bearer token that /metrics requires. Unset: /metrics answers 404."),
)


def load_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read every setting from ``environ`` (default: the process environment).

    Raises ConfigError naming the first variable whose value does not parse.
    """
    environ = os.environ if environ is None else environ
    config: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is None or (raw == "" and setting.default is not None):
            config[setting.key] = setting.default
            continue
        try:
            config[setting.key] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{setting.env}={raw!r} is invalid: {exc}") from None
    return config
