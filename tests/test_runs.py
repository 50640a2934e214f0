"""Runs and their tails, without an app: a real SQLite store and a backend fed by the test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.queue import Queue

from webchat import store
from webchat.backends.base import ChatMessage, Delta, Settings
from webchat.runs import Runner, Update


class QueuedBackend:
    """Yield the deltas the test puts in its queue, until it puts None.

    Notes which greenlet took each delta, and whether the stream was closed.
    """

    name = "queued"

    def __init__(self) -> None:
        self.deltas: Queue[Delta | None] = Queue()
        self.takers: list[Any] = []
        self.closed = False

    def models(self) -> list[str]:
        return ["queued"]

    def stream(self, messages: list[ChatMessage], settings: Settings) -> Iterator[Delta]:
        try:
            while (delta := self.deltas.get()) is not None:
                self.takers.append(gevent.getcurrent())
                yield delta
        finally:
            self.closed = True


last_id: list[str] = []


def stored(database: str, message_id: str) -> store.Row:
    with store.connect(database) as db:
        row = store.message_by_id(db, message_id)
    assert row is not None
    return row


def wait_for(condition: Any, seconds: float = 5.0) -> None:
    """Let the hub run until ``condition()`` holds (fail after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.01)


@pytest.fixture
def database(tmp_path: Path) -> str:
    path = str(tmp_path / "webchat.sqlite3")
    db = store.connect(path)
    store.init_db(db)
    db.close()
    return path


def start_reply(runner: Runner, database: str) -> Iterator[Update]:
    """Store a turn, start its run, and return a tail of the reply (its id in ``last_id``)."""
    db = store.connect(database)
    owner = store.create_session(db)
    cid = store.create_conversation(db, owner, model="queued")
    _user, reply, _ = store.add_turn(db, cid, "hi", model="queued", owner=owner)
    db.close()
    assert runner.claim_and_start(reply, Settings(model="queued"), [ChatMessage("user", "hi")])
    last_id[:] = [reply["id"]]

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


def started_and_driven(backend: QueuedBackend, runner: Runner,
                       database: str) -> tuple[Iterator[Update], Any]:
    """Start a reply and read its first token: from then on its tail drives it."""
    tail = start_reply(runner, database)
    assert next(tail).kind == "snapshot"
    backend.deltas.put(Delta(text="Hello"))
    assert next(tail).html == "Hello"
    run = runner.runs[last_id[0]]
    # The run's greenlet took the first token (the wait for it may be long: a tail
    # inside a step cannot send keep-alives), then left the run to its tail.
    assert backend.takers[0] is not gevent.getcurrent()
    assert run.greenlet is None
    return tail, run


def test_a_tail_drives_its_run_after_the_first_token(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.05)
    tail, run = started_and_driven(backend, runner, database)
    gevent.spawn_later(0.1, backend.deltas.put, Delta(text=" world"))
    assert next(tail).html == " world"
    assert backend.takers[1] is gevent.getcurrent()  # this tail took it: one wake per token
    gevent.spawn_later(0.1, backend.deltas.put, None)
    assert [u.kind for u in tail] == ["delta", "done"]
    assert stored(database, run.message_id)["status"] == "complete"


def test_a_run_goes_on_when_its_driving_tail_leaves(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.05)
    tail, run = started_and_driven(backend, runner, database)
    tail.close()  # the tab closed
    assert run.greenlet is not None and run.keeps_greenlet
    backend.deltas.put(Delta(text=" again"))
    backend.deltas.put(None)
    wait_for(lambda: run.message_id not in runner.runs)
    row = stored(database, run.message_id)
    assert (row["status"], row["content"]) == ("complete", "Hello again")


def test_stop_cancels_the_backend_at_once_while_a_tail_drives(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.05)
    tail, run = started_and_driven(backend, runner, database)
    gevent.spawn_later(0.05, runner.stop, run.message_id)
    # This tail is inside the step, waiting for the model, when the stop comes.
    assert [u.kind for u in tail] == ["delta", "done"]
    assert backend.closed and backend.deltas.qsize() == 0
    assert stored(database, run.message_id)["status"] == "stopped"


def test_fast_deltas_are_coalesced_with_the_runs_own_greenlet_driving(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.3)
    tail, run = started_and_driven(backend, runner, database)
    for text in (" a", " b", " c"):
        backend.deltas.put(Delta(text=text))
    # The first came right after "Hello": the tail waits out the window, while the
    # run's own greenlet takes the rest, and sends all three together.
    assert next(tail).html == " a b c"
    assert backend.takers[1:] == [gevent.getcurrent(), run.greenlet, run.greenlet]
    assert run.keeps_greenlet
    backend.deltas.put(None)
    assert [u.kind for u in tail] == ["delta", "done"]


def test_a_run_whose_driving_tail_stays_away_goes_on(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.05,
                    checkpoint_seconds=0.1)
    tail, run = started_and_driven(backend, runner, database)
    # The tail is not read (a client that does not take its events): within about
    # DRIVER_AWAY_SECONDS the run's own greenlet drives again, and the reply completes.
    backend.deltas.put(Delta(text=" there"))
    backend.deltas.put(None)
    wait_for(lambda: run.message_id not in runner.runs)
    assert stored(database, run.message_id)["content"] == "Hello there"
    assert [u.kind for u in tail][-1] == "done"


def test_after_a_long_silence_the_runs_greenlet_takes_the_waits(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.05,
                    ping_seconds=0.3)
    tail, run = started_and_driven(backend, runner, database)
    # The model is silent for longer than a third of the keep-alive interval while this
    # tail waits inside the step: it cannot send keep-alives meanwhile, so from then on
    # it waits as a plain tail (and the checkpoint loop's pokes bring its keep-alives).
    gevent.spawn_later(0.2, backend.deltas.put, Delta(text="!"))
    assert next(tail).html == "!"
    assert backend.takers[1] is gevent.getcurrent()
    assert run.greenlet is not None and run.keeps_greenlet
    backend.deltas.put(None)
    assert [u.kind for u in tail] == ["delta", "done"]


def test_a_tail_given_the_callers_row_reads_the_store_only_for_the_end(database: str) -> None:
    backend = QueuedBackend()
    runner = Runner(database=database, backend=backend, coalesce_seconds=0.05)
    db = store.connect(database)
    owner = store.create_session(db)
    cid = store.create_conversation(db, owner, model="queued")
    _user, reply, _ = store.add_turn(db, cid, "hi", model="queued", owner=owner)
    db.close()
    reads: list[str] = []

    def load() -> store.Row | None:
        with store.connect(database) as db:
            row = store.get_message(db, owner, cid, reply["id"])
        reads.append(row["status"] if row is not None else "gone")
        return row

    assert runner.claim_and_start(reply, Settings(model="queued"), [ChatMessage("user", "hi")])
    tail = runner.tail(reply["id"], load, reply)
    assert next(tail).kind == "snapshot"
    assert reads == []  # the run in this worker holds the text: the caller's row will do
    backend.deltas.put(Delta(text="Hello"))
    assert next(tail).html == "Hello"
    backend.deltas.put(None)
    rest = list(tail)
    assert [u.kind for u in rest] == ["delta", "done"]
    assert reads == ["complete"]  # the finished row, for the closing message
    assert rest[-1].message is not None and rest[-1].message["content"] == "Hello"
    reads.clear()
    # No run here any more: the caller's row (read while pending) is not trusted.
    again = list(runner.tail(reply["id"], load, reply))
    assert reads == ["complete"]
    assert [u.kind for u in again] == ["snapshot", "done"]
    assert "Hello" in again[0].html + again[0].tail
