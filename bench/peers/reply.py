"""The reply every peer server streams: same tokens, same pacing, same HTML sizes.

Webchat's demo backend yields token 0 at once and token i at start + i/R; so
do the peers. The event data imitates webchat's fragments (a snapshot of the
empty body, a delta holding the open paragraph plus finished ones out of band,
a done holding the whole message and its source) without markdown or templates.
``node_http.js`` holds the same logic in JavaScript.
"""

from __future__ import annotations

from html import escape

PARAGRAPH_TOKENS = 30
WORDS = ("stream", "token", "reply", "model", "server", "gevent", "worker", "socket",
         "event", "chunk", "render", "html", "bytes", "tail", "block", "greenlet")


def token(index: int) -> str:
    """Return token ``index``: a word after a space, or after a paragraph break."""
    word = WORDS[index % len(WORDS)]
    if index == 0:
        return word
    return ("\n\n" if index % PARAGRAPH_TOKENS == 0 else " ") + word


def snapshot_html(sid: str) -> str:
    """Return the snapshot of an empty reply."""
    return f'<div class="blocks" id="b-{sid}"></div><div class="tail" id="t-{sid}"></div>'


class Reply:
    """The text so far, and what the next delta must carry."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.text = ""
        self.paragraph = ""
        self.finished = ""

    def add(self, index: int) -> None:
        """Append token ``index``."""
        piece = token(index)
        if piece.startswith("\n\n"):
            self.finished += f"<p>{escape(self.paragraph)}</p>"
            self.paragraph = piece[2:]
        else:
            self.paragraph += piece
        self.text += piece

    def delta_html(self) -> str:
        """Return the next delta: newly finished paragraphs out of band, then the open one."""
        oob = (f'<div hx-swap-oob="beforeend:#b-{self.sid}">{self.finished}</div>'
               if self.finished else "")
        self.finished = ""
        return f"{oob}<p>{escape(self.paragraph)}</p>"

    def done_html(self, tokens: int) -> str:
        """Return the final message: every paragraph, a footer and the source text."""
        paragraphs = "".join(f"<p>{escape(p)}</p>" for p in self.text.split("\n\n"))
        return (f'<article class="msg assistant" id="m-{self.sid}" data-status="complete">'
                f'<div class="bubble"><div class="blocks">{paragraphs}</div>'
                f'<footer class="meta"><span>{tokens} tokens</span></footer>'
                f'<template class="source">{escape(self.text)}</template></div></article>')
