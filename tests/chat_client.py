"""A raw HTTP client of webchat, as a browser without JavaScript-free shortcuts would be."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from httpx_sse import connect_sse


@dataclass
class Event:
    name: str
    data: str
    id: str
    at: float  # time.monotonic() when it arrived


@dataclass
class ChatClient:
    """One browser session talking to one server over HTTP."""

    base: str
    http: httpx.Client = field(init=False)
    csrf: str = ""

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(30.0, connect=5.0))

    def close(self) -> None:
        self.http.close()

    def open(self, path: str = "/") -> str:
        response = self.http.get(path)
        response.raise_for_status()
        match = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
        assert match
        self.csrf = match.group(1)
        return response.text

    def send(self, text: str, conversation: str = "", request_key: str | None = None
             ) -> tuple[str, str]:
        """Send a message like htmx does; return (conversation id, reply stream URL)."""
        if not self.csrf:
            self.open()
        data = {"text": text, "conversation": conversation}
        if request_key:
            data["request_key"] = request_key
        response = self.post("/chat", data)
        response.raise_for_status()
        url = re.search(r'sse-connect="([^"]+)"', response.text)
        cid = re.search(r'id="conversation-id" value="([^"]+)"', response.text)
        assert url and cid, response.text
        return cid.group(1), url.group(1)

    def post(self, path: str, data: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(path, data=data or {},
                              headers={"HX-Request": "true", "X-CSRF-Token": self.csrf})

    def events(self, url: str, *, limit: float = 60.0, stop_after: int | None = None,
               headers: dict[str, str] | None = None) -> list[Event]:
        """Read a stream until it ends (done/error) or ``stop_after`` events."""
        return list(self.iter_events(url, limit=limit, stop_after=stop_after, headers=headers))

    def iter_events(self, url: str, *, limit: float = 60.0, stop_after: int | None = None,
                    headers: dict[str, str] | None = None) -> Iterator[Event]:
        """Yield a stream's events as they arrive, until done/error or ``stop_after``."""
        count = 0
        deadline = time.monotonic() + limit
        with connect_sse(self.http, "GET", url, headers=headers or {}) as source:
            for sse in source.iter_sse():
                if sse.retry is not None and not sse.data:
                    continue
                yield Event(sse.event, sse.data, sse.id, time.monotonic())
                count += 1
                if sse.event in ("done", "error"):
                    return
                if stop_after is not None and count >= stop_after:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stream still open after {limit} s")
