"""Company sign-in: a trusted proxy names the user in a header; others can't."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import render_template_string

from webchat import create_app
from webchat.config import ConfigError, load_config
from webchat.identity import clean_user_name, is_trusted_peer, peer_address

from .conftest import Server, csrf_of

HEADER = "X-Forwarded-User"


def make_app(tmp_path: Path, **config: Any) -> Any:
    return create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                       "BACKEND": "demo", "DEMO_TOKENS_PER_SECOND": 5000.0, "COALESCE_MS": 1,
                       "TRUSTED_USER_HEADER": HEADER, **config})


def send(client: Any, text: str, **headers: str) -> Any:
    token = csrf_of(client.get("/", headers=headers).get_data(as_text=True))
    return client.post("/chat", data={"text": text},
                       headers={"HX-Request": "true", "X-CSRF-Token": token, **headers})


# Units ----------------------------------------------------------------------

@pytest.mark.parametrize(("address", "proxies", "trusted"), [
    ("127.0.0.1", ["127.0.0.1/32"], True),
    ("10.1.2.3", ["10.0.0.0/8"], True),
    ("10.1.2.3", ["10.0.0.1/32"], False),
    ("::ffff:10.0.0.1", ["10.0.0.1/32"], True),  # an IPv4 peer on a dual-stack socket
    ("::1", ["::1/128"], True),
    ("::1", ["127.0.0.1/32"], False),
    ("", ["0.0.0.0/0"], False),
    ("unix:/run/sock", ["0.0.0.0/0"], False),
])
def test_trusted_peer_is_matched_against_addresses_and_ranges(
        address: str, proxies: list[str], trusted: bool) -> None:
    assert is_trusted_peer(address, proxies) is trusted


def test_peer_address_is_the_one_before_proxy_fix() -> None:
    environ = {"REMOTE_ADDR": "203.0.113.9",
               "werkzeug.proxy_fix.orig": {"REMOTE_ADDR": "10.0.0.1"}}
    assert peer_address(environ) == "10.0.0.1"
    assert peer_address({"REMOTE_ADDR": "10.0.0.2"}) == "10.0.0.2"


@pytest.mark.parametrize(("raw", "name"), [
    ("alice", "alice"), ("  alice@example.com ", "alice@example.com"),
    ("J\u00c3\u00bcrgen", "J\u00fcrgen"),  # UTF-8 bytes as WSGI hands them over (Latin-1)
    ("", None), ("   ", None), ("a" * 201, None), ("alice\r\nX: y", None),
    ("mallory, alice", None),  # the header came twice: the client's and the proxy's
])
def test_user_names_are_cleaned_or_refused(raw: str, name: str | None) -> None:
    assert clean_user_name(raw) == name


def test_sign_in_settings_are_validated(tmp_path: Path) -> None:
    assert load_config({"WEBCHAT_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"})[
        "TRUSTED_PROXIES"] == ["127.0.0.1/32", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match="WEBCHAT_TRUSTED_PROXIES"):
        load_config({"WEBCHAT_TRUSTED_PROXIES": "proxy.internal"})
    with pytest.raises(ConfigError, match="WEBCHAT_TRUSTED_USER_HEADER"):
        load_config({"WEBCHAT_TRUSTED_USER_HEADER": "X User"})
    with pytest.raises(ConfigError, match="WEBCHAT_TRUSTED_PROXIES is empty"):
        make_app(tmp_path)


def test_a_trusted_proxy_signs_the_user_in_on_every_device(tmp_path: Path) -> None:
    app = make_app(tmp_path, TRUSTED_PROXIES=["127.0.0.1/32"])
    laptop, phone = app.test_client(), app.test_client()
    sent = send(laptop, "from the laptop", **{HEADER: "alice"})
    assert sent.status_code == 200
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    page = phone.get(f"/c/{cid}", headers={HEADER: "alice"})
    assert page.status_code == 200 and "from the laptop" in page.get_data(as_text=True)
    assert phone.get(f"/c/{cid}", headers={HEADER: "bob"}).status_code == 404
    assert phone.get(f"/c/{cid}").status_code == 404  # no header: an anonymous session


def test_the_header_from_an_untrusted_address_is_ignored(tmp_path: Path) -> None:
    app = make_app(tmp_path, TRUSTED_PROXIES=["10.0.0.1/32"])
    laptop, phone = app.test_client(), app.test_client()
    sent = send(laptop, "forged", **{HEADER: "alice"})
    assert sent.status_code == 200
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    assert phone.get(f"/c/{cid}", headers={HEADER: "alice"}).status_code == 404
    assert laptop.get(f"/c/{cid}", headers={HEADER: "bob"}).status_code == 200  # its session's


def test_x_forwarded_for_cannot_make_a_client_look_like_the_proxy(tmp_path: Path) -> None:
    """ProxyFix rewrites REMOTE_ADDR from X-Forwarded-For; the check uses the real peer."""
    app = make_app(tmp_path, TRUSTED_PROXIES=["10.0.0.1/32"], PROXY_HOPS=1)
    client = app.test_client()
    forged = {HEADER: "alice", "X-Forwarded-For": "10.0.0.1"}
    sent = send(client, "forged", **forged)
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    assert app.test_client().get(f"/c/{cid}", headers=forged).status_code == 404

    # Through the real proxy (the direct peer), the client's address comes from the header.
    proxied = app.test_client()
    proxied.environ_base["REMOTE_ADDR"] = "10.0.0.1"
    sent = send(proxied, "signed in", **{HEADER: "alice", "X-Forwarded-For": "203.0.113.9"})
    cid = sent.headers["HX-Push-Url"].rsplit("/", 1)[1]
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "10.0.0.1"
    assert other.get(f"/c/{cid}", headers={HEADER: "alice"}).status_code == 200


def test_templates_get_the_signed_in_user(tmp_path: Path) -> None:
    app = make_app(tmp_path, TRUSTED_PROXIES=["127.0.0.1/32"])
    template = "{{ signed_in_user or '-' }}"
    with app.test_request_context("/", headers={HEADER: "alice"},
                                  environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        assert render_template_string(template) == "alice"
    with app.test_request_context("/", environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        assert render_template_string(template) == "-"
    with app.test_request_context("/", headers={HEADER: "alice"},
                                  environ_base={"REMOTE_ADDR": "192.0.2.1"}):
        assert render_template_string(template) == "-"


# In real browsers, against gunicorn ------------------------------------------

def chat_once(browser: Any, url: str, user: str, text: str) -> None:
    context = browser.new_context()
    try:
        context.set_extra_http_headers({HEADER: user})
        page = context.new_page()
        page.goto(url + "/")
        box = page.get_by_label("Message", exact=True)
        box.fill(text)
        box.press("Enter")
        page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=30_000)
    finally:
        context.close()


@pytest.mark.e2e
def test_the_same_user_sees_the_same_history_in_two_browsers(
        browser: Any, server_factory: Callable[..., Server]) -> None:
    server = server_factory(env={"WEBCHAT_TRUSTED_USER_HEADER": HEADER,
                                 "WEBCHAT_TRUSTED_PROXIES": "127.0.0.1",
                                 "WEBCHAT_DEMO_TOKENS_PER_SECOND": "200"})
    chat_once(browser, server.url, "alice", "Written on the laptop")

    phone = browser.new_context()
    try:
        phone.set_extra_http_headers({HEADER: "alice"})
        page = phone.new_page()
        page.goto(server.url + "/")
        page.locator("#conversations a", has_text="Written on the laptop").click()
        page.locator(".msg.user", has_text="Written on the laptop").wait_for()
        assert page.locator(".msg.assistant[data-status=complete]").count() == 1
        conversation_url = page.url
        page.goto(server.url + "/embed")  # the embedded chat is hers too, with her name
        page.locator(".msg.user", has_text="Written on the laptop").wait_for()
        assert page.locator("span.signed-in").text_content() == "alice"
    finally:
        phone.close()

    stranger = browser.new_context()
    try:
        stranger.set_extra_http_headers({HEADER: "bob"})
        page = stranger.new_page()
        assert page.goto(conversation_url).status == 404
        page.goto(server.url + "/")
        assert page.locator("#conversations a").count() == 0
    finally:
        stranger.close()


@pytest.mark.e2e
def test_a_forged_header_from_an_untrusted_address_has_no_effect(
        browser: Any, server_factory: Callable[..., Server]) -> None:
    server = server_factory(env={"WEBCHAT_TRUSTED_USER_HEADER": HEADER,
                                 "WEBCHAT_TRUSTED_PROXIES": "10.0.0.1",
                                 "WEBCHAT_DEMO_TOKENS_PER_SECOND": "200"})
    chat_once(browser, server.url, "alice", "Forged sign-in")

    other = browser.new_context()
    try:
        other.set_extra_http_headers({HEADER: "alice"})
        page = other.new_page()
        page.goto(server.url + "/")
        assert page.locator("#conversations a").count() == 0
        page.goto(server.url + "/embed")
        assert page.locator("span.signed-in").count() == 0
        assert page.locator(".msg").count() == 0
    finally:
        other.close()
