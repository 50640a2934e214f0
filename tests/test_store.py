"""The store, on real temporary SQLite files and real PostgreSQL databases.

Every test taking ``db`` runs twice: on SQLite and on PostgreSQL (a fresh
database each time, at WEBCHAT_TEST_POSTGRES_URL; skipped with a reason when it
is not set).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from webchat import store
from webchat.cli import db_main

from .conftest import POSTGRES_SKIP, POSTGRES_URL, fresh_postgres_database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The location of an empty store: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "store.sqlite3")
        return
    if not POSTGRES_URL:
        pytest.skip(POSTGRES_SKIP)
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def db(database: str) -> Iterator[store.Connection]:
    connection = store.connect(database)
    store.init_db(connection)
    yield connection
    connection.close()


def in_threads(count: int, work: Any) -> None:
    """Run ``work(n)`` in ``count`` threads at once, as other workers or instances would.

    Each thread opens its own connection (within one thread, PostgreSQL
    connections are shared).
    """
    start = threading.Barrier(count)

    def run(n: int) -> None:
        start.wait()
        work(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


def consistent(db: store.Connection) -> None:
    """Check the store is sound: SQLite's integrity check; on PostgreSQL, no orphan rows."""
    if db.dialect == store.SQLITE:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return
    orphans = db.execute("SELECT COUNT(*) FROM messages m LEFT JOIN conversations c"
                         " ON c.id = m.conversation_id WHERE c.id IS NULL").fetchone()[0]
    stale = db.execute("SELECT COUNT(*) FROM messages_search s LEFT JOIN messages m"
                       " ON m.id = s.message_id WHERE m.id IS NULL").fetchone()[0]
    assert (orphans, stale) == (0, 0)


# The turn, the run, the end ----------------------------------------------------

def test_the_sqlite_store_uses_wal(tmp_path: Path) -> None:
    db = store.connect(str(tmp_path / "store.sqlite3"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_ids_are_long_and_random() -> None:
    ids = {store.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) >= 22 for i in ids)


def test_a_turn_stores_the_message_and_a_pending_reply(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice", model="demo")
    user, reply, created = store.add_turn(db, cid, "Hello there, how are you?", model="demo")
    assert created
    assert (user["role"], user["content"], user["status"]) == ("user", "Hello there, how are you?",
                                                                "complete")
    assert (reply["role"], reply["status"], reply["position"]) == ("assistant", "pending", 1)
    assert store.get_conversation(db, "s:alice", cid)["title"] == "Hello there, how are you?"
    assert [m["id"] for m in store.list_messages(db, cid)] == [user["id"], reply["id"]]


def test_rows_read_by_name_position_and_as_dicts(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice", model="demo", temperature=0.7)
    row = store.get_conversation(db, "s:alice", cid)
    assert row["id"] == row[0] == cid
    assert row["temperature"] == 0.7  # a double, not a 4-byte float
    assert isinstance(row["created_at"], float) and abs(row["created_at"] - time.time()) < 60
    assert dict(row)["owner"] == "s:alice" and "title" in list(row.keys())
    sent, oldest = db.execute("SELECT COUNT(*), MIN(created_at) FROM conversations").fetchone()
    assert (sent, oldest) == (1, row["created_at"])
    with pytest.raises(IndexError):
        row["no_such_column"]


def test_titles_are_cut_at_a_word() -> None:
    title = store.make_title("word " * 40)
    assert len(title) <= store.TITLE_CHARS and title.endswith("…") and "  " not in title
    assert store.make_title("  line\none  ") == "line one"


def test_a_retried_post_makes_one_turn(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    first = store.add_turn(db, cid, "hi", model="demo", request_key="k" * 22)
    again = store.add_turn(db, cid, "hi", model="demo", request_key="k" * 22)
    assert again[2] is False
    assert (again[0]["id"], again[1]["id"]) == (first[0]["id"], first[1]["id"])
    assert len(store.list_messages(db, cid)) == 2


def test_no_second_turn_while_a_reply_is_being_written(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    store.add_turn(db, cid, "one", model="demo")
    with pytest.raises(ValueError):
        store.add_turn(db, cid, "two", model="demo")
    assert len(store.list_messages(db, cid)) == 2


def test_a_full_conversation_refuses_a_turn(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    store.add_turn(db, cid, "one", model="demo", max_messages=2)
    store.request_stop(db, store.list_messages(db, cid)[1]["id"])
    with pytest.raises(store.LimitError):
        store.add_turn(db, cid, "two", model="demo", max_messages=3)


def test_racing_turns_on_one_conversation_make_exactly_one(database: str,
                                                           db: store.Connection) -> None:
    """Many workers (or instances) POST at once: one turn, one position each, no error."""
    cid = store.create_conversation(db, "s:alice")
    outcomes: list[str] = []

    def post(n: int) -> None:
        with store.connect(database) as connection:
            try:
                store.add_turn(connection, cid, f"message {n}", model="demo")
                outcomes.append("made")
            except ValueError:
                outcomes.append("busy")

    in_threads(8, post)
    assert sorted(outcomes) == ["busy"] * 7 + ["made"]
    assert [m["position"] for m in store.list_messages(db, cid)] == [0, 1]


def test_racing_claims_give_a_reply_one_owner(database: str, db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    won: list[str] = []

    def claim(n: int) -> None:
        with store.connect(database) as connection:
            if store.claim_message(connection, reply["id"], f"w{n}"):
                won.append(f"w{n}")

    in_threads(6, claim)
    assert len(won) == 1
    assert store.message_by_id(db, reply["id"])["worker_id"] == won[0]


def test_another_owner_sees_nothing(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "secret", model="demo")
    assert store.get_conversation(db, "s:mallory", cid) is None
    assert store.get_message(db, "s:mallory", cid, reply["id"]) is None
    assert store.list_conversations(db, "s:mallory") == []
    assert not store.delete_conversation(db, "s:mallory", cid)
    assert store.get_conversation(db, "s:alice", cid) is not None
    assert store.search(db, "s:mallory", "secret") == []


def test_conversations_are_listed_newest_first(db: store.Connection) -> None:
    older = store.create_conversation(db, "s:alice")
    store.add_turn(db, older, "older", model="demo")
    time.sleep(0.01)
    newer = store.create_conversation(db, "s:alice")
    store.add_turn(db, newer, "newer", model="demo")
    store.create_conversation(db, "s:alice")  # empty: not listed
    assert [c["title"] for c in store.list_conversations(db, "s:alice")] == ["newer", "older"]


def test_a_reply_is_claimed_once(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    assert store.claim_message(db, reply["id"], "w1")
    assert not store.claim_message(db, reply["id"], "w2")
    assert store.message_by_id(db, reply["id"])["worker_id"] == "w1"


def test_checkpoints_and_the_end_are_written_only_by_the_owner(db: store.Connection) -> None:
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


def test_a_nul_in_a_reply_does_not_lose_it(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w1", [(reply["id"], "a\x00b", "")])
    assert store.message_by_id(db, reply["id"])["content"] in ("a\x00b", "a\ufffdb")


def test_stop_flags_a_reply_and_stops_an_unclaimed_one(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.request_stop(db, reply["id"])
    assert store.message_by_id(db, reply["id"])["status"] == "stopped"
    assert store.stop_requested(db, [reply["id"], "other"]) == {reply["id"]}


def test_a_dead_owners_reply_is_marked_interrupted_keeping_its_text(
        db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w1", [(reply["id"], "partial text", "")])
    assert not store.mark_interrupted(db, reply["id"], "w-other")
    assert not store.mark_interrupted(db, reply["id"], None)
    assert store.mark_interrupted(db, reply["id"], "w1")
    row = store.message_by_id(db, reply["id"])
    assert (row["status"], row["content"]) == ("interrupted", "partial text")


def test_a_finished_reply_restarts_and_an_edit_drops_later_turns(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    user, reply, _ = store.add_turn(db, cid, "first question", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.finish_message(db, reply["id"], "w1", status="stopped", content="half an answer",
                         reasoning="")
    assert store.restart_reply(db, cid, reply["id"], keep_text=True)
    assert not store.restart_reply(db, cid, reply["id"], keep_text=True)  # pending now
    row = store.message_by_id(db, reply["id"])
    assert (row["status"], row["content"], row["worker_id"]) == ("pending", "half an answer",
                                                                 None)
    store.request_stop(db, reply["id"])
    edited, new_reply = store.edit_turn(db, cid, user["id"], "second question", model="demo")
    assert edited["content"] == "second question" and new_reply["status"] == "pending"
    assert [m["id"] for m in store.list_messages(db, cid)] == [user["id"], new_reply["id"]]
    with pytest.raises(ValueError):
        store.edit_turn(db, cid, user["id"], "third", model="demo")  # a reply is pending


def test_deleting_a_conversation_deletes_its_messages(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    store.add_turn(db, cid, "hi", model="demo")
    assert store.delete_conversation(db, "s:alice", cid)
    assert store.list_messages(db, cid) == []
    consistent(db)


def test_rate_limits_count_what_every_connection_wrote(database: str,
                                                       db: store.Connection) -> None:
    elsewhere = store.connect(database)  # as another instance would, on the same store
    try:
        for n, connection in enumerate([db, elsewhere, db]):
            cid = store.create_conversation(connection, "s:alice")
            store.add_turn(connection, cid, f"message {n}", model="demo", owner="s:alice",
                           client_addr="10.0.0.1")
        sent, oldest, in_flight = store.recent_activity(elsewhere, "owner", "s:alice")
        assert (sent, in_flight) == (3, 3) and oldest is not None
        assert store.recent_activity(db, "client_addr", "10.0.0.1")[0] == 3
    finally:
        elsewhere.close()


# Search -------------------------------------------------------------------------

def finished_reply(db: store.Connection, cid: str, question: str, answer: str) -> str:
    _, reply, _ = store.add_turn(db, cid, question, model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w1", [(reply["id"], answer[: len(answer) // 2], "")])
    store.finish_message(db, reply["id"], "w1", status="complete", content=answer,
                         reasoning="")
    rid: str = reply["id"]
    return rid


def test_search_finds_messages_and_finished_replies_with_marked_snippets(
        db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    rid = finished_reply(db, cid, "Tell me about the Zebra, please",
                         "A zebra has stripes. " + "Filler words here. " * 20 + "Zebras run.")
    results = store.search(db, "s:alice", "zebra")
    assert {r["role"] for r in results} == {"user", "assistant"}
    for result in results:
        assert result["title"] == "Tell me about the Zebra, please"
        snippet = result["snippet"]
        assert f"{store.SNIPPET_START}" in snippet and f"{store.SNIPPET_END}" in snippet
        marked = snippet.split(store.SNIPPET_START)[1].split(store.SNIPPET_END)[0]
        assert marked.lower() == "zebra"
    assert rid in {r["id"] for r in results}
    assert store.search(db, "s:alice", "  ") == []
    assert store.search(db, "s:alice", "giraffe") == []


def test_search_finds_chinese_and_short_queries(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    finished_reply(db, cid, "我想学习拼音和汉字", "好的，我们从拼音开始。")
    assert {r["role"] for r in store.search(db, "s:alice", "拼音")} == {"user", "assistant"}
    assert len(store.search(db, "s:alice", "学习拼音")) == 1
    short = store.search(db, "s:alice", "汉")
    assert len(short) == 1 and store.SNIPPET_START + "汉" + store.SNIPPET_END in short[0]["snippet"]


def test_search_skips_replies_being_written_and_follows_edits(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    user, reply, _ = store.add_turn(db, cid, "about otters", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w1", [(reply["id"], "Otters hold hands while sleeping", "")])
    assert [r["role"] for r in store.search(db, "s:alice", "otters")] == ["user"]
    store.finish_message(db, reply["id"], "w1", status="interrupted",
                         content="Otters hold hands while sleeping", reasoning="")
    assert len(store.search(db, "s:alice", "hold hands")) == 1
    store.edit_turn(db, cid, user["id"], "about beavers", model="demo")
    assert store.search(db, "s:alice", "otters") == []
    assert len(store.search(db, "s:alice", "beavers")) == 1
    store.delete_conversation(db, "s:alice", cid)
    assert store.search(db, "s:alice", "beavers") == []


def test_search_treats_wildcards_and_quotes_as_text(db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    store.add_turn(db, cid, 'costs 100% of "the" budget_total', model="demo")
    assert len(store.search(db, "s:alice", "100%")) == 1
    assert len(store.search(db, "s:alice", '"the"')) == 1
    assert len(store.search(db, "s:alice", "budget_t")) == 1
    assert store.search(db, "s:alice", "budgetXt") == []
    assert store.search(db, "s:alice", "%") != [] and store.search(db, "s:alice", "_%") == []


# Schema versions and migrations ---------------------------------------------------

def test_the_schema_is_versioned_and_upgrading_twice_changes_nothing(
        db: store.Connection) -> None:
    assert store.schema_version(db) == len(store.MIGRATIONS)
    assert store.upgrade(db) == []
    rows = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r["version"] for r in rows] == list(range(1, len(store.MIGRATIONS) + 1))


def test_workers_starting_together_migrate_once(database: str) -> None:
    applied: list[list[int]] = []

    def start_up(n: int) -> None:
        with store.connect(database) as connection:
            applied.append(store.upgrade(connection))

    in_threads(4, start_up)
    assert sorted(applied) == [[]] * 3 + [[1, 2]]


def test_a_sqlite_file_from_before_versions_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    script = store._migration_sql("schema.sql", store.SQLITE).replace("DOUBLE PRECISION", "REAL")
    old.executescript(script)
    old.execute("INSERT INTO conversations (id, owner, title, created_at, updated_at)"
                " VALUES ('c1', 's:a', 'kept', 1, 1)")
    old.execute("INSERT INTO messages (id, conversation_id, position, role, content, status,"
                " created_at, updated_at) VALUES ('m1', 'c1', 0, 'user', 'findable words',"
                " 'complete', 1, 1)")
    old.commit()
    old.close()
    db = store.connect(str(path))
    assert store.schema_version(db) == 0
    assert store.upgrade(db) == [1, 2]
    assert store.get_conversation(db, "s:a", "c1")["title"] == "kept"
    # The search index was rebuilt, keyed by rowid, with what was there.
    assert [r["id"] for r in store.search(db, "s:a", "findable")] == ["m1"]
    db.close()


def test_the_search_index_follows_edits_replies_and_deletes(database: str,
                                                           db: store.Connection) -> None:
    cid = store.create_conversation(db, "s:alice")
    user, reply, _ = store.add_turn(db, cid, "about zebras", model="demo")
    store.claim_message(db, reply["id"], "w1")
    store.checkpoint(db, "w1", [(reply["id"], "stripes are half done", "")])
    assert store.search(db, "s:alice", "stripes") == []  # not indexed while streaming
    store.finish_message(db, reply["id"], "w1", status="complete",
                         content="stripes everywhere", reasoning="")
    assert [r["id"] for r in store.search(db, "s:alice", "stripes")] == [reply["id"]]
    store.edit_turn(db, cid, user["id"], "about horses", model="demo")
    assert store.search(db, "s:alice", "zebras") == []
    assert store.search(db, "s:alice", "stripes") == []  # the old reply went with the edit
    assert [r["id"] for r in store.search(db, "s:alice", "horses")] == [user["id"]]
    store.delete_conversation(db, "s:alice", cid)
    assert store.search(db, "s:alice", "horses") == []


# Changes: news of replies written elsewhere ----------------------------------------

def test_sqlite_changes_only_sleep(tmp_path: Path) -> None:
    changes = store.changes(str(tmp_path / "store.sqlite3"))
    started = time.monotonic()
    assert changes.wait("any", 0.05) is False
    assert 0.04 < time.monotonic() - started < 1 and not changes.notifies


def test_postgres_changes_wake_a_waiter_as_soon_as_a_checkpoint_commits(
        postgres_url: str) -> None:
    db = store.connect(postgres_url)
    store.init_db(db)
    cid = store.create_conversation(db, "s:alice")
    _, reply, _ = store.add_turn(db, cid, "hi", model="demo")
    store.claim_message(db, reply["id"], "w1")
    changes = store.changes(postgres_url)
    assert changes.notifies and changes.listening.wait(10)
    writer = store.connect(postgres_url)  # used by the writing thread (and later here)
    delays: list[float] = []
    for n in range(5):
        committed: list[float] = []

        def write(text: str = f"text {n}", committed: list[float] = committed) -> None:
            time.sleep(0.1)
            store.checkpoint(writer, "w1", [(reply["id"], text, "")])
            committed.append(time.monotonic())

        thread = threading.Thread(target=write)
        thread.start()
        assert changes.wait(reply["id"], 5.0), "no news of the checkpoint"
        woke = time.monotonic()
        thread.join()
        delays.append(woke - committed[0])
    assert max(delays) < 0.25, delays
    # A change heard between a read and the next wait is not missed.
    before_read = time.monotonic()
    store.checkpoint(writer, "w1", [(reply["id"], "while not waiting", "")])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not changes.wait(reply["id"], 0.01, since=before_read):
        pass
    assert changes.wait(reply["id"], 0.0, since=before_read)
    assert not changes.wait("another-reply", 0.05)
    writer.close()
    db.close()


GEVENT_PROBE = textwrap.dedent("""
    import sys, time
    if sys.argv[2] == "imported-first":
        import psycopg  # as with gunicorn --preload: psycopg chose its wait function already
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from webchat import store

    db = store.connect(sys.argv[1])
    gaps = []

    def ticker():
        last = time.monotonic()
        end = last + 1.2
        while time.monotonic() < end:
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def query():
        gevent.sleep(0.1)
        db.execute("SELECT pg_sleep(0.5)").fetchone()
        other = store.connect(sys.argv[1])  # a second pooled connection, made under gevent
        other.execute("SELECT pg_sleep(0.3)").fetchone()
        other.close()

    gevent.joinall([gevent.spawn(ticker), gevent.spawn(query)], raise_error=True)
    db.close()
    print(max(gaps), len(gaps))
""")


@pytest.mark.parametrize("order", ["patched-first", "imported-first"])
def test_postgres_queries_yield_to_other_greenlets_under_gevent(postgres_url: str,
                                                                order: str) -> None:
    result = subprocess.run([sys.executable, "-c", GEVENT_PROBE, postgres_url, order],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    max_gap, ticks = result.stdout.split()
    # Blocking would stall the ticker for the whole query (0.5 s); a busy machine
    # alone delays a 10 ms tick by far less than 0.25 s.
    assert float(max_gap) < 0.25, f"a query blocked the other greenlets for {max_gap} s"
    assert int(ticks) > 50


# Backup and copy to PostgreSQL -------------------------------------------------------

def populate(database: str) -> dict[str, Any]:
    """Fill a store as use would: sessions, conversations, finished and live replies."""
    db = store.connect(database)
    store.init_db(db)
    sessions = [store.create_session(db) for _ in range(3)]
    for n, sid in enumerate(sessions):
        for c in range(4):
            cid = store.create_conversation(db, f"s:{sid}", model="demo",
                                            system_prompt="Be brief." if c == 0 else "",
                                            temperature=0.3 if c == 1 else None)
            for t in range(3):
                finished_reply(db, cid, f"question {n}.{c}.{t} about 斑马 zebras",
                               f"Answer {n}.{c}.{t}: zebras are striped. 你好 👋")
        # One reply still being written, one never started.
        cid = store.create_conversation(db, f"s:{sid}")
        _, live, _ = store.add_turn(db, cid, "a question being answered", model="demo",
                                    request_key=f"key-{n}-" + "x" * 16)
        store.claim_message(db, live["id"], "w-old")
        store.checkpoint(db, "w-old", [(live["id"], "partial answer", "thinking")])
    db.close()
    return {"sessions": sessions}


def table_contents(database: str) -> dict[str, list[tuple[Any, ...]]]:
    db = store.connect(database)
    try:
        contents = {}
        for table in store.COPIED_TABLES:
            rows = db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            contents[table] = [tuple(sorted(dict(row).items())) for row in rows]
        return contents
    finally:
        db.close()


def test_sqlite_backup_copies_a_live_store(tmp_path: Path) -> None:
    source = str(tmp_path / "live.sqlite3")
    populate(source)
    assert db_main(["backup", str(tmp_path / "backup.sqlite3"), "--database", source]) == 0
    assert table_contents(str(tmp_path / "backup.sqlite3")) == table_contents(source)
    assert db_main(["backup", str(tmp_path / "backup.sqlite3"), "--database", source]) == 1


def test_postgres_backup_explains_pg_dump(postgres_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert db_main(["backup", "out.dump", "--database", postgres_url]) == 1
    assert "pg_dump" in capsys.readouterr().err
    assert not os.path.exists("out.dump")


def test_copying_sqlite_to_postgres_loses_nothing(tmp_path: Path, postgres_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = str(tmp_path / "small.sqlite3")
    populate(source)
    assert db_main(["copy", "--from", f"sqlite:///{source}", "--to", postgres_url]) == 0
    assert "copied 3 sessions, 15 conversations, 78 messages" in capsys.readouterr().out
    assert table_contents(postgres_url) == table_contents(source)

    db = store.connect(postgres_url)
    sqlite_db = store.connect(source)
    try:
        assert store.schema_version(db) == len(store.MIGRATIONS)
        hits = 0
        for row in sqlite_db.execute("SELECT DISTINCT owner FROM conversations").fetchall():
            for query in ("zebras", "斑马", "你好", "Answer 1.2"):
                found = {r["id"] for r in store.search(db, row["owner"], query)}
                expected = {r["id"] for r in store.search(sqlite_db, row["owner"], query)}
                assert found == expected, query
                hits += len(found)
        assert hits == 3 * (24 + 12 + 12) + 3  # zebras, 斑马, 你好 for everyone; one "Answer 1.2"
        consistent(db)
        # The copy goes on working: the live reply's owner is gone, a new turn works.
        live = db.execute("SELECT * FROM messages WHERE status = 'streaming'").fetchall()
        assert len(live) == 3 and all(r["content"] == "partial answer" for r in live)
        assert not store.worker_alive(db, live[0]["worker_id"], 5)
        assert store.mark_interrupted(db, live[0]["id"], live[0]["worker_id"])
        cid = live[0]["conversation_id"]
        _, reply, _ = store.add_turn(db, cid, "and now?", model="demo")
        assert reply["position"] == 3
    finally:
        db.close()
        sqlite_db.close()

    # A second copy is refused, and changes nothing.
    assert db_main(["copy", "--from", source, "--to", postgres_url]) == 1
    assert "not empty" in capsys.readouterr().err
    db = store.connect(postgres_url)
    assert store.count_rows(db)["messages"] == 80  # the copy and the new turn
    db.close()


def test_copy_refuses_a_missing_source(tmp_path: Path, postgres_url: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        store.copy_database(str(tmp_path / "nothing.sqlite3"), postgres_url)
    assert not (tmp_path / "nothing.sqlite3").exists()


def test_the_db_command_upgrades_the_configured_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'configured.sqlite3'}")
    assert db_main(["upgrade"]) == 0
    assert "schema version 2 (applied 1, 2)" in capsys.readouterr().out
    assert db_main(["upgrade"]) == 0
    assert "already up to date" in capsys.readouterr().out


def test_logged_locations_hide_the_password() -> None:
    assert store.describe("postgresql://app:s3cret@db.internal:5432/webchat") == (
        "postgresql://app:***@db.internal:5432/webchat")
    assert store.describe("postgresql://db.internal/webchat?sslmode=require&password=x") == (
        "postgresql://db.internal/webchat?sslmode=require&password=***")
    assert store.describe("postgres://app@db/webchat") == "postgres://app@db/webchat"
    assert store.describe("sqlite:///data/webchat.sqlite3") == "data/webchat.sqlite3"


def test_nested_postgres_connections_share_one_and_cannot_starve_the_pool(
        postgres_url: str) -> None:
    """A view holding a connection calls code that opens another: no second one is taken."""
    store.set_pool_size(2)
    try:
        outer = store.connect(postgres_url)
        store.init_db(outer)
        errors: list[BaseException] = []

        def request(n: int) -> None:
            try:
                with store.connect(postgres_url) as view_db:
                    cid = store.create_conversation(view_db, f"s:{n}")
                    with store.connect(postgres_url) as inner:  # e.g. a run's claim
                        assert inner.raw is view_db.raw
                        store.add_turn(inner, cid, "hi", model="demo")
                    with view_db.transaction():  # nested transactions are savepoints
                        with pytest.raises(ValueError), view_db.transaction():
                            raise ValueError("rolled back alone")
                        store.rename_conversation(view_db, f"s:{n}", cid, "kept")
                    assert store.get_conversation(view_db, f"s:{n}", cid)["title"] == "kept"
            except BaseException as exc:
                errors.append(exc)

        in_threads(6, request)
        assert errors == []
        outer.close()
    finally:
        store.close_pool(postgres_url)
        store.set_pool_size(10)


def test_the_app_runs_on_a_postgres_url_and_refuses_other_schemes(postgres_url: str) -> None:
    from webchat import create_app
    from webchat.config import ConfigError

    from .test_views import events_of, start_turn

    app = create_app({"TESTING": True, "DATABASE_URL": postgres_url, "BACKEND": "demo",
                      "DEMO_TOKENS_PER_SECOND": 5000.0, "COALESCE_MS": 1})
    assert app.config["DATABASE"] == postgres_url
    client = app.test_client()
    url, cid = start_turn(client, "Hello from PostgreSQL, zebra")
    names = [name for name, _id in events_of(client.get(url).get_data(as_text=True))]
    assert names[0] == "snapshot" and names[-1] == "done"
    assert client.get(f"/c/{cid}").status_code == 200
    assert "zebra" in client.get("/search?q=zebra").get_data(as_text=True)
    assert client.get("/healthz").status_code == 200
    with pytest.raises(ConfigError, match="postgresql://"):
        create_app({"TESTING": True, "DATABASE_URL": "mysql://db/webchat", "BACKEND": "demo"})
