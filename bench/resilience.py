"""What surviving costs: stop latency, reconnect latency, checkpoint lag, store writes.

    python bench/resilience.py [--trials 20]

All on 127.0.0.1, bounded in count and time, in one run:

- stop -> upstream disconnect: a reply streams from a local OpenAI-compatible
  upstream (tests/upstream.py, 20 tokens/s); the user presses Stop (POST .../stop);
  measured until the upstream sees its client hang up. Same instance, and a second
  gunicorn instance on the same SQLite file (the stop travels through the store).
- reconnect -> first event: a new stream connection to a reply in progress, until
  its first event (the snapshot) arrives.
- checkpoint lag: how long after the client received text the store holds it
  (the store polled every 10 ms during a reply).
- store writes per reply: worker CPU for the same replies with checkpoints every
  0.5 s vs none until the end, divided by the replies.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chat_client import ChatClient  # noqa: E402
from tests.conftest import Server, start_server  # noqa: E402
from tests.upstream import Reply, Upstream  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def stop_latency(up: Upstream, starter: Server, stopper: Server, trials: int) -> list[float]:
    latencies = []
    for _ in range(trials):
        up.next(Reply.generated(tokens=400, rate=20))
        a = ChatClient(starter.url)
        b = ChatClient(stopper.url)
        try:
            _, url = a.send("count slowly")
            a.events(url, stop_after=3)
            received = up.requests[-1]
            b.http.cookies = a.http.cookies
            b.open()
            asked = time.monotonic()
            b.post(url.removesuffix("/stream") + "/stop")
            assert received.disconnected.wait(5), "the upstream never saw the stop"
            latencies.append(received.disconnected_at - asked)
            a.events(url)  # to the end: stopped
        finally:
            a.close()
            b.close()
    return latencies


def reconnect_latency(server: Server, trials: int) -> list[float]:
    latencies = []
    client = ChatClient(server.url)
    try:
        for _ in range(trials):
            _, url = client.send("reconnect to me")
            client.events(url, stop_after=5)
            started = time.monotonic()
            first = next(client.iter_events(url))
            latencies.append(first.at - started)
            client.events(url)
    finally:
        client.close()
    return latencies


def checkpoint_lag(server: Server, replies: int) -> list[float]:
    lags: list[float] = []
    client = ChatClient(server.url)
    try:
        for _ in range(replies):
            _, url = client.send("how far behind is the store?")
            mid = url.split("/")[4]
            stored: list[tuple[float, int]] = []
            done = threading.Event()

            def poll(message_id: str = mid) -> None:
                with sqlite3.connect(server.database) as db:
                    while not done.is_set():
                        row = db.execute("SELECT length(content), status FROM messages"
                                         " WHERE id = ?", (message_id,)).fetchone()
                        stored.append((time.monotonic(), row[0]))
                        time.sleep(0.01)

            poller = threading.Thread(target=poll)
            poller.start()
            seen = [(e.at, int(e.id)) for e in client.events(url) if e.name in ("text", "delta")]
            done.set()
            poller.join()
            for at, length in seen[:-1]:  # the last one is saved by the end, not a checkpoint
                saved = next((t for t, n in stored if n >= length), None)
                if saved is not None:
                    lags.append(max(0.0, saved - at))
    finally:
        client.close()
    return lags


def store_cost(tmp: Path, replies: int) -> dict[str, float]:
    costs = {}
    for label, interval in (("checkpoints every 0.5 s", "0.5"), ("no checkpoints", "100000")):
        server = start_server(tmp / label.replace(" ", "-"), env={
            "WEBCHAT_DEMO_TOKENS_PER_SECOND": "40", "WEBCHAT_CHECKPOINT_SECONDS": interval,
            "WEBCHAT_MESSAGES_PER_MINUTE": "10000"})
        clients = [ChatClient(server.url) for _ in range(replies)]
        try:
            before = cpu_seconds(server.worker_pids())
            urls = [c.send("measure the store")[1] for c in clients]
            threads = [threading.Thread(target=c.events, args=(u,)) for c, u in zip(
                clients, urls, strict=True)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            costs[label] = (cpu_seconds(server.worker_pids()) - before) / replies
        finally:
            for client in clients:
                client.close()
            server.stop()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    for name in ("a", "b", "demo", "checkpoints-every-0.5-s", "no-checkpoints"):
        (tmp / name).mkdir()
    results: dict[str, Any] = {}
    with Upstream() as up:
        env = {"WEBCHAT_BACKEND": "openai", "OPENAI_BASE_URL": up.url, "OPENAI_API_KEY": "x",
               "WEBCHAT_MODELS": "m", "WEBCHAT_MESSAGES_PER_MINUTE": "10000"}
        first = start_server(tmp / "a", env=env)
        second = start_server(tmp / "b", env=env, database=first.database)
        try:
            results["stop_same_instance_s"] = stop_latency(up, first, first, args.trials)
            results["stop_other_instance_s"] = stop_latency(up, first, second, args.trials)
        finally:
            first.stop()
            second.stop()
    demo = start_server(tmp / "demo", env={"WEBCHAT_DEMO_TOKENS_PER_SECOND": "20",
                                           "WEBCHAT_MESSAGES_PER_MINUTE": "10000"})
    try:
        results["reconnect_first_event_s"] = reconnect_latency(demo, args.trials)
        results["checkpoint_lag_s"] = checkpoint_lag(demo, 3)
    finally:
        demo.stop()
    results["worker_cpu_per_reply_s"] = store_cost(tmp, 20)
    for key, values in results.items():
        if isinstance(values, list):
            print(f"{key:28} p50 {pct(values, 0.5) * 1000:7.1f} ms   p99 "
                  f"{pct(values, 0.99) * 1000:7.1f} ms   (n={len(values)})")
    costs = results["worker_cpu_per_reply_s"]
    for label, value in costs.items():
        print(f"worker CPU per reply, {label:24} {value * 1000:7.1f} ms")
    extra = costs["checkpoints every 0.5 s"] - costs["no checkpoints"]
    print(f"store checkpoints cost {extra * 1000:.1f} ms of CPU per ~2.5 s reply "
          f"({extra / costs['no checkpoints'] * 100:.0f}% of the reply's CPU)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
