"""How rendering a streamed reply scales with its length (markdown on the server).

    python bench/render_cost.py            # 1k, 10k and 50k-token replies
    python bench/render_cost.py --json out.json

A reply of mixed prose, lists, tables and code is fed to the same incremental
renderer the streams use (``webchat.render.StreamRenderer.feed_growing``), a few
tokens per update as a coalesced stream would deliver it, and every update is
encoded into the SSE events a browser would receive (``webchat.sse``). Reported per size:
server CPU seconds for the whole reply, CPU per 1k tokens, the ratio to the 1k
reply (linear growth means ratio ~= size ratio; the goal is the 50k reply under
~60x the 1k reply), and the bytes sent over the stream against the bytes of the
final HTML (goal: under 3x). A one-shot ``render_markdown`` of the whole text is
measured in the same run as the reference.
"""

from __future__ import annotations

import argparse
import html
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webchat.backends.demo import tokenize  # noqa: E402
from webchat.render import StreamRenderer, render_markdown  # noqa: E402
from webchat.sse import encode_event  # noqa: E402

PROSE = ("Streaming replies should feel instant, and the server should not pay more for the "
         "thousandth token than for the first. Here is *some emphasis*, a bit of **bold**, "
         "`inline code` and a [link](https://example.com/docs).")
LIST = "\n".join(f"- item {i}: keep the cost of each block constant" for i in range(6))
TABLE = "| size | tokens | note |\n|---|---:|---|\n" + "\n".join(
    f"| {i} | {i * 100} | row {i} |" for i in range(5))
CODE = "```python\n" + "\n".join(
    f"def step_{i}(x: int) -> int:\n    return x * {i} + 1  # a comment" for i in range(6)) + "\n```"
QUOTE = "> A quoted remark that spans a line\n> and another one."
SECTIONS = [PROSE, LIST, TABLE, CODE, QUOTE, "## A heading\n\n" + PROSE]


def make_reply(tokens: int, seed: int = 7) -> str:
    """Return a mixed markdown reply of about ``tokens`` word-sized tokens."""
    rng = random.Random(seed)
    parts: list[str] = []
    count = 0
    while count < tokens:
        section = rng.choice(SECTIONS)
        parts.append(section)
        count += len(tokenize(section)) + 1
    return "\n\n".join(parts)


def done_html(text: str) -> str:
    """Render the real `done` payload (webchat's message macro) for a finished reply."""
    import tempfile

    from flask import get_template_attribute

    from webchat import create_app
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"TESTING": True, "BACKEND": "demo",
                          "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3"})
        with app.test_request_context("/"):
            row = {"id": "m" * 22, "conversation_id": "c" * 22, "role": "assistant",
                   "status": "complete", "content": text, "reasoning": "", "error": "",
                   "model": "demo", "completion_tokens": len(tokenize(text)),
                   "first_token_ms": 120, "tokens_per_second": 40.0, "created_at": 0.0}
            macro = get_template_attribute("_partials.html", "message")
            return str(macro(row, "c" * 22, keep_body=True))


def stream_cost(text: str, tokens_per_update: int) -> dict[str, float]:
    """Feed ``text`` as a stream would and return CPU seconds and bytes sent."""
    pieces = tokenize(text)
    done = done_html(text)  # rendered outside the clock: it needs an app
    renderer = StreamRenderer()
    sent = 0
    so_far = ""
    started = time.process_time()
    for start in range(0, len(pieces), tokens_per_update):
        so_far += "".join(pieces[start:start + tokens_per_update])
        # Exactly what webchat.runs.Runner.tail sends: a delta when a block
        # finishes (finished blocks + the new tail), else the new raw text.
        blocks, tail, grown = renderer.feed_growing(so_far)
        if tail is not None:
            data = ("<div hx-swap-oob=\"beforeend:#b-x\">" + "".join(blocks) + "</div>"
                    if blocks else "") + tail
            sent += len(encode_event("delta", data, str(len(so_far))))
        elif grown:
            sent += len(encode_event("text", html.escape(grown), str(len(so_far))))
    # The end: one last delta brings the body to its final form, then `done`
    # replaces the message around the body the page keeps (hx-preserve).
    blocks, tail = renderer.feed(text)
    data = ("<div hx-swap-oob=\"beforeend:#b-x\">" + "".join(blocks) + "</div>"
            if blocks else "") + tail
    sent += len(encode_event("delta", data, str(len(text))))
    sent += len(encode_event("done", done, str(len(text))))
    cpu = time.process_time() - started
    final = render_markdown(text)
    return {"cpu_s": cpu, "stream_bytes": sent, "final_html_bytes": len(final.encode())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--tokens-per-update", type=int, default=3,
                        help="tokens per coalesced update (~40 ms at 75 tokens/s)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        text = make_reply(size)
        token_count = len(tokenize(text))
        cost = stream_cost(text, args.tokens_per_update)
        started = time.process_time()
        render_markdown(text)
        one_shot = time.process_time() - started
        rows.append({"tokens": token_count, "chars": len(text), **cost, "one_shot_s": one_shot})
    base = rows[0]
    print(f"{'tokens':>8} {'stream CPU s':>12} {'µs/token':>9} {'x 1k':>6} {'size x':>7}"
          f" {'one-shot s':>10} {'bytes/final':>11}")
    for row in rows:
        row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
        row["size_ratio"] = row["tokens"] / base["tokens"]
        row["bytes_ratio"] = row["stream_bytes"] / row["final_html_bytes"]
        print(f"{row['tokens']:>8} {row['cpu_s']:>12.3f} {row['cpu_s'] / row['tokens'] * 1e6:>9.1f}"
              f" {row['cpu_ratio']:>6.1f} {row['size_ratio']:>7.1f} {row['one_shot_s']:>10.3f}"
              f" {row['bytes_ratio']:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
