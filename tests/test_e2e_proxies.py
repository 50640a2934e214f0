"""Streaming through real proxies: nginx with default buffering, and gzip."""

from __future__ import annotations

from pathlib import Path

import pytest

from .chat_client import ChatClient
from .conftest import Server
from .nginx import Nginx

pytestmark = pytest.mark.e2e


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def assert_incremental(client: ChatClient, url: str) -> None:
    events = client.events(url)
    assert events[0].name == "snapshot" and events[-1].name == "done"
    deltas = [e for e in events if e.name in ("delta", "text")]
    assert len(deltas) >= 10
    # Tokens arrive while the reply is written (~4 s at 25 tokens/s), not all at the end.
    assert events[-1].at - deltas[0].at > 2.0
    spread = {round(e.at, 1) for e in deltas}
    assert len(spread) >= 10, "the proxy delivered the stream in a few lumps"


def test_streams_through_nginx_with_default_buffering(live_server: Server,
                                                      tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx", port_of(live_server))
    client = ChatClient(nginx.url)
    try:
        _, url = client.send("through nginx")
        assert_incremental(client, url)
    finally:
        client.close()
        nginx.stop()


def test_streams_through_a_gzip_compressing_proxy(live_server: Server, tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx-gzip", port_of(live_server),
                  extra="gzip on; gzip_min_length 0; gzip_proxied any; "
                        "gzip_types text/event-stream text/html;")
    client = ChatClient(nginx.url)
    try:
        client.http.headers["Accept-Encoding"] = "gzip"
        page = client.http.get("/")
        assert page.headers.get("Content-Encoding") == "gzip"  # the proxy does compress
        _, url = client.send("through gzip")
        with client.http.stream("GET", url) as response:  # the stream is compressed too
            assert response.headers.get("Content-Encoding") == "gzip"
        assert_incremental(client, url)
    finally:
        client.close()
        nginx.stop()
