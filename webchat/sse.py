"""The one Server-Sent Events encoder: every SSE byte webchat sends comes from here.

Follows the WHATWG event-stream rules: LF line endings; every line break inside
data (CRLF, lone CR, lone LF) starts a new ``data:`` line, so no text can end an
event early or forge a field; ``event`` and ``id`` values never contain CR, LF
or NUL (the spec ignores an ``id`` with NUL).
"""

from __future__ import annotations

import re

# Event names: the one place they are spelled.
SNAPSHOT = "snapshot"  # replace the reply body with everything so far
DELTA = "delta"  # replace the still-open last block (and append newly finished ones, out of band)
TEXT = "text"  # append raw (escaped) text to the still-open block
THINK = "think"  # replace the reasoning ("Thinking") text
THOUGHT = "thought"  # append new reasoning text
STATUS = "status"  # replace the reply's status line (queued, generating)
DONE = "done"  # replace the whole message with its final form; closes the stream
ERROR = "error"  # replace the whole message with its error form; closes the stream

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FIELD_UNSAFE = re.compile(r"[\r\n\x00]")


def encode_event(event: str, data: str, event_id: str | None = None) -> bytes:
    """Encode one named event whose data may span many lines.

    Caveat: an empty ``data`` still produces one ``data:`` line, so the browser
    dispatches the event (an event without any data line is silently dropped).
    """
    # Letters and digits need no cleaning (the names and ids webchat sends, one event
    # per token: the check is cheaper than the substitution).
    head = f"event: {event if event.isalnum() else _FIELD_UNSAFE.sub('', event)}\n"
    if event_id is not None:
        head += f"id: {event_id if event_id.isalnum() else _FIELD_UNSAFE.sub('', event_id)}\n"
    if "\n" in data or "\r" in data:
        data = "\ndata: ".join(_LINE_BREAK.split(data))
    # One event per token: this is the hot path, hence one f-string, not a list.
    return f"{head}data: {data}\n\n".encode()


def encode_comment(text: str = "") -> bytes:
    """Encode a comment line (a keep-alive the client ignores)."""
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode() + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """Encode the reconnection delay the browser should use."""
    return f"retry: {int(milliseconds)}\n\n".encode()
