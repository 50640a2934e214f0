"""Apply a stream's events the way the page's htmx swaps do, to check what a reader sees."""

from __future__ import annotations

import re

from .chat_client import Event

_SNAPSHOT = re.compile(r'^<div class="blocks" id="b-[^"]+" hx-disable>(.*)</div>'
                       r'<div class="tail" id="t-[^"]+" hx-disable>(.*)</div>$', re.S)


class Reader:
    """The reply body as the page holds it: finished blocks plus the open tail."""

    def __init__(self) -> None:
        self.blocks = ""
        self.tail = ""
        self.final: str | None = None
        self.last_id = ""

    def apply(self, event: Event) -> None:
        self.last_id = event.id or self.last_id
        if event.name == "snapshot":
            match = _SNAPSHOT.match(event.data)
            assert match, f"unexpected snapshot: {event.data[:200]!r}"
            self.blocks, self.tail = match.group(1), match.group(2)
        elif event.name == "delta":
            data = event.data
            if data.startswith('<div hx-swap-oob="beforeend:'):
                _, _, rest = data.partition(">")
                # The out-of-band wrapper ends right before the new tail begins.
                body, tail = _split_oob(rest)
                self.blocks += body
                self.tail = tail
            else:
                self.tail = data
        elif event.name == "text":
            # Raw text grows inside the tail's span.grow (escaped by the server).
            marker = '<span class="grow">'
            at = self.tail.rindex(marker) + len(marker)
            end = self.tail.index("</span>", at)
            self.tail = self.tail[:end] + event.data + self.tail[end:]
        elif event.name in ("done", "error"):
            self.final = event.data

    @property
    def html(self) -> str:
        return self.blocks + self.tail


def _split_oob(rest: str) -> tuple[str, str]:
    # Find the </div> that closes the wrapper by counting nested divs.
    depth = 1
    for match in re.finditer(r"<div\b|</div>", rest):
        depth += 1 if match.group(0) != "</div>" else -1
        if depth == 0:
            return rest[: match.start()], rest[match.end():]
    raise AssertionError("unterminated out-of-band wrapper")
