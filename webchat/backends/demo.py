"""The demo backend: an offline, deterministic stand-in for a model.

It exists for tests and for machines without a model. Its replies say plainly
that they come from the demo and show off what the page renders: paragraphs, a
list, a fenced code block, Chinese text and emoji.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

from .base import BackendError, ChatMessage, Delta, Settings

MODEL = "demo"
_TOKEN = re.compile(r"\s*\S+|\s+")

TEMPLATE = """\
This is the **demo model**: a built-in stand-in that needs no key and no network. \
It repeats what you said and shows what replies can look like.

You wrote: “{quote}”

Here is what a reply can contain:

1. Paragraphs with *emphasis*, **bold** and `inline code`.
2. Lists, like this one.
3. Text in any language: 你好，世界！这是演示模型的回复。 👋🌍

```python
def greet(name: str) -> str:
    return f"Hello, {{name}}!"
```

To talk to a real model, start webchat with `OPENAI_API_KEY` (and `OPENAI_BASE_URL` for \
another provider) or install the built-in local model, and set `WEBCHAT_BACKEND`."""


# The reply around the quote, shared by every stream: a stream holds only its quote.
_BEFORE, _AFTER = TEMPLATE.format(quote="\0").split("\0")


_LONG = re.compile(r"/long\s+(\d{1,6})")
MAX_REPEATS = 1000  # a "/long N" reply repeats the demo reply at most this often


def _last_user_message(messages: list[ChatMessage]) -> str:
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


def _quote(messages: list[ChatMessage]) -> str:
    quote = " ".join(_last_user_message(messages).split())
    return quote[:199] + "…" if len(quote) > 200 else quote


def _repeats(messages: list[ChatMessage]) -> int:
    """Return how often the reply repeats: N for a message ``/long N``, else once."""
    match = _LONG.fullmatch(_last_user_message(messages).strip())
    return min(max(int(match.group(1)), 1), MAX_REPEATS) if match else 1


def demo_reply(messages: list[ChatMessage]) -> str:
    """Return the full reply the demo gives to this conversation."""
    return "\n\n".join([_BEFORE + _quote(messages) + _AFTER] * _repeats(messages))


def _parts(messages: list[ChatMessage]) -> Iterator[str]:
    quote = _quote(messages)
    for repeat in range(_repeats(messages)):
        if repeat:
            yield "\n\n"
        yield from (_BEFORE, quote, _AFTER)


def demo_tokens(messages: list[ChatMessage]) -> Iterator[str]:
    """Yield the tokens of ``demo_reply(messages)``, exactly as ``tokenize`` splits it.

    The parts are tokenized one by one (so that no stream holds a copy of the whole
    reply); a token that a part boundary cuts is joined again.
    """
    pending = ""  # the last token of the parts so far: the next part may continue it
    for part in _parts(messages):
        for match in _TOKEN.finditer(part):
            token = match.group()
            if pending and (pending.isspace()
                            or (not pending[-1].isspace() and not token[0].isspace())):
                token = pending + token
            elif pending:
                yield pending
            pending = token
    if pending:
        yield pending


def tokenize(text: str) -> list[str]:
    """Split text into word-sized tokens whose concatenation is the text."""
    return _TOKEN.findall(text)


class DemoBackend:
    """Stream ``demo_reply`` token by token at a steady pace."""

    name = "demo"

    def __init__(self, tokens_per_second: float = 40.0, batch_seconds: float = 0.02) -> None:
        self.tokens_per_second = tokens_per_second
        self.batch_seconds = batch_seconds

    def models(self) -> list[str]:
        """Return the one demo model."""
        return [MODEL]

    def stream(self, messages: list[ChatMessage], settings: Settings) -> Iterator[Delta]:
        """Yield the demo reply, one word every 1/tokens_per_second seconds.

        Caveat: above 1/batch_seconds tokens per second, the words due come
        together in one delta (each late by less than ``batch_seconds``).

        A user message of exactly ``/error`` makes the demo fail half-way, so the
        error path can be seen and tested; ``/long N`` makes it repeat its reply N
        times (at most ``MAX_REPEATS``), for a long reply.
        """
        # Tokens are found as they go, not kept in a list (nor the reply): a list of
        # ~200 small strings per reply cost more memory than the rest of a stream.
        tokens = 0
        failing = bool(messages) and messages[-1].content.strip() == "/error"
        fail_at = sum(1 for _ in demo_tokens(messages)) // 2 if failing else -1
        yield Delta(model=MODEL)
        start = woke = time.monotonic()
        interval = 1.0 / self.tokens_per_second
        due_now: list[str] = []  # tokens due and not yet yielded
        for index, token in enumerate(demo_tokens(messages)):
            if index == fail_at:
                if due_now:
                    yield Delta(text="".join(due_now))
                raise BackendError("The demo model failed on purpose (you sent /error).")
            due = start + index * interval
            now = time.monotonic()
            if due > now:
                if due_now:
                    yield Delta(text="".join(due_now))
                    due_now = []
                # Faster than one token per ``batch_seconds``, the tokens due meanwhile
                # come out together, in one delta, as a fast upstream's network reads
                # bring several: a wake and a delta per token at 1,000 tokens/s would
                # cost more than the rest.
                time.sleep(max(due, woke + self.batch_seconds) - now)
                woke = time.monotonic()
            due_now.append(token)
            tokens += 1
        if due_now:
            yield Delta(text="".join(due_now))
        yield Delta(finish_reason="stop",
                    usage={"prompt_tokens": sum(len(tokenize(m.content)) for m in messages),
                           "completion_tokens": tokens})
