"""CSRF: every state-changing request needs the session's token and a same-origin request.

The POST routes are read from ``app.url_map`` at collection, so a route added later is
attacked too. Each attack is tried htmx-style (X-CSRF-Token header) and as a plain form
(``csrf_token`` field); it must get a 403 that says why, and change nothing in the store.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from flask import url_for

from webchat import create_app

from .security_support import htmx_headers, make_app, other_site, send_turn, token_of

FORM = {"text": "forged message", "title": "forged title", "model": "demo", "temperature": "1",
        "system_prompt": "forged prompt", "theme": "dark", "next": "/"}


def post_endpoints() -> list[str]:
    """Every endpoint that accepts POST (or any other state-changing method)."""
    app = create_app({"TESTING": True, "DATABASE_URL": "sqlite:///:memory:", "BACKEND": "demo"})
    found = sorted({rule.endpoint for rule in app.url_map.iter_rules()
                    if rule.methods & {"POST", "PUT", "PATCH", "DELETE"}})
    assert len(found) >= 9, found
    assert not [rule for rule in app.url_map.iter_rules()
                if rule.methods & {"PUT", "PATCH", "DELETE"}], "only POST changes state"
    return found


POST_ENDPOINTS = post_endpoints()


def make_victim(path: Path) -> dict[str, Any]:
    """A session with a finished conversation, so every route has ids it would accept."""
    app = make_app(path)
    client = app.test_client()
    turn = send_turn(client, "the victim's conversation")
    client.get(turn["stream"]).get_data()
    return {"app": app, "client": client, "turn": turn, "token": token_of(client)}


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_victim(tmp_path_factory.mktemp("csrf"))


def url_of(app: Any, endpoint: str, turn: dict[str, str]) -> str:
    rule = next(rule for rule in app.url_map.iter_rules() if rule.endpoint == endpoint)
    values = {"cid": turn["cid"], "mid": turn["user" if endpoint.endswith("edit") else "reply"],
              "fmt": "json"}
    with app.test_request_context():
        return url_for(endpoint, **{name: values[name] for name in rule.arguments})


def store_state(app: Any) -> list[Any]:
    db = sqlite3.connect(app.config["DATABASE"])
    try:
        return [db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
                for table in ("sessions", "conversations", "messages")]
    finally:
        db.close()


def other_sessions_token(app: Any) -> str:
    return token_of(app.test_client())


# (name, how the token is sent, its value, extra headers) for one attack.
ATTACKS = [
    ("missing", None, {}),
    ("wrong", "not-the-token-at-all-000000000000", {}),
    ("other-session", "OTHER", {}),
    ("empty", "", {}),
    ("cross-origin", "RIGHT", {"Origin": "https://evil.example"}),
    ("cross-origin-http", "RIGHT", {"Origin": "http://evil.example"}),
    ("opaque-origin", "RIGHT", {"Origin": "null"}),
    ("same-host-other-scheme", "RIGHT", {"Origin": "https://localhost"}),
    ("same-host-other-port", "RIGHT", {"Origin": "http://localhost:8081"}),
    ("lookalike-host", "RIGHT", {"Origin": "http://localhost.evil.example"}),
]


@pytest.mark.parametrize("style", ["htmx", "form"])
@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
def test_every_post_route_refuses_forged_requests(victim: dict[str, Any], endpoint: str,
                                                  style: str) -> None:
    app, client = victim["app"], victim["client"]
    url = url_of(app, endpoint, victim["turn"])
    before = store_state(app)
    for name, token, extra in ATTACKS:
        value = {"RIGHT": victim["token"], "OTHER": other_sessions_token(app)}.get(
            token or "", token)
        headers = dict(extra)
        data = dict(FORM, conversation=victim["turn"]["cid"])
        if style == "htmx":
            headers["HX-Request"] = "true"
            if value is not None:
                headers["X-CSRF-Token"] = value
        elif value is not None:
            data["csrf_token"] = value
        response = client.post(url, data=data, headers=headers)
        body = response.get_data(as_text=True)
        assert response.status_code == 403, (endpoint, style, name, response.status_code)
        reason = "another site" if "Origin" in extra and extra["Origin"] != "null" else (
            "opaque origin" if "Origin" in extra else "Reload the page")
        assert reason in body, (endpoint, style, name, body[-400:])
        if style == "htmx":
            assert body.startswith('<p class="error" role="alert">'), body[:200]
        else:
            assert "<h1>403" in body and "Content-Security-Policy" in response.headers
        assert "Set-Cookie" not in response.headers or "theme=" not in response.headers[
            "Set-Cookie"], "a refused /theme still set its cookie"
    assert store_state(app) == before, f"a refused request to {endpoint} changed the store"


@pytest.mark.parametrize("style", ["htmx", "form"])
@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
def test_the_right_token_from_the_same_origin_is_accepted(tmp_path: Path, endpoint: str,
                                                          style: str) -> None:
    """The control: the attacks above fail because of CSRF, not for another reason."""
    world = make_victim(tmp_path)
    app, client = world["app"], world["client"]
    url = url_of(app, endpoint, world["turn"])
    data = dict(FORM, conversation=world["turn"]["cid"])
    headers = {"Origin": "http://localhost"}
    if style == "htmx":
        headers.update(htmx_headers(world["token"]))
    else:
        data["csrf_token"] = world["token"]
    response = client.post(url, data=data, headers=headers)
    assert response.status_code in (200, 303, 409), (endpoint, response.status_code,
                                                     response.get_data(as_text=True)[:300])
    # Without an Origin header (older browsers, some privacy tools) the token alone counts.
    headers.pop("Origin")
    again = client.post(url, data=data, headers=headers)
    assert again.status_code != 403


def test_the_token_is_bound_to_the_session_and_unpredictable(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    tokens = {token_of(app.test_client()) for _ in range(50)}
    assert len(tokens) == 50 and min(len(t) for t in tokens) >= 24
    client = app.test_client()
    assert token_of(client) == token_of(client), "the token changes between pages"


@pytest.mark.e2e
def test_a_cross_site_form_and_fetch_are_refused_in_a_browser(live_server: Any, page: Any) -> None:
    """A page on another site posts to webchat with the visitor's browser: nothing happens."""
    page.goto(live_server.url + "/")  # the visitor has a session
    refused = '"path": "/chat", "status": 403'  # webchat's own access log line (JSON)
    refused_before = live_server.log_text().count(refused)
    attack = f"""<!doctype html><title>evil</title>
<form id="f" method="post" action="{live_server.url}/chat">
  <input name="text" value="csrf by form"><input name="csrf_token" value="guess">
</form>
<script>
  fetch("{live_server.url}/chat", {{method: "POST", mode: "no-cors", credentials: "include",
    headers: {{"Content-Type": "application/x-www-form-urlencoded"}},
    body: "text=csrf+by+fetch&csrf_token=guess"}}).finally(() => {{
      document.getElementById("f").submit(); }});
</script>"""
    with other_site(attack) as evil, page.expect_navigation(url=f"{live_server.url}/chat",
                                                            timeout=10_000):
        page.goto(evil + "/")
    text = page.locator("body").inner_text()
    assert "403" in text and "another site" in text, text
    deadline = time.monotonic() + 5
    while (live_server.log_text().count(refused) < refused_before + 2
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert live_server.log_text().count(refused) == refused_before + 2, "fetch and form: two 403s"
    page.goto(live_server.url + "/")
    sidebar = page.locator("#conversations").inner_text()
    assert "csrf by" not in sidebar
    page.console_errors.clear()  # the 403 navigation is expected
