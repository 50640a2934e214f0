"""Pages, fragments and the stream, through the Flask test client."""

from __future__ import annotations

import re
from typing import Any

import pytest

from webchat import create_app
from webchat.config import ConfigError, load_config

from .conftest import csrf_of


def start_turn(client: Any, text: str = "Hello", conversation: str = "") -> tuple[str, str]:
    """Send a message as htmx would; return the reply's stream URL and the conversation id."""
    page = client.get("/").get_data(as_text=True)
    response = client.post("/chat", data={"text": text, "conversation": conversation,
                                          "request_key": "r" * 22},
                           headers={"HX-Request": "true", "X-CSRF-Token": csrf_of(page)})
    assert response.status_code == 200, response.get_data(as_text=True)
    html = response.get_data(as_text=True)
    url = re.search(r'sse-connect="([^"]+)"', html)
    assert url
    cid = re.search(r'id="conversation-id" value="([^"]+)"', html)
    assert cid
    return url.group(1), cid.group(1)


def events_of(body: str) -> list[tuple[str, str]]:
    found = []
    for block in body.split("\n\n"):
        lines = block.split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        if name:
            found.append((name, next((line[4:] for line in lines if line.startswith("id: ")), "")))
    return found


def test_the_empty_page_has_a_composer(client: Any) -> None:
    response = client.get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'name="text"' in html and 'role="log"' in html
    assert "Demo model" in html
    assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")


def test_a_turn_streams_snapshot_deltas_and_done(client: Any) -> None:
    url, cid = start_turn(client)
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache, no-transform"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers
    body = response.get_data(as_text=True)
    assert body.startswith("retry: 2000\n\n")
    events = events_of(body)
    names = [name for name, _ in events]
    assert names[0] == "snapshot" and names[-1] == "done"
    assert set(names) <= {"snapshot", "delta", "text", "done"}
    assert names[-2] == "delta", "the body is brought to its final form before done"
    assert all(event_id.isdigit() for _, event_id in events)
    assert "\r" not in body

    again = client.get(url)  # idempotent: the finished reply, never a 204
    assert again.status_code == 200
    assert [name for name, _ in events_of(again.get_data(as_text=True))] == ["snapshot", "done"]
    page = client.get(f"/c/{cid}").get_data(as_text=True)
    assert "You wrote: “Hello”" in page
    assert "sse-connect" not in page


def test_the_closing_messages_forms_carry_the_sessions_token_and_work(client: Any) -> None:
    url, cid = start_turn(client)
    token = csrf_of(client.get("/").get_data(as_text=True))
    body = client.get(url).get_data(as_text=True)
    done = body[body.index("event: done"):]
    assert csrf_of(done) == token  # rendered after the view returned, with its session
    regenerate = re.search(r'action="([^"]+/regenerate)"', done)
    assert regenerate
    response = client.post(regenerate.group(1), data={"csrf_token": csrf_of(done)},
                           headers={"HX-Request": "true"})
    assert response.status_code == 200 and "sse-connect" in response.get_data(as_text=True)


def test_another_session_gets_404_everywhere(app: Any) -> None:
    owner = app.test_client()
    url, cid = start_turn(owner)
    owner.get(url)
    stranger = app.test_client()
    stranger_csrf = csrf_of(stranger.get("/").get_data(as_text=True))
    mid = url.split("/")[4]
    assert stranger.get(f"/c/{cid}").status_code == 404
    assert stranger.get(url).status_code == 404
    headers = {"HX-Request": "true", "X-CSRF-Token": stranger_csrf}
    assert stranger.post(f"/c/{cid}/m/{mid}/stop", headers=headers).status_code == 404
    assert stranger.post(f"/c/{cid}/delete", headers=headers).status_code == 404
    assert stranger.post("/chat", data={"text": "x", "conversation": cid},
                         headers=headers).status_code == 404
    assert owner.get(f"/c/{cid}").status_code == 200


@pytest.mark.parametrize("path", ["/c/nope", "/c/" + "A" * 22, "/c/../../etc/passwd"])
def test_malformed_and_unknown_ids_are_404(client: Any, path: str) -> None:
    assert client.get(path).status_code == 404


def test_posts_without_the_csrf_token_are_refused(client: Any) -> None:
    client.get("/")
    response = client.post("/chat", data={"text": "hi"})
    assert response.status_code == 403
    assert "Reload the page" in response.get_data(as_text=True)


def test_a_cross_site_post_is_refused(client: Any) -> None:
    token = csrf_of(client.get("/").get_data(as_text=True))
    response = client.post("/chat", data={"text": "hi", "csrf_token": token},
                           headers={"Origin": "https://evil.example"})
    assert response.status_code == 403


def test_bad_messages_get_clear_errors(client: Any, app: Any) -> None:
    token = csrf_of(client.get("/").get_data(as_text=True))
    headers = {"HX-Request": "true", "X-CSRF-Token": token}
    empty = client.post("/chat", data={"text": "   "}, headers=headers)
    assert empty.status_code == 400 and "Type a message" in empty.get_data(as_text=True)
    nul = client.post("/chat", data={"text": "a\x00b"}, headers=headers)
    assert nul.status_code == 400
    limit = app.config["MAX_MESSAGE_CHARS"]
    long = client.post("/chat", data={"text": "x" * (limit + 1)}, headers=headers)
    assert long.status_code == 413 and "too long" in long.get_data(as_text=True)
    assert client.post("/chat", data={"text": "x" * limit}, headers=headers).status_code == 200


def test_a_second_message_waits_for_the_reply(client: Any) -> None:
    url, cid = start_turn(client)
    token = csrf_of(client.get("/").get_data(as_text=True))
    busy = client.post("/chat", data={"text": "more", "conversation": cid},
                       headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert busy.status_code == 409
    client.get(url).get_data()  # read the stream to its end: the reply is complete
    again = client.post("/chat", data={"text": "more", "conversation": cid},
                        headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert again.status_code == 200


def test_a_plain_form_post_answers_with_the_page_and_the_reply(client: Any) -> None:
    token = csrf_of(client.get("/").get_data(as_text=True))
    response = client.post("/chat", data={"text": "no js", "csrf_token": token})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = response.get_data(as_text=True)
    assert "You wrote: “no js”" in page and 'data-status="live"' in page
    assert page.rstrip().endswith("</html>")
    assert re.search(r'id="conversation-id" value="[A-Za-z0-9_-]{22}"', page)


def test_bad_last_event_id_is_a_400(client: Any) -> None:
    url, _ = start_turn(client)
    for value in ["-1", "9" * 40, "abc", "1e9"]:
        assert client.get(url, headers={"Last-Event-ID": value}).status_code == 400
    assert client.get(url, headers={"Last-Event-ID": "12"}).status_code == 200


def test_healthz(client: Any) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_a_bad_setting_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="WEBCHAT_MAX_MESSAGE_CHARS"):
        load_config({"WEBCHAT_MAX_MESSAGE_CHARS": "lots"})
    with pytest.raises(ConfigError, match="WEBCHAT_BACKEND"):
        load_config({"WEBCHAT_BACKEND": "gpt5"})
    with pytest.raises(ConfigError, match="WEBCHAT_COALESCE_MS"):
        load_config({"WEBCHAT_COALESCE_MS": "-5"})


def test_secret_key_is_required_outside_development(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.delenv("WEBCHAT_DEV", raising=False)
    with pytest.raises(ConfigError, match="SECRET_KEY is not set"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}", "BACKEND": "demo"})


def test_every_setting_is_in_the_readme() -> None:
    from pathlib import Path

    from webchat.config import SETTINGS
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme, f"{setting.env} is not documented in the README"


def test_messages_per_minute_are_limited_with_retry_after(tmp_path: Any) -> None:
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "BACKEND": "demo", "DEMO_TOKENS_PER_SECOND": 5000.0,
                      "MESSAGES_PER_MINUTE": 3, "REPLIES_IN_FLIGHT": 10})
    client = app.test_client()
    token = csrf_of(client.get("/").get_data(as_text=True))
    headers = {"HX-Request": "true", "X-CSRF-Token": token}
    for _ in range(3):  # just under the limit: each in its own conversation
        assert client.post("/chat", data={"text": "hi"}, headers=headers).status_code == 200
    over = client.post("/chat", data={"text": "hi"}, headers=headers)
    assert over.status_code == 429
    assert 1 <= int(over.headers["Retry-After"]) <= 61
    assert "too fast" in over.get_data(as_text=True)
    # Another session from another address is not affected.
    other = app.test_client()
    other_token = csrf_of(other.get("/").get_data(as_text=True))
    assert other.post("/chat", data={"text": "hi"}, environ_base={"REMOTE_ADDR": "10.9.9.9"},
                      headers={"HX-Request": "true", "X-CSRF-Token": other_token}
                      ).status_code == 200


def test_replies_in_flight_are_limited(tmp_path: Any) -> None:
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "BACKEND": "demo", "REPLIES_IN_FLIGHT": 2})
    client = app.test_client()
    token = csrf_of(client.get("/").get_data(as_text=True))
    headers = {"HX-Request": "true", "X-CSRF-Token": token}
    for _ in range(2):
        assert client.post("/chat", data={"text": "hi"}, headers=headers).status_code == 200
    over = client.post("/chat", data={"text": "hi"}, headers=headers)
    assert over.status_code == 429 and "Retry-After" in over.headers


def test_a_full_conversation_says_so(tmp_path: Any) -> None:
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "BACKEND": "demo", "DEMO_TOKENS_PER_SECOND": 5000.0,
                      "MAX_CONVERSATION_MESSAGES": 4})
    client = app.test_client()
    url, cid = start_turn(client)
    client.get(url).get_data()
    token = csrf_of(client.get("/").get_data(as_text=True))
    headers = {"HX-Request": "true", "X-CSRF-Token": token}
    second = client.post("/chat", data={"text": "two", "conversation": cid}, headers=headers)
    assert second.status_code == 200
    client.get(re.search(r'sse-connect="([^"]+)"', second.get_data(as_text=True)).group(1)
               ).get_data()
    third = client.post("/chat", data={"text": "three", "conversation": cid}, headers=headers)
    assert third.status_code == 409 and "full" in third.get_data(as_text=True)


def test_a_busy_worker_turns_new_replies_away_with_503(tmp_path: Any) -> None:
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "BACKEND": "demo", "MAX_REPLIES_PER_WORKER": 1})
    client = app.test_client()
    url, _ = start_turn(client)
    runner = app.extensions["webchat.runner"]
    runner.runs["someone-else"] = object()  # the worker is writing its one reply
    busy = client.get(url)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "10"
    token = csrf_of(client.get("/").get_data(as_text=True))
    refused = client.post("/chat", data={"text": "more"},
                          headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "10"
    assert "busy" in refused.get_data(as_text=True)
    del runner.runs["someone-else"]
    assert [name for name, _ in events_of(client.get(url).get_data(as_text=True))][-1] == "done"


def test_a_stream_that_breaks_ends_with_an_error_event_in_the_readers_language(
        app: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = start_turn(client)
    runner = app.extensions["webchat.runner"]
    real_tail = runner.tail

    def breaking_tail(*args: Any, **kwargs: Any) -> Any:
        tail = real_tail(*args, **kwargs)
        yield next(tail)  # the snapshot, then something goes wrong
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "tail", breaking_tail)
    client.set_cookie("lang", "zh_Hans")
    body = client.get(url).get_data(as_text=True)
    assert [name for name, _ in events_of(body)] == ["snapshot", "error"]
    error = body.split("event: error\n", 1)[1]
    assert 'role="alert"' in error and "Reload the page to see the reply." not in error
    assert re.search(r"[\u4e00-\u9fff]", error), error
    assert "boom" not in body
