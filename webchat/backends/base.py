"""The interface every backend implements, and the one error it may raise."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


class BackendError(Exception):
    """A failure of the model backend, with a message that is safe to show the user.

    The message must never contain secrets (API keys, full upstream URLs with
    credentials). ``retry_after`` is set when the upstream asked us to wait.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class ChatMessage:
    """One turn of the conversation as sent to a model."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Settings:
    """Per-reply generation settings."""

    model: str = ""
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass
class Delta:
    """One piece of a streamed reply; every field is optional.

    ``text`` and ``reasoning`` are appended to what came before. ``usage`` is a
    dict with ``prompt_tokens`` / ``completion_tokens`` when the backend knows them.
    ``finish_reason`` is ``"stop"``, ``"length"``, ``"content_filter"`` or another
    provider string. ``model`` is the model that actually answered.
    """

    text: str = ""
    reasoning: str = ""
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    model: str | None = None
    queued: bool | None = field(default=None)  # True while waiting for a busy local model


class Backend(Protocol):
    """A source of streamed replies."""

    name: str

    def models(self) -> list[str]:
        """Return the model names a user may pick (the first is the default)."""
        ...

    def stream(self, messages: list[ChatMessage], settings: Settings) -> Iterator[Delta]:
        """Yield the reply as deltas; raise BackendError on failure.

        Closing the iterator (``.close()``) must cancel the upstream work promptly
        (close the HTTP connection, stop the local generation).
        """
        ...
