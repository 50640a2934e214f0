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
from flask import url_for

from webchat import create_app, store

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


def make_world(path: Path) -> dict[str, Any]:
    """An owner with a finished turn and a pending one, and a stranger with a turn of its own."""
    app = make_app(path)
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


@pytest.fixture(scope="module")
def shared_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One world for the tests that only look (each asserts that nothing changed)."""
    return make_world(tmp_path_factory.mktemp("isolation"))


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    return make_world(tmp_path)


_ROUTES_APP: list[Any] = []


def _routes_app() -> Any:
    if not _ROUTES_APP:
        # Only the URL map is read: an in-memory store that vanishes is enough.
        _ROUTES_APP.append(create_app({"TESTING": True, "DATABASE_URL": "sqlite:///:memory:",
                                       "BACKEND": "demo"}))
    return _ROUTES_APP[0]


def _endpoints_with_ids() -> list[str]:
    """Every endpoint whose URL carries a conversation or message id (read at collection)."""
    return sorted({rule.endpoint for rule in id_routes(_routes_app())})


def _endpoints_with_message_ids() -> list[str]:
    return sorted({rule.endpoint for rule in id_routes(_routes_app()) if "mid" in rule.arguments})


def id_routes(app: Any) -> list[Any]:
    """Every rule of the app whose URL carries a conversation or message id."""
    rules = [rule for rule in app.url_map.iter_rules()
             if {"cid", "mid"} & set(rule.arguments)]
    assert len(rules) >= 10, "the id routes were not found"
    return sorted(rules, key=lambda rule: rule.rule)


def build(app: Any, rule: Any, cid: str, mid: str, fmt: str = "json") -> str:
    values = {"cid": cid, "mid": mid, "fmt": fmt}
    with app.test_request_context():
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


def rule_of(app: Any, endpoint: str) -> Any:
    return next(rule for rule in app.url_map.iter_rules() if rule.endpoint == endpoint)


VARIANTS = [(True, ""), (False, ""), (False, "text/event-stream")]  # htmx, plain, EventSource


def assert_like(stranger: Any, rule: Any, token: str, targets: list[str], baseline: str) -> int:
    """Assert each target URL answers 404, exactly as ``baseline`` does; return the count."""
    checked = 0
    for htmx, accept in VARIANTS:
        expected = signature(call(stranger, rule, baseline, token, htmx=htmx, accept=accept))
        assert expected[0] == 404, (rule.rule, baseline, expected[:2])
        for url in targets:
            got = signature(call(stranger, rule, url, token, htmx=htmx, accept=accept))
            assert got == expected, (
                f"{rule.rule} ({'htmx' if htmx else 'plain'} {accept}): {url} answers "
                f"{got[0]}, unlike {baseline} ({expected[0]})")
            checked += 1
    return checked


def owner_targets(app: Any, rule: Any, cid_of: Any, world: dict[str, Any]) -> list[str]:
    formats = ["json", "md"] if "fmt" in rule.arguments else ["json"]
    return [build(app, rule, cid_of(conv), conv[kind], fmt)
            for conv, kind, fmt in itertools.product(
                (world["done"], world["pending"]), ("user", "reply"), formats)]


def assert_owner_untouched(world: dict[str, Any], before: Any) -> None:
    database = world["app"].config["DATABASE"]
    cids = (world["done"]["cid"], world["pending"]["cid"])
    assert {cid: db_rows(database, cid) for cid in cids} == before, "the owner's data changed"
    reply = message_row(database, world["pending"]["reply"])
    assert reply["status"] == "pending" and reply["worker_id"] is None
    assert reply["stop_requested"] == 0


def owner_rows(world: dict[str, Any]) -> Any:
    database = world["app"].config["DATABASE"]
    return {cid: db_rows(database, cid)
            for cid in (world["done"]["cid"], world["pending"]["cid"])}


@pytest.mark.parametrize("endpoint", _endpoints_with_ids())
def test_someone_elses_ids_answer_exactly_like_random_ids(shared_world: dict[str, Any],
                                                         endpoint: str) -> None:
    app, world = shared_world["app"], shared_world
    rule = rule_of(app, endpoint)
    before = owner_rows(world)
    baseline = build(app, rule, store.new_id(), store.new_id())
    targets = owner_targets(app, rule, lambda conv: conv["cid"], world)
    assert assert_like(world["stranger"], rule, world["token"], targets, baseline) >= 6
    assert_owner_untouched(world, before)



@pytest.mark.parametrize("endpoint", [
    e for e in _endpoints_with_ids() if e in _endpoints_with_message_ids()])
def test_someone_elses_message_in_your_own_conversation_is_a_404(
        shared_world: dict[str, Any], endpoint: str) -> None:
    app, world = shared_world["app"], shared_world
    rule = rule_of(app, endpoint)
    before = owner_rows(world)
    own = world["own"]["cid"]
    baseline = build(app, rule, own, store.new_id())
    targets = owner_targets(app, rule, lambda conv: own, world)
    assert assert_like(world["stranger"], rule, world["token"], targets, baseline) >= 6
    assert_owner_untouched(world, before)


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


def test_a_stranger_cannot_post_into_someone_elses_conversation(shared_world: Any) -> None:
    world = shared_world
    app, stranger, token, done = world["app"], world["stranger"], world["token"], world["done"]
    before = db_rows(app.config["DATABASE"], done["cid"])
    answers = []
    for cid in (done["cid"], store.new_id()):
        response = stranger.post("/chat", data={**FORM, "conversation": cid},
                                 headers=htmx_headers(token))
        answers.append(signature(response))
    assert answers[0][0] == 404 and answers[0] == answers[1]
    assert db_rows(app.config["DATABASE"], done["cid"]) == before


def test_search_the_sidebar_and_embed_show_nothing_of_others(shared_world: Any) -> None:
    stranger, done = shared_world["stranger"], shared_world["done"]
    for path in ["/", f"/search?q={SECRET_WORDS}", "/search?q=first", "/search?q=zan",
                 f"/c/{shared_world['own']['cid']}", "/embed"]:
        response = stranger.get(path)
        assert response.status_code == 200, path
        html = response.get_data(as_text=True)
        for secret in (f"first {SECRET_WORDS}", f"second {SECRET_WORDS}", done["cid"],
                       shared_world["pending"]["cid"], "<mark>"):
            assert secret not in html, (path, secret)
    # The owner does find it, so the search is not simply empty.
    found = shared_world["owner"].get(f"/search?q={SECRET_WORDS}").get_data(as_text=True)
    assert done["cid"] in found
    mine, random_one = (stranger.get(f"/embed?c={cid}") for cid in (done["cid"], store.new_id()))
    assert mine.status_code == random_one.status_code == 404
    assert mine.get_data() == random_one.get_data()


def test_ids_are_unguessable(shared_world: Any) -> None:
    issued = [shared_world[key][kind] for key in ("done", "pending", "own")
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
