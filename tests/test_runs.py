"""Runs and their tails, without an app: a real SQLite store and a backend fed by the test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent.queue import Queue

from webchat import store
from webchat.backends.base import ChatMessage, Delta, Settings
from webchat.runs import Runner, Update


class QueuedBackend:
    """Yield the deltas the test puts in its queue, until it puts None."""

    name = "queued"

    def __init__(self) -> None:
        self.deltas: Queue[Delta | None] = Queue()

    def models(self) -> list[str]:
        return ["queued"]

    def stream(self, messages: list[ChatMessage], settings: Settings) -> Iterator[Delta]:
        while (delta := self.deltas.get()) is not None:
            yield delta


@pytest.fixture
def database(tmp_path: Path) -> str:
    path = str(tmp_path / "webchat.sqlite3")
    db = store.connect(path)
    store.init_db(db)
    db.close()
    return path


def start_reply(runner: Runner, database: str) -> Iterator[Update]:
    """Store a turn, start its run, and return a tail of the reply."""
    db = store.connect(database)
    owner = store.create_session(db)
    cid = store.create_conversation(db, owner, model="queued")
    _user, reply, _ = store.add_turn(db, cid, "hi", model="queued", owner=owner)
    db.close()
    assert runner.claim_and_start(reply, Settings(model="queued"), [ChatMessage("user", "hi")])

    def load() -> store.Row | None:
        with store.connect(database) as db:
            return store.get_message(db, owner, cid, reply["id"])

    return runner.tail(reply["id"], load)


def test_the_first_token_is_not_held_back_and_later_ones_are_coalesced(database: str) -> None:
    window = 0.5
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=window)
    tail = start_reply(runner, database)
    assert next(tail).kind == "snapshot"
    backend.deltas.put(Delta(text="Hello"))
    asked = time.monotonic()
    first = next(tail)
    # Right after the snapshot: no coalescing window to wait out.
    assert (first.kind, first.html) == ("text", "Hello")
    assert time.monotonic() - asked < window / 2
    # Two tokens within the window after it come out together, once it has passed.
    backend.deltas.put(Delta(text=" wor"))
    backend.deltas.put(Delta(text="ld"))
    second = next(tail)
    assert (second.kind, second.html) == ("text", " world")
    assert time.monotonic() - asked >= window
    backend.deltas.put(None)
    rest = list(tail)
    assert [u.kind for u in rest] == ["delta", "done"]
    assert rest[-1].message is not None and rest[-1].message["content"] == "Hello world"
    gevent.joinall([r.greenlet for r in runner.runs.values() if r.greenlet], timeout=5)
