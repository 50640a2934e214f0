"""Settings from the environment: declared once, validated, documented.

Each setting is one row of ``SETTINGS``. A bad value stops start-up with a
``ConfigError`` that names the variable. The README's settings table is checked
against this table by a test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


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


SETTINGS: tuple[Setting, ...] = (
    Setting("SECRET_KEY", "SECRET_KEY", _text, None,
            "Signs the session cookie. Required unless WEBCHAT_DEV=1; use a long random string."),
    Setting("DATABASE_URL", "DATABASE_URL", _text, None,
            "Where conversations are stored. Default: a SQLite file `webchat.sqlite3` in the "
            "instance folder; `sqlite:///path/to/file.sqlite3` chooses another file."),
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
    Setting("WEBCHAT_COALESCE_MS", "COALESCE_MS", _positive_int, 40,
            "Updates of a streaming reply are gathered into windows of this many milliseconds."),
    Setting("WEBCHAT_PING_SECONDS", "PING_SECONDS", _positive_float, 15.0,
            "A keep-alive comment is sent on a silent stream this often."),
    Setting("WEBCHAT_CHECKPOINT_SECONDS", "CHECKPOINT_SECONDS", _positive_float, 0.5,
            "A streaming reply's text is saved to the store at least this often."),
    Setting("WEBCHAT_LOG_LEVEL", "LOG_LEVEL", _text, "INFO",
            "Log level of the `webchat` loggers (DEBUG, INFO, WARNING, ...)."),
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
