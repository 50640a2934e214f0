"""Isolation: nothing of another session can be read, changed or started; ids can't be guessed.

Every route that takes a conversation or message id is found in ``app.url_map``, so a
route added later is covered without editing this file. For each, someone else's id
must answer exactly like a random well-formed id (status, content type and body).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from webchat import store

from .security_support import (
    ID_RE,
    db_rows,
    htmx_headers,
    make_app,
    message_row,
    send_turn,
    token_of,
)

SECRET_WORDS = "zanzibar-quokka-owner-only"
# Form fields every POST route may look at: valid values, so only ownership can refuse.
FORM = {"text": "stranger text", "title": "stranger title", "model": "demo",
        "temperature": "0.5", "system_prompt": "stranger prompt", "conversation": ""}


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    """An owner with a finished turn and a pending one, and a stranger with a turn of its own."""
    app = make_app(tmp_path)
    owner = app.test_client()
    done = send_turn(owner, f"first {SECRET_WORDS}")
    owner.get(done["stream"]).get_data()  # read to the end: the reply is complete
    assert message_row(app.config["DATABASE"], done["reply"])["status"] == "complete"
    pending = send_turn(owner, f"second {SECRET_WORDS}")  # never streamed: stays pending
    stranger = app.test_client()
    own = send_turn(stranger, "the stranger's own chat")
    stranger.get(own["stream"]).get_data()
    return {"app": app, "owner": owner, "done": done, "pending": pending,
            "stranger": stranger, "own": own, "token": token_of(stranger)}


def id_routes(app: Any) -> list[Any]:
    """Every rule of the app whose URL carries a conversation or message id."""
    rules = [rule for rule in app.url_map.iter_rules()
             if {"cid", "mid"} & set(rule.arguments)]
    assert len(rules) >= 10, "the id routes were not found"
    return sorted(rules, key=lambda rule: rule.rule)


def build(app: Any, rule: Any, cid: str, mid: str, fmt: str = "json") -> str:
    values = {"cid": cid, "mid": mid, "fmt": fmt}
    with app.test_request_context():
        from flask import url_for
        return url_for(rule.endpoint, **{k: values[k] for k in rule.arguments})


def call(client: Any, rule: Any, url: str, token: str, *, htmx: bool,
         accept: str = "") -> Any:
    headers = htmx_headers(token) if htmx else {"X-CSRF-Token": token}
    if accept:
        headers["Accept"] = accept
    if "GET" in rule.methods:
        query = "?before=5&edit=x" if rule.endpoint.endswith("older_messages") else ""
        return client.get(url + query, headers=headers)
    return client.post(url, data=FORM, headers=headers)


def signature(response: Any) -> tuple[int, str, bytes, bool]:
    """What a client can observe of an answer (the request id header aside)."""
    return (response.status_code, response.headers.get("Content-Type", ""),
            response.get_data(), "Set-Cookie" in response.headers)


def test_someone_elses_ids_answer_exactly_like_random_ids_on_every_route(world: Any) -> None:
    app, stranger, token = world["app"], world["stranger"], world["token"]
    done, pending, own = world["done"], world["pending"], world["own"]
    database = app.config["DATABASE"]
    before = {cid: db_rows(database, cid) for cid in (done["cid"], pending["cid"])}
    checked = 0
    for rule in id_routes(app):
        for fmt in (["json", "md"] if "fmt" in rule.arguments else ["json"]):
            random_url = build(app, rule, store.new_id(), store.new_id(), fmt)
            targets = [build(app, rule, conv["cid"], conv[kind], fmt)
                       for conv, kind in itertools.product((done, pending), ("user", "reply"))]
            if "mid" in rule.arguments:  # the stranger's own conversation, the owner's message
                targets += [build(app, rule, own["cid"], conv[kind], fmt) for conv, kind
                            in itertools.product((done, pending), ("user", "reply"))]
            for htmx, accept in [(True, ""), (False, ""), (False, "text/event-stream")]:
                expected = signature(call(stranger, rule, random_url, token, htmx=htmx,
                                          accept=accept))
                assert expected[0] == 404, (rule.rule, expected)
                for url in targets:
                    got = signature(call(stranger, rule, url, token, htmx=htmx, accept=accept))
                    assert got == expected, (
                        f"{rule.rule} ({'htmx' if htmx else 'plain'} {accept}): someone else's "
                        f"id {url} answers differently from a random id")
                    checked += 1
    assert checked >= 100
    # Nothing of the owner's changed: no rename, settings, edit, delete, stop or restart.
    assert {cid: db_rows(database, cid) for cid in before} == before
    reply = message_row(database, pending["reply"])
    assert reply["status"] == "pending" and reply["worker_id"] is None
    assert reply["stop_requested"] == 0


def test_a_strangers_stream_request_does_not_start_a_pending_reply(world: Any) -> None:
    app, stranger, pending = world["app"], world["stranger"], world["pending"]
    for accept in ("text/event-stream", "*/*"):
        for last_event_id in (None, "0", "5"):
            headers = {"Accept": accept}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            assert stranger.get(pending["stream"], headers=headers).status_code == 404
    reply = message_row(app.config["DATABASE"], pending["reply"])
    assert reply["status"] == "pending", "a stranger's GET started someone else's reply"
    assert reply["worker_id"] is None and reply["content"] == ""
    assert pending["reply"] not in app.extensions["webchat.runner"].runs
    # Nobody at all (no session) cannot start it either; the owner then can.
    assert app.test_client().get(pending["stream"]).status_code == 404
    assert message_row(app.config["DATABASE"], pending["reply"])["status"] == "pending"
    body = world["owner"].get(pending["stream"]).get_data(as_text=True)
    assert "event: done" in body
    assert message_row(app.config["DATABASE"], pending["reply"])["status"] == "complete"


def test_a_stranger_cannot_post_into_someone_elses_conversation(world: Any) -> None:
    app, stranger, token, done = world["app"], world["stranger"], world["token"], world["done"]
    before = db_rows(app.config["DATABASE"], done["cid"])
    answers = []
    for cid in (done["cid"], store.new_id()):
        response = stranger.post("/chat", data={**FORM, "conversation": cid},
                                 headers=htmx_headers(token))
        answers.append(signature(response))
    assert answers[0][0] == 404 and answers[0] == answers[1]
    assert db_rows(app.config["DATABASE"], done["cid"]) == before


def test_search_the_sidebar_and_embed_show_nothing_of_others(world: Any) -> None:
    stranger, done = world["stranger"], world["done"]
    for path in ["/", f"/search?q={SECRET_WORDS}", "/search?q=first", "/search?q=zan",
                 f"/c/{world['own']['cid']}", "/embed"]:
        response = stranger.get(path)
        assert response.status_code == 200, path
        html = response.get_data(as_text=True)
        assert SECRET_WORDS not in html and done["cid"] not in html, path
    # The owner does find it, so the search is not simply empty.
    found = world["owner"].get(f"/search?q={SECRET_WORDS}").get_data(as_text=True)
    assert done["cid"] in found
    mine, random_one = (stranger.get(f"/embed?c={cid}") for cid in (done["cid"], store.new_id()))
    assert mine.status_code == random_one.status_code == 404
    assert mine.get_data() == random_one.get_data()


def test_ids_are_unguessable(world: Any) -> None:
    issued = [world[key][kind] for key in ("done", "pending", "own")
              for kind in ("cid", "user", "reply")]
    assert all(ID_RE.match(value) for value in issued), issued
    many = [store.new_id() for _ in range(2000)] + issued
    assert len(set(many)) == len(many)
    assert all(ID_RE.match(value) for value in many)
    # 22 url-safe characters carry 128 random bits: no shared prefixes, no counters.
    for a, b in itertools.pairwise(many):
        assert a[:4] != b[:4] or a[4:8] != b[4:8]
    alphabet = set("".join(many))
    assert len(alphabet) >= 60, "ids use a narrow alphabet"


def test_a_forged_sign_in_header_from_an_untrusted_peer_owns_nothing(tmp_path: Path) -> None:
    app = make_app(tmp_path, TRUSTED_USER_HEADER="X-Forwarded-User",
                   TRUSTED_PROXIES=["10.0.0.1/32"])
    proxy = {"REMOTE_ADDR": "10.0.0.1"}
    alice = app.test_client()
    token = token_of(alice)
    response = alice.post("/chat", data={"text": f"alice {SECRET_WORDS}"},
                          headers={**htmx_headers(token), "X-Forwarded-User": "alice"},
                          environ_base=proxy)
    assert response.status_code == 200
    cid = response.get_data(as_text=True).split('id="conversation-id" value="')[1].split('"')[0]
    assert alice.get(f"/c/{cid}", headers={"X-Forwarded-User": "alice"},
                     environ_base=proxy).status_code == 200
    attacker = app.test_client()
    forged = {"X-Forwarded-User": "alice"}
    assert attacker.get(f"/c/{cid}", headers=forged).status_code == 404
    assert SECRET_WORDS not in attacker.get("/", headers=forged).get_data(as_text=True)
    # A name with a comma means the header was sent twice (the client's and the proxy's).
    assert attacker.get(f"/c/{cid}", headers={"X-Forwarded-User": "alice,alice"},
                        environ_base=proxy).status_code == 404
