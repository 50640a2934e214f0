"""Who is signed in, when a sign-in proxy in front of webchat says so in a header.

Off unless ``WEBCHAT_TRUSTED_USER_HEADER`` is set. The header is believed only on a
request whose *direct peer* (the TCP connection's address, before ``ProxyFix``
rewrote ``REMOTE_ADDR`` from X-Forwarded-For) is one of ``WEBCHAT_TRUSTED_PROXIES``:
anybody can send the header, only the proxy's word counts. The proxy must also
replace (not append to) a header of that name sent by the client.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from flask import Flask, Request, current_app, has_request_context, request

from .config import ConfigError

MAX_NAME_CHARS = 200
# Control characters, and commas: a comma means the header came twice (the client's
# and the proxy's, joined), and then nobody can tell which one the proxy sent.
_REFUSED = re.compile(r"[\x00-\x1f\x7f,]")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def init_app(app: Flask) -> None:
    """Check the sign-in settings and give every template ``signed_in_user``."""
    if app.config.get("TRUSTED_USER_HEADER") and not app.config.get("TRUSTED_PROXIES"):
        raise ConfigError(
            "WEBCHAT_TRUSTED_USER_HEADER is set but WEBCHAT_TRUSTED_PROXIES is empty: list the "
            "addresses of the sign-in proxy that sends the header (e.g. 127.0.0.1).")
    app.context_processor(_template_context)


def _template_context() -> dict[str, Any]:
    return {"signed_in_user": current_user()}


def current_user() -> str | None:
    """Return the user the trusted proxy signed in for this request, if any."""
    if not has_request_context():
        return None
    return trusted_user(request, current_app.config)


def trusted_user(req: Request, config: Mapping[str, Any]) -> str | None:
    """Return the user named in the trusted header, if a trusted proxy sent it.

    None when the feature is off, the header is absent or malformed, or the direct
    peer is not a trusted proxy (then the header is ignored, never an error).
    """
    header = config.get("TRUSTED_USER_HEADER")
    if not header:
        return None
    raw = req.headers.get(header)
    if raw is None:
        return None
    if not is_trusted_peer(peer_address(req.environ), config.get("TRUSTED_PROXIES") or ()):
        return None
    return clean_user_name(raw)


def peer_address(environ: Mapping[str, Any]) -> str:
    """Return the direct peer's address: REMOTE_ADDR as the server saw it, before ProxyFix."""
    original = environ.get("werkzeug.proxy_fix.orig")
    if isinstance(original, Mapping) and original.get("REMOTE_ADDR"):
        return str(original["REMOTE_ADDR"])
    return str(environ.get("REMOTE_ADDR") or "")


def is_trusted_peer(address: str, proxies: Iterable[str]) -> bool:
    """Tell whether ``address`` lies in one of the ``proxies`` addresses or CIDR ranges."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in network for network in _networks(tuple(proxies)))


@lru_cache(maxsize=16)
def _networks(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in proxies)


def clean_user_name(raw: str) -> str | None:
    """Return the header's user name, or None if it is empty, too long or malformed.

    WSGI hands header values over as Latin-1; a proxy that sends UTF-8 names gets
    them back decoded.
    """
    try:
        value = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        value = raw
    value = value.strip()
    if not value or len(value) > MAX_NAME_CHARS or _REFUSED.search(value):
        return None
    return value
