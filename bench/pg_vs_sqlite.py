"""Two webchat instances on PostgreSQL against one on SQLite, measured in the same run.

    python bench/pg_vs_sqlite.py               # about 4 minutes
    python bench/pg_vs_sqlite.py --quick       # a smoke run, about 1 minute
    python bench/pg_vs_sqlite.py --write-doc   # also rewrite docs/benchmarks-postgres.md

Configurations, with the same number of gunicorn gevent workers (2) in each:

- ``sqlite``: one instance with 2 workers on a SQLite file (WAL).
- ``postgresql``: two instances with 1 worker each on one PostgreSQL database: a
  fresh one, dropped at the end, made on the server at ``--postgres`` (default:
  WEBCHAT_BENCH_POSTGRES_URL, WEBCHAT_TEST_POSTGRES_URL, else the local server).

What is measured, with the demo model:

1. Replies per second: C clients each send a message and read its reply to the end,
   again and again for D seconds, the model at 2,000 tokens/s (so the server and the
   store are the limit). Each reply is POSTed to one instance and streamed from the
   other, as a load balancer without sticky sessions would send them (SQLite: both to
   its one instance).
2. Concurrent streams: N users at 20 tokens/s, N on a grid, all started within 2 s.
   Every token's lag behind the model's pace (from the stream's first event) gives
   p50/p95/p99; N passes if every reply completes with lag p99 <= 100 ms and its
   first event (after the POST) within 500 ms (p99). One user in
   ten also keeps a second tab open on the other instance (SQLite: the same
   instance), following a reply written elsewhere: "second-tab lag".

Both configurations run at once and are measured one after the other, row by row,
so that load from elsewhere on a shared machine falls on both alike.

CPU seconds of the servers (and of PostgreSQL's processes) are read from /proc.
Only 127.0.0.1 is used; the load is bounded (streams, seconds); the harness stops
only the processes it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webchat.backends.base import ChatMessage  # noqa: E402
from webchat.backends.demo import demo_reply, tokenize  # noqa: E402

DOC = ROOT / "docs" / "benchmarks-postgres.md"
MESSAGE = "Tell me something about zebras and their stripes, please."
LAG_P99_MS = 100.0
FIRST_EVENT_P99_MS = 500.0
CSRF_RE = re.compile(rb'name="csrf_token" value="([^"]+)"')
SSE_CONNECT_RE = re.compile(rb'sse-connect="([^"]+)"')
TICKS = os.sysconf("SC_CLK_TCK")
SECRET_KEY = secrets.token_urlsafe(32)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Processes ---------------------------------------------------------------------

def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return total


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Instance:
    """One gunicorn server of webchat, started (and stopped, by PID) by this harness."""

    def __init__(self, database_url: str, workers: int, rate: float, logs: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "SECRET_KEY": SECRET_KEY,  # the same in every instance: one session cookie for all
            "DATABASE_URL": database_url,
            "WEBCHAT_BACKEND": "demo",
            "WEBCHAT_DEMO_TOKENS_PER_SECOND": f"{rate:g}",
            "WEBCHAT_LOG_LEVEL": "WARNING",
            # All the load comes from one address: lift the limits (not what is measured).
            "WEBCHAT_ADDRESS_MESSAGES_PER_MINUTE": "1000000000",
            "WEBCHAT_ADDRESS_REPLIES_IN_FLIGHT": "1000000000",
            "WEBCHAT_MESSAGES_PER_MINUTE": "1000000000",
            "WEBCHAT_REPLIES_IN_FLIGHT": "1000000000",
        }
        self.log = open(logs / f"webchat-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:webchat.gunicorn_conf",
             "--workers", str(workers), "--bind", f"127.0.0.1:{self.port}",
             "--access-logfile", "/dev/null", "webchat:create_app()"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers = workers

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"webchat exited at start; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=2) as response:
                    if response.status == 200 and len(children(self.process.pid)) >= self.workers:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"webchat not ready after {timeout} s; see {self.log.name}")

    def pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# A small HTTP/1.1 + SSE client on asyncio ----------------------------------------

@dataclass
class Tab:
    """One browser session: its cookies and CSRF token."""

    cookies: dict[str, str] = field(default_factory=dict)
    csrf: str = ""

    def header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())


async def read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers.append((name.strip().lower(), value.strip()))
    return status, headers


async def chunks(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> Any:
    if ("transfer-encoding", "chunked") in headers:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    length = next((int(v) for k, v in headers if k == "content-length"), None)
    yield await (reader.readexactly(length) if length is not None else reader.read())


async def request(port: int, method: str, path: str, tab: Tab,
                  form: dict[str, str] | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = urllib.parse.urlencode(form).encode() if form is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                f"HX-Request: true\r\nX-CSRF-Token: {tab.csrf}\r\nCookie: {tab.header()}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        writer.write(head.encode() + body)
        status, headers = await read_head(reader)
        for name, value in headers:
            if name == "set-cookie":
                key, _, val = value.split(";", 1)[0].partition("=")
                tab.cookies[key.strip()] = val.strip()
        data = b"".join([chunk async for chunk in chunks(reader, headers)])
        return status, data
    finally:
        writer.close()


async def open_tab(port: int) -> Tab:
    tab = Tab()
    status, page = await request(port, "GET", "/", tab)
    match = CSRF_RE.search(page)
    if status != 200 or not match:
        raise RuntimeError(f"GET / answered {status}")
    tab.csrf = match.group(1).decode()
    return tab


async def send(port: int, tab: Tab, text: str) -> str:
    status, body = await request(port, "POST", "/chat", tab, {"text": text, "conversation": ""})
    match = SSE_CONNECT_RE.search(body)
    if status != 200 or not match:
        raise RuntimeError(f"POST /chat answered {status}")
    return match.group(1).decode()


async def stream(port: int, path: str, tab: Tab, first: asyncio.Event | None = None
                 ) -> list[tuple[float, str, int]]:
    """Read a reply's event stream to its end; return (arrival, event, id) of each event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    events: list[tuple[float, str, int]] = []
    try:
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Accept: text/event-stream\r\nCookie: {tab.header()}\r\n\r\n").encode())
        status, headers = await read_head(reader)
        if status != 200:
            raise RuntimeError(f"stream answered {status}")
        buffer = b""
        async for chunk in chunks(reader, headers):
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                name, event_id = "message", None
                for line in raw.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip().decode()
                    elif line.startswith(b"id:"):
                        event_id = int(line[3:].strip() or 0)
                if event_id is None:
                    continue  # retry: or a ping comment
                events.append((time.monotonic(), name, event_id))
                if first is not None:
                    first.set()
                if name in ("done", "error"):
                    return events
    finally:
        writer.close()
    return events


def token_lags(events: list[tuple[float, str, int]], ends: list[int], rate: float) -> list[float]:
    """Seconds each token arrived after the model's pace would have it (from the first event)."""
    if not events:
        return []
    start = events[0][0]
    lags = []
    index = 0
    for j, end in enumerate(ends):
        while index < len(events) and events[index][2] < end:
            index += 1
        if index == len(events):
            break
        lags.append(max(0.0, events[index][0] - (start + j / rate)))
    return lags


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99)}


# The measurements ------------------------------------------------------------------

async def replies_per_second(ports: list[int], clients: int, seconds: float
                             ) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    durations: list[float] = []
    failures = 0

    async def client(k: int) -> None:
        nonlocal failures
        tab = await open_tab(ports[k % len(ports)])
        i = 0
        while time.monotonic() < deadline:
            post, read = ports[(k + i) % len(ports)], ports[(k + i + 1) % len(ports)]
            i += 1
            started = time.monotonic()
            try:
                path = await send(post, tab, f"{MESSAGE} ({k}.{i})")
                events = await asyncio.wait_for(stream(read, path, tab), 60)
            except (TimeoutError, OSError, RuntimeError):
                failures += 1
                continue
            if events and events[-1][1] == "done":
                durations.append(time.monotonic() - started)
            else:
                failures += 1

    started = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.monotonic() - started
    return {"clients": clients, "seconds": round(elapsed, 1), "replies": len(durations),
            "replies_per_second": round(len(durations) / elapsed, 1), "failures": failures,
            "reply_ms": quantiles(durations)}


async def concurrent_streams(ports: list[int], users: int, rate: float) -> dict[str, Any]:
    lags: list[float] = []
    second_lags: list[float] = []
    completed = 0
    failures = 0
    first_event: list[float] = []

    async def user(k: int) -> None:
        nonlocal completed, failures
        await asyncio.sleep(2.0 * k / users)  # the ramp
        text = f"{MESSAGE} ({k})"
        reply_ends = _ends(text)
        post, read = ports[k % len(ports)], ports[(k + 1) % len(ports)]
        try:
            tab = await open_tab(post)
            path = await send(post, tab, text)
            began = time.monotonic()
            first = asyncio.Event()
            main = asyncio.create_task(asyncio.wait_for(stream(read, path, tab, first), 120))
            second = None
            if k % 10 == 0:
                # Once the main tab has claimed the reply (or failed).
                await asyncio.wait([main, asyncio.create_task(first.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)
                second = asyncio.create_task(asyncio.wait_for(stream(post, path, tab), 120))
            events = await main
            if events and events[-1][1] == "done":
                completed += 1
                lags.extend(token_lags(events, reply_ends, rate))
                first_event.append(events[0][0] - began)
            else:
                failures += 1
            if second is not None:
                other = await second
                # Against the main tab: how far behind a tab on another instance is.
                for at, _name, event_id in other[1:]:
                    seen = min((t for t, _n, i in events if i >= event_id), default=at)
                    second_lags.append(max(0.0, at - seen))
        except (TimeoutError, OSError, RuntimeError):
            failures += 1

    await asyncio.gather(*(user(k) for k in range(users)))
    lag = quantiles(lags)
    return {"users": users, "completed": completed, "failures": failures,
            "lag_ms": lag, "second_tab_lag_ms": quantiles(second_lags),
            "first_event_ms": quantiles(first_event),
            "pass": failures == 0 and completed == users and (lag["p99"] or 0) <= LAG_P99_MS
            and (quantiles(first_event)["p99"] or 0) <= FIRST_EVENT_P99_MS}


_ends_cache: dict[str, list[int]] = {}


def _ends(text: str) -> list[int]:
    if text not in _ends_cache:
        reply = demo_reply([ChatMessage("user", text)])
        ends, at = [], 0
        for token in tokenize(reply):
            at += len(token)
            ends.append(at)
        _ends_cache[text] = ends
    return _ends_cache[text]


def measure(configs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Measure every configuration, interleaved so that they share the machine's mood.

    For each phase all configurations' instances run at once (an idle one costs
    little); each measurement is taken for one configuration after the other.
    """
    results: dict[str, Any] = {name: {"replies": [], "streams": []} for name in configs}
    for phase, rate in (("replies", 2000.0), ("streams", 20.0)):
        running = {name: make(rate) for name, make in configs.items()}
        try:
            for instances in running.values():
                for instance in instances:
                    instance.wait_ready()
            if phase == "replies":
                for round_ in range(args.rounds):
                    for name, instances in running.items():
                        log(f"{name}: replies per second, {args.clients} clients, "
                            f"{args.seconds:g} s (round {round_ + 1})")
                        data = _measured(instances, replies_per_second(
                            [i.port for i in instances], args.clients, args.seconds))
                        results[name]["replies"].append(data)
                        log(f"  {data['replies_per_second']} replies/s, "
                            f"{data['failures']} failures")
                continue
            overloaded: set[str] = set()
            for users in args.streams:
                for name, instances in running.items():
                    if name in overloaded:
                        continue
                    log(f"{name}: {users} concurrent streams at {rate:g} tokens/s")
                    data = _measured(instances, concurrent_streams(
                        [i.port for i in instances], users, rate))
                    results[name]["streams"].append(data)
                    log(f"  completed {data['completed']}/{users}, lag {data['lag_ms']}, "
                        f"second tab {data['second_tab_lag_ms']}")
                    if data["completed"] < users or max(
                            data["lag_ms"]["p99"] or 0, data["first_event_ms"]["p99"] or 0) > 1000:
                        overloaded.add(name)  # clearly past its limit: no larger N
        finally:
            for instances in running.values():
                for instance in instances:
                    instance.stop()
    return results


def _measured(instances: list[Instance], work: Any) -> dict[str, Any]:
    """Run one measurement; add the CPU the servers and PostgreSQL spent, and the load."""
    pids = [p for i in instances for p in i.pids()]
    load = os.getloadavg()[0]
    before, pg_before = cpu_seconds(pids), cpu_seconds(postgres_pids())
    data: dict[str, Any] = asyncio.run(work)
    data["server_cpu_s"] = round(cpu_seconds(pids) - before, 1)
    data["postgres_cpu_s"] = round(cpu_seconds(postgres_pids()) - pg_before, 1)
    data["load_average"] = round(load, 2)
    return data


def create_database(admin_url: str) -> str:
    import psycopg

    name = f"webchat_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(admin_url)._replace(path=f"/{name}"))


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    name = urllib.parse.urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N and short runs")
    parser.add_argument("--postgres", default=os.environ.get(
        "WEBCHAT_BENCH_POSTGRES_URL", os.environ.get(
            "WEBCHAT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")),
        help="a PostgreSQL server (URL) on which a fresh database is made and dropped")
    parser.add_argument("--write-doc", action="store_true", help=f"rewrite {DOC.name}")
    args = parser.parse_args(argv)
    args.clients = 8 if args.quick else 16
    args.seconds = 6.0 if args.quick else 15.0
    args.streams = [50, 100] if args.quick else [50, 100, 200, 400]
    args.rounds = 1 if args.quick else 2

    logs = Path(tempfile.mkdtemp(prefix="webchat-pg-bench-"))
    pg_url = create_database(args.postgres)
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
    }
    try:
        sqlite_file = logs / "webchat.sqlite3"
        results.update(measure({
            "sqlite": lambda rate: [Instance(f"sqlite:///{sqlite_file}", 2, rate, logs)],
            "postgresql": lambda rate: [Instance(pg_url, 1, rate, logs) for _ in range(2)],
        }, args))
        results["postgres_version"] = _postgres_version(pg_url)
    finally:
        drop_database(args.postgres, pg_url)
    print(json.dumps(results, indent=2))
    if args.write_doc:
        DOC.write_text(report(results), encoding="utf-8")
        log(f"wrote {DOC.relative_to(ROOT)}")
    log(f"server logs in {logs}")


def _postgres_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def report(results: dict[str, Any]) -> str:
    """Render the results as docs/benchmarks-postgres.md."""
    names = {"sqlite": "SQLite, 1 instance", "postgresql": "PostgreSQL, 2 instances"}
    lines = [
        "# Benchmark: two instances on PostgreSQL against one on SQLite",
        "",
        f"Measured by `python bench/pg_vs_sqlite.py{' --quick' if results['quick'] else ''} "
        f"--write-doc` on {results['when']} ({results['machine']}; PostgreSQL "
        f"{results.get('postgres_version', '?')} on the same machine). The machine was "
        "shared with other work (the load average is in each row): read the figures as "
        "a comparison made side by side, not as absolute capacity.",
        "",
        "Both configurations have two gunicorn gevent workers: SQLite, one instance with "
        "two workers; PostgreSQL, two instances with one worker each, on one database. "
        "Both run at the same time and are measured one after the other, row by row. "
        "The client, the servers and PostgreSQL share the same two cores, so PostgreSQL's "
        "own CPU is part of the price (its column). The demo model writes the replies.",
        "",
        "## Replies per second",
        "",
        "Clients send a message and read the whole reply, again and again; the model at "
        "2,000 tokens/s, so the server and the store are the limit. PostgreSQL: each "
        "reply is POSTed to one instance and streamed from the other.",
        "",
        "| store | clients | replies/s | reply p50 / p95 (ms) | failures | webchat CPU s "
        "| PostgreSQL CPU s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for round_ in range(len(results["sqlite"]["replies"])):
        for key in ("sqlite", "postgresql"):
            data = results[key]["replies"][round_]
            lines.append(
                f"| {names[key]} | {data['clients']} | **{data['replies_per_second']}** | "
                f"{data['reply_ms']['p50']} / {data['reply_ms']['p95']} | {data['failures']} | "
                f"{data['server_cpu_s']} | {data['postgres_cpu_s']} | "
                f"{data['load_average']} |")
    lines += [
        "",
        "## Concurrent streams",
        "",
        "N users at 20 tokens/s, started within 2 s. Lag: how late each token arrives "
        "against the model's pace, from the stream's first event. One user in ten keeps "
        "a second tab on the other instance (SQLite: the same one, so often the same "
        "worker): its lag is measured against the first tab. A row passes with every "
        f"reply complete, lag p99 <= {LAG_P99_MS:g} ms and the first event (after the "
        f"POST) within {FIRST_EVENT_P99_MS:g} ms (p99): an overloaded server shows in the "
        "first event, as the model starts when the stream is served. A configuration "
        "stops at a row with failures, or lag or first event p99 over a second.",
        "",
        "| store | streams | completed | lag p50 / p95 / p99 (ms) | second tab p50 / p95 "
        "(ms) | first event p95 / p99 (ms) | webchat CPU s | PostgreSQL CPU s | load | pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(d["users"], key, d) for key in ("sqlite", "postgresql")
            for d in results[key]["streams"]]
    for _users, key, data in sorted(rows, key=lambda r: (r[0], r[1] != "sqlite")):
        lag, second = data["lag_ms"], data["second_tab_lag_ms"]
        lines.append(
            f"| {names[key]} | {data['users']} | {data['completed']} | {lag['p50']} / "
            f"{lag['p95']} / {lag['p99']} | {second['p50']} / {second['p95']} | "
            f"{data['first_event_ms']['p95']} / {data['first_event_ms']['p99']} | "
            f"{data['server_cpu_s']} | "
            f"{data['postgres_cpu_s']} | {data['load_average']} | "
            f"{'yes' if data['pass'] else 'no'} |")
    lines += [
        "",
        "## Reading it",
        "",
        "- A tab on another instance than the one writing the reply learns of new text at "
        "the writer's next checkpoint (`WEBCHAT_CHECKPOINT_SECONDS`, 0.5 s) through "
        "LISTEN/NOTIFY: up to one checkpoint behind, about half of one on average. On "
        "SQLite a tab in another worker polls every 250 ms on top of that; one in the "
        "same worker follows in-process (lag 0).",
        "- PostgreSQL spends CPU of its own on every page and checkpoint; on a machine of "
        "its own (the point of several instances) that cost leaves the web servers.",
        "- Two instances need no sticky sessions: in the PostgreSQL rows every reply is "
        "POSTed to one instance and streamed from the other.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
