"""Open N concurrent SSE streams against a server on 127.0.0.1 and measure them.

One asyncio process (uvloop when installed), one ``asyncio.Protocol`` per
connection: HTTP/1.1 with chunked decoding and an event-stream parser that
follows the WHATWG rules (CRLF, lone CR and LF line ends, split anywhere;
comments; ``data`` lines joined with LF; an event with no data line is not
dispatched; ``id`` with NUL ignored; a leading BOM dropped). The client reports
its own CPU time and event-loop lag, so a saturated client shows.

Two targets:

- ``peer``: ``GET /stream?tokens=T&rate=R&coalesce_ms=C`` (bench/peers/*).
- ``webchat``: the full path. Before the clock starts, each stream gets its own
  session: ``GET /`` (cookie + CSRF token from the page) and ``POST /chat`` with
  ``HX-Request: true`` and ``X-CSRF-Token``, whose answer names the stream URL
  (``sse-connect``). That setup is timed and costed separately.

Events carry ``id:`` = characters of the reply so far; the ``done`` event holds
the reply's source text, so every event maps to the tokens it completes. Token
j (1-based) is due at start + (j-1)/R (the first token at once, as the demo
backend and the peers pace it); its lag is the arrival of the event that
completes it minus that. ``lag_ms`` takes start = the arrival of the stream's
first event (the snapshot: the reply starts when its stream does), so it shows
how far delivery falls behind the model's pace; ``lag_from_request_ms`` takes
start = when the client began to connect, so it also holds the time to start.

Run ``python bench/loadgen.py --help``; ``bench/run.py`` drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import html
import json
import os
import re
import resource
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOKEN_RE = re.compile(r"\s*\S+|\s+")  # the demo backend's tokenizer (and the peers' tokens)
SOURCE_RE = re.compile(r'<template class="source">(.*?)</template>', re.S)
CSRF_RE = re.compile(rb'name="csrf_token" value="([^"]+)"')
SSE_CONNECT_RE = re.compile(rb'sse-connect="([^"]+)"')


def raise_nofile(target: int = 65536) -> int:
    """Raise this process's open-file limit (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, target)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Server processes -----------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """Return utime + stime of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """Return the summed VmRSS of these processes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def core_busy() -> dict[str, float]:
    """Return each core's busy seconds so far (all processes), from /proc/stat."""
    busy = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                values = [int(t) for t in ticks]
                idle = values[3] + values[4]  # idle + iowait
                busy[name] = (sum(values[:8]) - idle) / CLOCK_TICKS
    return busy


def tcp_counters() -> dict[str, int]:
    """Return the kernel's listen-queue overflow and SYN retransmit counters."""
    wanted = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")
    with open("/proc/net/netstat", encoding="ascii") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table.get(name, 0)) for name in wanted}
    return {}


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The event-stream client ----------------------------------------------------

@dataclass
class Stream:
    """What one stream saw."""

    index: int
    start: float = 0.0  # when the client began to connect
    headers_at: float = 0.0
    end: float = 0.0
    status: int = 0
    content_type: str = ""
    retry_after: str = ""
    error: str = ""
    done: bool = False
    body_bytes: int = 0
    times: list[float] = field(default_factory=list)  # arrival of every dispatched event
    ids: list[bytes] = field(default_factory=list)  # last event id at each event
    names: dict[bytes, int] = field(default_factory=dict)
    final_data: bytes = b""

    @property
    def established(self) -> bool:
        return self.status == 200 and self.content_type.startswith("text/event-stream")


class SSEProtocol(asyncio.Protocol):
    """One GET of an event stream over one HTTP/1.1 connection."""

    def __init__(self, stream: Stream, request: bytes, live: list[int]) -> None:
        self.s = stream
        self.request = request
        self.live = live  # [open streams now, most ever open]
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.counted = False
        # chunked decoding
        self.cbuf = b""
        self.chunk_left = 0
        self.crlf_left = 0
        # event-stream parsing
        self.first = True
        self.skip_lf = False
        self.line_buf = b""
        self.data_parts: list[bytes] = []
        self.event_type = b""
        self.last_id = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self.head[:end], now)
            data, self.head = self.head[end + 4:], b""
            if not self.s.established:
                self._close(f"status {self.s.status}")
                return
        if self.chunked:
            data = self._dechunk(data)
        if data:
            self.s.body_bytes += len(data)
            self._feed(data, now)

    def _parse_head(self, head: bytes, now: float) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        self.s.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
        self.s.headers_at = now
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-type":
                self.s.content_type = value.strip().decode("latin-1")
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"retry-after":
                self.s.retry_after = value.strip().decode("latin-1")
        self.in_body = True
        if self.s.established:
            self.counted = True
            self.live[0] += 1
            self.live[1] = max(self.live[1], self.live[0])

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.cbuf + data if self.cbuf else data
        out = []
        pos, size = 0, len(buf)
        while pos < size:
            if self.chunk_left:
                take = min(self.chunk_left, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.crlf_left = 2
            elif self.crlf_left:
                skip = min(self.crlf_left, size - pos)
                pos += skip
                self.crlf_left -= skip
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                length = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if length == 0:  # last chunk: the server ended the response
                    pos = size
                    break
                self.chunk_left = length
        self.cbuf = buf[pos:]
        return b"".join(out) if len(out) != 1 else out[0]

    def _feed(self, data: bytes, now: float) -> None:
        if self.first:
            self.first = False
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
        if self.skip_lf:
            self.skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            # A CR ends a line; a CRLF is one line end, even split across two reads.
            self.skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self.line_buf + data).split(b"\n") if self.line_buf else data.split(b"\n")
        self.line_buf = lines.pop()
        for line in lines:
            if not line:
                self._dispatch(now)
                if self.s.done:
                    return
            elif line[0] == 58:  # ":" starts a comment
                continue
            else:
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    self.data_parts.append(value)
                elif name == b"event":
                    self.event_type = value
                elif name == b"id" and b"\x00" not in value:
                    self.last_id = value
                # retry and unknown fields: nothing to measure

    def _dispatch(self, now: float) -> None:
        event_type, self.event_type = self.event_type or b"message", b""
        if not self.data_parts:
            return
        s = self.s
        s.times.append(now)
        s.ids.append(self.last_id)
        s.names[event_type] = s.names.get(event_type, 0) + 1
        if event_type in (b"done", b"error"):
            s.final_data = b"\n".join(self.data_parts)
            s.done = event_type == b"done"
            if not s.done:
                s.error = "error event"
            self._close("")  # as sse-close does
        self.data_parts = []

    def _close(self, error: str) -> None:
        if error and not self.s.error:
            self.s.error = error
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.end = time.monotonic()
        if self.counted:
            self.live[0] -= 1
            self.counted = False
        if not self.s.done and not self.s.error:
            self.s.error = f"closed: {type(exc).__name__}" if exc else "closed before done"
        if not self.finished.done():
            self.finished.set_result(None)


async def run_stream(loop: asyncio.AbstractEventLoop, host: str, port: int, path: str,
                     cookie: str, stream: Stream, live: list[int], deadline: float) -> None:
    """Open one stream, read it to ``done`` (or error, or the deadline)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
               f"Cache-Control: no-cache\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "")
               + "\r\n").encode()
    stream.start = time.monotonic()
    protocol = SSEProtocol(stream, request, live)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: protocol, host, port),
                               timeout=max(0.1, deadline - time.monotonic()))
    except (TimeoutError, OSError) as exc:
        stream.error = f"connect: {type(exc).__name__}"
        stream.end = time.monotonic()
        return
    try:
        await asyncio.wait_for(asyncio.shield(protocol.finished),
                               timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        stream.error = stream.error or "timeout"
        if protocol.transport is not None:
            protocol.transport.abort()
        await protocol.finished


# webchat setup: a session, a CSRF token, a pending reply -----------------------

async def http_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        request: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send one request on a keep-alive connection; return status, headers, body."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        headers.append((name, value))
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, headers, await reader.readexactly(length)
    body: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, headers, b"".join(body)
        body.append(await reader.readexactly(size))
        await reader.readexactly(2)


def update_cookies(jar: dict[str, str], headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if name == b"set-cookie":
            pair = value.split(b";", 1)[0].decode("latin-1")
            key, _, val = pair.partition("=")
            jar[key.strip()] = val.strip()


def cookie_header(jar: dict[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in jar.items())


async def webchat_tab(host: str, port: int, message: str, replies: int
                      ) -> tuple[str, list[str], float, float]:
    """Open a tab (GET /) and send ``replies`` messages, each in a new conversation.

    Return the cookie, the stream paths, and the seconds the page and the POSTs took.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        jar: dict[str, str] = {}
        started = time.monotonic()
        status, headers, body = await http_exchange(
            reader, writer, f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/html\r\n\r\n"
            .encode())
        if status != 200:
            raise RuntimeError(f"GET / answered {status}")
        update_cookies(jar, headers)
        match = CSRF_RE.search(body)
        if not match:
            raise RuntimeError("no CSRF token in the page")
        csrf = match.group(1).decode()
        page_seconds = time.monotonic() - started
        paths = []
        started = time.monotonic()
        for _ in range(replies):
            form = urllib.parse.urlencode({"text": message, "conversation": ""}).encode()
            status, headers, body = await http_exchange(reader, writer, (
                f"POST /chat HTTP/1.1\r\nHost: {host}:{port}\r\nHX-Request: true\r\n"
                f"X-CSRF-Token: {csrf}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(form)}\r\nCookie: {cookie_header(jar)}\r\n\r\n"
            ).encode() + form)
            if status != 200:
                raise RuntimeError(f"POST /chat answered {status}")
            update_cookies(jar, headers)
            url = SSE_CONNECT_RE.search(body)
            if not url:
                raise RuntimeError("no sse-connect in the POST answer")
            paths.append(html.unescape(url.group(1).decode()))
        return cookie_header(jar), paths, page_seconds, time.monotonic() - started
    finally:
        writer.close()


async def idle_tabs(args: argparse.Namespace) -> dict[str, Any]:
    """Open tabs that show the page and stream nothing; count the server's connections.

    Each tab loads ``/`` and keeps its keep-alive connection, as a browser does;
    the server's connections are counted with ``ss`` at once and after the
    server's keep-alive timeout (``--settle``). Two batches of ``--streams`` tabs:
    the second batch's memory growth tells what a tab keeps, apart from the
    heap's first growth.
    """
    pids = process_tree(args.pid) if args.pid else []
    batches = []
    sse_connects = 0
    rss = rss_bytes(pids)
    for _ in range(2):
        connections = []
        for _ in range(args.streams):
            reader, writer = await asyncio.open_connection(args.host, args.port)
            status, _headers, body = await http_exchange(
                reader, writer,
                f"GET / HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n\r\n".encode())
            if status != 200:
                raise RuntimeError(f"GET / answered {status}")
            sse_connects += body.count(b"sse-connect=")
            connections.append(writer)
        await asyncio.sleep(0.5)
        open_now = server_connections(args.port)
        await asyncio.sleep(args.settle)
        open_later = server_connections(args.port)
        rss_later = rss_bytes(pids)
        for writer in connections:
            writer.close()
        batches.append({"tabs": args.streams, "server_connections_after_load": open_now,
                        "server_connections_after_keepalive": open_later,
                        "rss_before_mb": round(rss / 2**20, 2),
                        "rss_after_mb": round(rss_later / 2**20, 2),
                        "rss_per_tab_kb": round((rss_later - rss) / args.streams / 1024, 2)})
        rss = rss_later
    return {"config": {"target": "idle", "tabs": args.streams, "port": args.port},
            "tabs": args.streams, "sse_connect_in_pages": sse_connects,
            "waited_s": args.settle + 0.5, "batches": batches}


def server_connections(port: int) -> int:
    """Count established TCP connections whose local port is ``port`` (``ss -tn``)."""
    import subprocess
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


# Statistics -------------------------------------------------------------------

def quantiles(values: Any, scale: float = 1000.0) -> dict[str, float | None]:
    """Return p50, p99 and max of ``values`` (seconds) in milliseconds."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(array, [50, 99])
    return {"p50": round(float(p50) * scale, 2), "p99": round(float(p99) * scale, 2),
            "max": round(float(array.max()) * scale, 2)}


def token_ends(source: str) -> list[int]:
    """Return, for each token of ``source``, the character count up to its end."""
    ends, total = [], 0
    for token in TOKEN_RE.findall(source):
        total += len(token)
        ends.append(total)
    return ends


def demo_text(message: str) -> str | None:
    """Return the demo backend's reply to ``message`` (when done carries no source)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from webchat.backends.base import ChatMessage
        from webchat.backends.demo import demo_reply
    except ImportError:
        return None
    return demo_reply([ChatMessage("user", message)])


def summarize(streams: list[Stream], rate: float, fallback_text: str | None = None
              ) -> dict[str, Any]:
    """Aggregate what the streams saw.

    The reply's text (to map event ids to tokens) comes from a ``done`` event's
    source, else from ``fallback_text``.
    """
    ends: list[int] | None = None
    text_from = "none"
    for s in streams:
        if s.done and s.final_data:
            match = SOURCE_RE.search(s.final_data.decode("utf-8", "replace"))
            if match:
                ends = token_ends(html.unescape(match.group(1)))
                text_from = "done event"
                break
    if ends is None and fallback_text:
        ends, text_from = token_ends(fallback_text), "demo backend"
    total_tokens = len(ends) if ends else 0
    ttfe, gaps, lags, request_lags, headers_at = [], [], [], [], []
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    names: dict[str, int] = {}
    delivered = completed = established = events = body = 0
    for s in streams:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        if s.error:
            key = s.error if not s.error.startswith("status") else "refused: " + s.error
            errors[key] = errors.get(key, 0) + 1
        if s.headers_at:
            headers_at.append(s.headers_at - s.start)
        if not s.established:
            continue
        established += 1
        events += len(s.times)
        body += s.body_bytes
        for name, count in s.names.items():
            names[name.decode()] = names.get(name.decode(), 0) + count
        if not s.times:
            continue
        ttfe.append(s.times[0] - s.start)
        if len(s.times) > 1:
            gaps.append(np.diff(np.asarray(s.times)))
        if ends is None:
            continue
        counts = [bisect.bisect_right(ends, int(i)) if i.isdigit() else 0 for i in s.ids]
        got = max(counts) if counts else 0
        delivered += got
        if s.done and got == total_tokens:
            completed += 1
        previous, arrivals = 0, []
        for at, count in zip(s.times, counts, strict=True):
            if count > previous:
                arrivals.append(np.full(count - previous, at))
                previous = count
        if arrivals:
            arrived = np.concatenate(arrivals)
            pace = np.arange(arrived.size) / rate
            lags.append(arrived - s.times[0] - pace)
            request_lags.append(arrived - s.start - pace)
    all_gaps = np.concatenate(gaps) if gaps else np.zeros(0)
    all_lags = np.concatenate(lags) if lags else np.zeros(0)
    all_request_lags = np.concatenate(request_lags) if request_lags else np.zeros(0)
    retry_after = sum(1 for s in streams if s.retry_after)
    return {
        "streams": len(streams), "established": established, "completed": completed,
        "failed": len(streams) - completed, "statuses": statuses, "errors": errors,
        "events": events, "event_names": names, "body_bytes": body,
        "tokens_per_reply": total_tokens, "tokens_delivered": delivered,
        "reply_text_from": text_from,
        "bytes_per_event": round(body / events, 1) if events else None,
        "time_to_headers_ms": quantiles(headers_at), "first_event_ms": quantiles(ttfe),
        "gap_ms": quantiles(all_gaps), "lag_ms": quantiles(all_lags),
        "lag_from_request_ms": quantiles(all_request_lags),
        "refused_with_retry_after": retry_after,
    }


# The run ---------------------------------------------------------------------

async def sample_server(pids: list[int], live: list[int], samples: list[list[float]],
                        stop: asyncio.Event, every: float = 0.25) -> None:
    while not stop.is_set():
        samples.append([time.monotonic(), rss_bytes(pids), cpu_seconds(pids), live[0]])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def watch_loop(lags: list[float], stop: asyncio.Event, every: float = 0.01) -> None:
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(every)
        lags.append(time.monotonic() - before - every)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pids = process_tree(args.pid) if args.pid else []
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    users, repeat = args.streams, args.repeat
    cookies: list[str] = [""] * users
    paths: list[list[str]] = []
    rss_before_setup = rss_bytes(pids)
    if args.target == "webchat":
        cpu0, ccpu0, t0 = cpu_seconds(pids), client_cpu(), time.monotonic()
        semaphore = asyncio.Semaphore(args.setup_concurrency)
        page_times: list[float] = []
        post_times: list[float] = []
        failures: dict[str, int] = {}

        async def setup(i: int) -> None:
            async with semaphore:
                try:
                    cookie, tab_paths, page, posts = await webchat_tab(
                        args.host, args.port, args.message, repeat)
                except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
                    failures[str(exc)[:80]] = failures.get(str(exc)[:80], 0) + 1
                    cookies[i] = ""
                    paths_by_user[i] = []
                    return
                cookies[i] = cookie
                paths_by_user[i] = tab_paths
                page_times.append(page)
                post_times.append(posts / repeat)

        paths_by_user: list[list[str]] = [[] for _ in range(users)]
        await asyncio.gather(*(setup(i) for i in range(users)))
        paths = paths_by_user
        elapsed = time.monotonic() - t0
        server_cpu = cpu_seconds(pids) - cpu0
        result["setup"] = {
            "tabs": users, "replies": users * repeat, "failures": failures,
            "seconds": round(elapsed, 2),
            "page_ms": quantiles(page_times), "post_ms": quantiles(post_times),
            "server_cpu_s": round(server_cpu, 3),
            "server_cpu_ms_per_reply": round(server_cpu * 1000 / (users * repeat), 3),
            "client_cpu_s": round(client_cpu() - ccpu0, 3),
        }
    else:
        paths = [[f"/stream?tokens={args.tokens}&rate={args.rate:g}"
                  f"&coalesce_ms={args.coalesce_ms:g}&sid={i}-{j}" for j in range(repeat)]
                 for i in range(users)]
    if args.settle:
        await asyncio.sleep(args.settle)  # let the setup's keep-alive connections close

    live = [0, 0]
    samples: list[list[float]] = []
    loop_lags: list[float] = []
    stop = asyncio.Event()
    streams: list[Stream] = []
    duration = args.tokens / args.rate if args.target == "peer" else args.expect_seconds
    deadline_for = duration + args.grace
    rss_idle = rss_bytes(pids)
    if args.phase_file:  # tell the harness the clock starts (it may attach a profiler)
        with open(args.phase_file, "w", encoding="utf-8") as f:
            f.write("streaming\n")
    busy0, tcp0 = core_busy(), tcp_counters()
    cpu0, ccpu0, t0 = cpu_seconds(pids), client_cpu(), time.monotonic()
    sampler = asyncio.ensure_future(sample_server(pids, live, samples, stop))
    watcher = asyncio.ensure_future(watch_loop(loop_lags, stop))

    async def user(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + args.ramp * i / users - time.monotonic()))
        for path in paths[i]:
            stream = Stream(len(streams))
            streams.append(stream)
            await run_stream(loop, args.host, args.port, path, cookies[i], stream, live,
                             time.monotonic() + deadline_for)

    await asyncio.gather(*(user(i) for i in range(users)))
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pids) - cpu0
    ccpu = client_cpu() - ccpu0
    busy = {core: round(100 * (seconds - busy0.get(core, 0.0)) / wall, 1)
            for core, seconds in core_busy().items()} if wall else {}
    tcp = {name: count - tcp0.get(name, 0) for name, count in tcp_counters().items()}
    stop.set()
    await asyncio.gather(sampler, watcher)
    missing = users * repeat - len(streams)  # tabs whose setup failed never streamed
    streams.extend(Stream(-1, error="setup failed") for _ in range(missing))

    fallback = demo_text(args.message) if args.target == "webchat" else None
    summary = summarize(streams, args.rate, fallback)
    result.update(summary)
    tokens = summary["tokens_delivered"]
    peak = max(samples, key=lambda s: (s[3], s[1])) if samples else [0, 0, 0, 0]
    result.update({
        "wall_s": round(wall, 2),
        "peak_open_streams": live[1],
        "server_cpu_s": round(cpu, 3),
        "server_cpu_pct": round(100 * cpu / wall, 1) if wall else None,
        "server_cpu_s_per_1k_tokens": round(cpu * 1000 / tokens, 4) if tokens else None,
        "server_pids": pids,
        "rss_before_setup_mb": round(rss_before_setup / 2**20, 1),
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_peak_mb": round(max(s[1] for s in samples) / 2**20, 1) if samples else None,
        "rss_at_peak_open_mb": round(peak[1] / 2**20, 1),
        "open_at_rss_sample": int(peak[3]),
        "rss_per_open_stream_kb": round((peak[1] - rss_idle) / peak[3] / 1024, 1)
        if peak[3] else None,
        "client_cpu_s": round(ccpu, 3),
        "client_cpu_pct": round(100 * ccpu / wall, 1) if wall else None,
        "client_loop_lag_ms": quantiles(loop_lags),
        # Every process's CPU on each core: what is not the server's or the
        # client's is someone else's load, i.e. noise in this run.
        "core_busy_pct": busy,
        # Connections the kernel dropped because the server's accept queue was full
        # (the client's SYN is then retried after 1 s, 3 s, ...): machine-wide counts.
        "tcp": tcp,
        "samples": [[round(s[0] - t0, 3), s[1], round(s[2] - cpu0, 3), s[3]] for s in samples],
    })
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("peer", "webchat", "idle"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams (users)")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens per second per stream")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply (peers)")
    parser.add_argument("--coalesce-ms", type=float, default=0.0, help="peers' coalescing window")
    parser.add_argument("--repeat", type=int, default=1,
                        help="replies each user streams one after the other")
    parser.add_argument("--ramp", type=float, default=1.0,
                        help="seconds over which the users start, evenly spaced")
    parser.add_argument("--grace", type=float, default=20.0,
                        help="seconds a stream may run past its nominal length")
    parser.add_argument("--expect-seconds", type=float, default=10.0,
                        help="nominal length of one webchat reply (tokens / rate)")
    parser.add_argument("--message", default=" ".join(["w"] * 100),
                        help="what each webchat tab sends (the demo quotes up to 200 chars)")
    parser.add_argument("--setup-concurrency", type=int, default=32)
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait between setup and streaming")
    parser.add_argument("--phase-file", default="",
                        help="a file to write 'streaming' into when the clock starts")
    parser.add_argument("--pid", type=int, default=0, help="the server's (master) process")
    parser.add_argument("--out", default="-", help="where to write the JSON result")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_nofile()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(idle_tabs(args) if args.target == "idle" else run(args))
    else:
        result = uvloop.run(idle_tabs(args) if args.target == "idle" else run(args))
    text = json.dumps(result, indent=1)
    if args.out == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
