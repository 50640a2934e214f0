"""The SQLite store, on real temporary files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from webchat import store


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    connection = store.connect(str(tmp_path / "store.sqlite3"))
    store.init_db(connection)
    return connection


def test_the_store_uses_wal(db: sqlite3.Connection) -> None:
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_ids_are_long_and_random() -> None:
    ids = {store.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) >= 22 for i in ids)


def test_a_turn_stores_the_message_and_a_pending_reply(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice", model="demo")
    user, reply, created = store.add_turn(db, cid, "Hello there, how are you?", model="demo")
    assert created
    assert (user["role"], user["content"], user["status"]) == ("user", "Hello there, how are you?",
                                                                "complete")
    assert (reply["role"], reply["status"], reply["position"]) == ("assistant", "pending", 1)
    assert store.get_conversation(db, "s:alice", cid)["title"] == "Hello there, how are you?"
    assert [m["id"] for m in store.list_messages(db, cid)] == [user["id"], reply["id"]]


def test_titles_are_cut_at_a_word(db: sqlite3.Connection) -> None:
    title = store.make_title("word " * 40)
    assert len(title) <= store.TITLE_CHARS and title.endswith("…") and "  " not in title
    assert store.make_title("  line\none  ") == "line one"


def test_a_retried_post_makes_one_turn(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    first = store.add_turn(db, cid, "hi", model="demo", request_key="k" * 22)
    again = store.add_turn(db, cid, "hi", model="demo", request_key="k" * 22)
    assert again[2] is False
    assert (again[0]["id"], again[1]["id"]) == (first[0]["id"], first[1]["id"])
    assert len(store.list_messages(db, cid)) == 2


def test_no_second_turn_while_a_reply_is_being_written(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    store.add_turn(db, cid, "one", model="demo")
    with pytest.raises(ValueError):
        store.add_turn(db, cid, "two", model="demo")
    assert len(store.list_messages(db, cid)) == 2


def test_another_owner_sees_nothing(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "secret", model="demo")
    assert store.get_conversation(db, "s:mallory", cid) is None
    assert store.get_message(db, "s:mallory", cid, reply["id"]) is None
    assert store.list_conversations(db, "s:mallory") == []
    assert not store.delete_conversation(db, "s:mallory", cid)
    assert store.get_conversation(db, "s:alice", cid) is not None


def test_conversations_are_listed_newest_first(db: sqlite3.Connection) -> None:
    older = store.create_conversation(db, "s:alice")
    store.add_turn(db, older, "older", model="demo")
    time.sleep(0.01)
    newer = store.create_conversation(db, "s:alice")
    store.add_turn(db, newer, "newer", model="demo")
    store.create_conversation(db, "s:alice")  # empty: not listed
    assert [c["title"] for c in store.list_conversations(db, "s:alice")] == ["newer", "older"]


def test_a_reply_is_claimed_once(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    assert store.claim_message(db, reply["id"], "w1")
    assert not store.claim_message(db, reply["id"], "w2")
    assert store.message_by_id(db, reply["id"])["worker_id"] == "w1"


def test_checkpoints_and_the_end_are_written_only_by_the_owner(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w2", [(reply["id"], "intruder", "")])
    store.checkpoint(db, "w1", [(reply["id"], "Hello", "hmm")])
    row = store.message_by_id(db, reply["id"])
    assert (row["content"], row["reasoning"], row["status"]) == ("Hello", "hmm", "streaming")
    assert store.worker_alive(db, "w1", 5)
    assert not store.worker_alive(db, "w2-never-seen", 5)
    store.finish_message(db, reply["id"], "w1", status="complete", content="Hello there",
                         reasoning="hmm", finish_reason="stop", model="demo",
                         stats={"completion_tokens": 2, "first_token_ms": 12})
    row = store.message_by_id(db, reply["id"])
    assert (row["status"], row["content"], row["completion_tokens"]) == ("complete",
                                                                         "Hello there", 2)
    # A late checkpoint cannot undo the end.
    store.checkpoint(db, "w1", [(reply["id"], "Hel", "")])
    assert store.message_by_id(db, reply["id"])["content"] == "Hello there"


def test_stop_flags_a_reply_and_stops_an_unclaimed_one(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.request_stop(db, reply["id"])
    assert store.message_by_id(db, reply["id"])["status"] == "stopped"
    assert store.stop_requested(db, [reply["id"], "other"]) == {reply["id"]}


def test_a_dead_owners_reply_is_marked_interrupted_keeping_its_text(
        db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w1", [(reply["id"], "partial text", "")])
    assert not store.mark_interrupted(db, reply["id"], "w-other")
    assert store.mark_interrupted(db, reply["id"], "w1")
    row = store.message_by_id(db, reply["id"])
    assert (row["status"], row["content"]) == ("interrupted", "partial text")


def test_deleting_a_conversation_deletes_its_messages(db: sqlite3.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    store.add_turn(db, cid, "hi", model="demo")
    assert store.delete_conversation(db, "s:alice", cid)
    assert store.list_messages(db, cid) == []
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
