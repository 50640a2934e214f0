"""A reply's generation: claim, stream from the backend, checkpoint, stop, tail.

A *run* is the generation of one reply, owned by the worker that claimed it. It
outlives the HTTP connection that started it: the streaming route only *tails*
it. A tail in the owning worker is woken in-process at once; a tail in another
worker (or instance) reads the store's checkpoints.

A run has a greenlet of its own until its first text; then, while the tokens come
no faster than the coalescing window, the tail that follows it advances it too
(one wake per token instead of two). Whenever that tail leaves, lingers, waits
long for the model or must coalesce, the run's own greenlet takes over again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gevent
from gevent import Greenlet
from gevent.hub import Waiter, get_hub

from . import metrics, store
from .backends.base import Backend, BackendError, ChatMessage, Settings
from .render import StreamRenderer

logger = logging.getLogger(__name__)

_SURROGATE = re.compile("[\ud800-\udfff]")
REMOTE_POLL_SECONDS = 0.25  # a tail of a run in another worker re-reads the store this often
# ... unless the store announces changes (PostgreSQL): then this is only a safety net.
REMOTE_WAIT_SECONDS = 2.0
STALE_AFTER_SECONDS = 5.0  # a worker silent this long is dead (heartbeat every checkpoint)
DRIVER_AWAY_SECONDS = 1.0  # a run no tail has advanced for this long gets its own greenlet
CHECKPOINT_BATCH = 250  # replies saved per write transaction (see Runner.checkpoint)


class StopRun(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised inside a run's greenlet to stop it."""


@dataclass(slots=True)
class Run:
    """The live state of one reply being generated in this worker."""

    message_id: str
    conversation_id: str
    content: str = ""
    reasoning: str = ""
    queued: bool = False
    status: str = "streaming"
    error: str = ""
    model: str = ""
    stop_requested: bool = False
    dirty: bool = False
    version: int = 0
    # The generation, advanced one delta at a time by one driver: the run's own greenlet
    # or, while tokens come no faster than the coalescing window, the tail of the
    # connection that waits for them (see ``Runner.tail``).
    steps: Generator[None, None, None] | None = None
    greenlet: Greenlet | None = None  # the run's own driver, when it has one
    stepping: Any = None  # the greenlet inside a step (waiting on the backend), if any
    stepped_at: float = 0.0  # when the last step ended
    texted: bool = False  # the first text has come: a tail may drive from now on
    tails: int = 0  # tails following the run in this worker
    keeps_greenlet: bool = False  # taken back from the tails: its greenlet drives to the end
    waiters: list[Waiter] = field(default_factory=list)  # tails waiting for news

    def undriven(self) -> bool:
        """Tell whether the run goes on but nobody drives it now (see ``Runner._step``)."""
        return self.greenlet is None and self.stepping is None and self.steps is not None

    def notify(self) -> None:
        """Wake every tail waiting for news of this run (called once per token)."""
        self.dirty = True
        self.version += 1
        if self.waiters:
            self.poke()

    def poke(self) -> None:
        """Wake the tails without news, so that a silent stream can send a keep-alive."""
        waiters, self.waiters = self.waiters, []
        loop = get_hub().loop
        for waiter in waiters:
            loop.run_callback(waiter.switch, None)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the run notifies or pokes, or ``timeout`` seconds pass.

        Caveat: check ``version`` and ``status`` before waiting; a wake may bring
        no news. (A bare gevent Waiter: a tail waits once per token, and an Event
        made and set for each cost 2.5 µs more per wake, of about 20.)
        """
        waiter = Waiter()
        self.waiters.append(waiter)
        if timeout is None:
            waiter.get()
            return
        timer = get_hub().loop.timer(timeout)
        timer.start(waiter.switch, None)
        try:
            waiter.get()
        finally:
            timer.close()
            if waiter in self.waiters:
                self.waiters.remove(waiter)


class Update(NamedTuple):
    """One thing a tail tells its client; the view turns it into an SSE event.

    ``kind`` is one of the event names in ``webchat.sse`` or ``"ping"``. For
    ``done`` and ``error``, ``message`` is the final stored row to render.
    (A named tuple: one is made per token; a frozen dataclass took 3.5x as long.)
    """

    kind: str
    html: str = ""
    event_id: str = ""
    message: store.Row | None = None
    tail: str = ""  # for ``snapshot`` and ``delta``: the open block; ``html`` has finished ones


class Runner:
    """Start, track, checkpoint and stop the runs of this worker process."""

    def __init__(self, *, database: str, backend: Backend, checkpoint_seconds: float = 0.5,
                 coalesce_seconds: float = 0.04, ping_seconds: float = 15.0) -> None:
        self.database = database
        self.backend = backend
        self.checkpoint_seconds = checkpoint_seconds
        self.coalesce_seconds = coalesce_seconds
        self.ping_seconds = ping_seconds
        self.runs: dict[str, Run] = {}
        # Set by the gunicorn worker (gunicorn_conf): SQLite WAL checkpoints run in a
        # real thread instead of inside commits. Off elsewhere (tests, scripts), where
        # many runners may share a process.
        self.wal_in_thread = False
        self._checkpointer: Greenlet | None = None
        self._pid = -1
        self.worker_id = ""

    # Ownership -------------------------------------------------------------

    def _ensure_worker(self) -> None:
        # gunicorn forks workers after the app is made: the id and the
        # checkpoint greenlet belong to the process that runs the replies.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.worker_id = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"
            self.runs = {}
            self._checkpointer = None
        if self._checkpointer is None or self._checkpointer.dead:
            if self.wal_in_thread:
                store.defer_wal_checkpoints()
            self._checkpointer = gevent.spawn(self._checkpoint_loop)

    def claim_and_start(self, message: store.Row, settings: Settings,
                        history: list[ChatMessage]) -> bool:
        """Claim a pending reply for this worker and start its run; tell whether we did."""
        self._ensure_worker()
        db = store.connect(self.database)
        try:
            if not store.claim_message(db, message["id"], self.worker_id):
                return False
        finally:
            db.close()
        # A continued reply starts from the text it already has.
        metrics.record_reply_started()
        run = Run(message_id=message["id"], conversation_id=message["conversation_id"],
                  content=message["content"], reasoning=message["reasoning"])
        self.runs[run.message_id] = run
        run.steps = self._generate(run, settings, history)
        run.greenlet = gevent.spawn(self._drive, run)
        return True

    # Driving -----------------------------------------------------------------
    #
    # Why a tail may drive: with a greenlet of its own, every token wakes two
    # greenlets (the run's, then the tail's); a tail that advances the generation
    # itself wakes once, and a stream holds one greenlet fewer (measured: 9 KB a
    # stream, and 5-8% of the CPU at 20 tokens/s). The run still outlives the
    # connection: whenever its tail leaves, needs to coalesce, or lingers away from
    # the run (a slow client), the run's own greenlet takes over again.

    def _take_over(self, run: Run) -> None:
        """Give the run a greenlet of its own that drives it to the end (if it has none)."""
        run.keeps_greenlet = True
        if run.greenlet is None and run.steps is not None:
            run.greenlet = gevent.spawn(self._drive, run)

    def _drive(self, run: Run) -> None:
        me = gevent.getcurrent()
        try:
            while run.steps is not None and run.greenlet is me:
                if run.stepping is not None:
                    run.wait()  # a tail is inside a step; it notifies when it is out
                    continue
                self._step(run)
                if run.texted and run.tails and not run.keeps_greenlet:
                    # The first text has come and a tail follows: it drives from here
                    # on. (Not before: a tail inside a step cannot send keep-alives,
                    # and the wait for the first token may be long.)
                    run.greenlet = None
        except (StopRun, gevent.GreenletExit):
            if run.steps is not None and run.stepping is None:
                # Killed between steps (waiting for a tail): end the generation here.
                self._end(run, StopRun if run.stop_requested else gevent.GreenletExit)
        finally:
            if run.greenlet is me:
                run.greenlet = None

    def _step(self, run: Run) -> None:
        """Advance the run by one delta, in the calling greenlet."""
        steps = run.steps
        assert steps is not None and run.stepping is None
        run.stepping = gevent.getcurrent()
        try:
            next(steps)
        except StopIteration:
            run.steps = None
        finally:
            run.stepping = None
            run.stepped_at = time.monotonic()

    def _end(self, run: Run, signal: type[BaseException]) -> None:
        """End a run that nobody is stepping, as if ``signal`` had been raised in it."""
        steps, run.steps = run.steps, None
        if steps is not None:
            with contextlib.suppress(StopIteration, StopRun, gevent.GreenletExit):
                steps.throw(signal)
        if self.runs.get(run.message_id) is run:  # it never started: nothing saved its end
            run.status = "stopped" if signal is StopRun else "interrupted"
            metrics.record_reply_finished(run.status)
            self._finish(run, "", {})

    # Generation ------------------------------------------------------------

    def _generate(self, run: Run, settings: Settings,
                  history: list[ChatMessage]) -> Generator[None, None, None]:
        """Generate the reply, yielding after each delta (a driver advances it).

        The reply's end (stopped, failed, interrupted) is saved before it returns.
        """
        started = time.monotonic()
        first_token: float | None = None
        usage: dict[str, int] = {}
        finish_reason = ""
        stream = self.backend.stream(history, settings)
        try:
            for delta in stream:
                if delta.model:
                    run.model = delta.model
                if delta.queued is not None:
                    run.queued = delta.queued
                if delta.usage:
                    usage.update(delta.usage)
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
                text, reasoning = delta.text, delta.reasoning
                if text or reasoning:
                    if first_token is None:
                        first_token = time.monotonic()
                    # A lone surrogate (JSON can carry "\ud800") cannot be stored or sent.
                    if text:
                        run.content += text if text.isascii() else _SURROGATE.sub("\ufffd", text)
                    if reasoning:
                        run.reasoning += (reasoning if reasoning.isascii()
                                          else _SURROGATE.sub("\ufffd", reasoning))
                    run.texted = run.texted or bool(text)
                run.notify()
                if run.stop_requested:
                    raise StopRun
                yield
                if run.stop_requested:  # asked while the driver was away
                    raise StopRun
            run.status = "complete"
        except StopRun:
            run.status = "stopped"
        except gevent.GreenletExit:
            run.status = "interrupted"
        except BackendError as exc:
            metrics.record_upstream_error()
            if finish_reason == "length":  # some providers add an error after a length cut-off
                run.status = "complete"
            else:
                run.status, run.error = "error", exc.message
        except Exception:
            logger.exception("run %s failed", run.message_id)
            run.status, run.error = "error", "Something went wrong while writing this reply."
        finally:
            # Closing the generator cancels the upstream request (closes its socket).
            try:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            except Exception:
                logger.exception("closing the backend stream of %s failed", run.message_id)
        if run.status == "complete" and finish_reason == "length":
            run.error = "The reply was cut off because it reached the length limit."
        elif run.status == "complete" and finish_reason == "content_filter":
            run.error = "The provider's content filter stopped this reply."
        stats: dict[str, Any] = {
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        }
        if first_token is not None:
            stats["first_token_ms"] = round((first_token - started) * 1000)
            elapsed = time.monotonic() - first_token
            if usage.get("completion_tokens") and elapsed > 0:
                stats["tokens_per_second"] = round(usage["completion_tokens"] / elapsed, 1)
        metrics.record_reply_finished(run.status, first_token_ms=stats.get("first_token_ms"),
                                      prompt_tokens=stats["prompt_tokens"],
                                      completion_tokens=stats["completion_tokens"])
        self._finish(run, finish_reason, stats)

    def _finish(self, run: Run, finish_reason: str, stats: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                db = store.connect(self.database)
                try:
                    store.finish_message(
                        db, run.message_id, self.worker_id, status=run.status,
                        content=run.content, reasoning=run.reasoning, error=run.error,
                        finish_reason=finish_reason, model=run.model, stats=stats)
                finally:
                    db.close()
                break
            except Exception:
                logger.exception("saving the end of run %s failed (try %d)", run.message_id,
                                 attempt + 1)
                gevent.sleep(0.2 * (attempt + 1))
        self.runs.pop(run.message_id, None)
        run.dirty = False
        run.notify()

    def stop(self, message_id: str) -> None:
        """Ask a reply to stop: at once if it runs here, else through the store."""
        db = store.connect(self.database)
        try:
            store.request_stop(db, message_id)
        finally:
            db.close()
        self._stop_local(message_id)

    def _stop_local(self, message_id: str) -> None:
        run = self.runs.get(message_id)
        if run is None or run.stop_requested:
            return
        run.stop_requested = True
        if run.stepping is not None:
            # Raise at whatever the step waits on (usually a socket read), so
            # the upstream request is cancelled now, not at the next token.
            get_hub().loop.run_callback(_interrupt, run, run.stepping, StopRun)
        else:
            self._take_over(run)  # between steps: the next one stops; let it come now

    def _checkpoint_loop(self) -> None:
        last_poke = time.monotonic()
        while True:
            gevent.sleep(self.checkpoint_seconds)
            try:
                self.checkpoint()
            except Exception:
                logger.exception("checkpoint failed")
            # A run whose driving tail stays away (a slow client, a stalled send) or
            # that no tail drives any more goes on in its own greenlet.
            away = time.monotonic() - DRIVER_AWAY_SECONDS
            for run in list(self.runs.values()):
                if run.undriven() and run.stepped_at < away:
                    self._take_over(run)
            if self.wal_in_thread and not store.is_postgres(self.database):
                try:
                    # In a real thread: it writes the database file and fsyncs it.
                    get_hub().threadpool.apply(store.checkpoint_wal, (self.database,))
                except Exception:
                    logger.exception("WAL checkpoint failed")
            # Tails wait without a timeout (a gevent Timeout per wait costs more than
            # the token it waits for); this wakes silent ones for their keep-alives.
            if time.monotonic() - last_poke >= min(self.ping_seconds / 3, 5.0):
                last_poke = time.monotonic()
                for run in list(self.runs.values()):
                    run.poke()

    def checkpoint(self) -> None:
        """Save every changed reply's text, beat the heart, pick up stop requests.

        Written in batches of ``CHECKPOINT_BATCH`` replies with the streams let run
        in between: one write holds the whole worker (about 8 µs a reply, so 2,000
        replies in one transaction would stop every stream for over 16 ms).
        """
        if not self.runs:
            return  # nothing to save, nobody to stop, and no reply needs the heartbeat
        dirty = [run for run in self.runs.values() if run.dirty]
        for run in dirty:
            run.dirty = False
        db = store.connect(self.database)
        try:
            for start in range(0, max(len(dirty), 1), CHECKPOINT_BATCH):
                if start:
                    gevent.sleep(0)  # outside a transaction: the streams run meanwhile
                batch = dirty[start:start + CHECKPOINT_BATCH]
                store.checkpoint(db, self.worker_id,
                                 [(r.message_id, r.content, r.reasoning) for r in batch])
            stops = store.stop_requested(db, list(self.runs))
        finally:
            db.close()
        for message_id in stops:
            self._stop_local(message_id)

    def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Let runs finish for up to ``grace_seconds``, then save the rest as interrupted."""
        for run in list(self.runs.values()):
            if run.stepping is None:
                self._take_over(run)  # the tails are going away with their connections
        greenlets = [r.greenlet for r in self.runs.values() if r.greenlet is not None]
        if grace_seconds > 0 and greenlets:
            gevent.joinall(greenlets, timeout=grace_seconds)
        for run in list(self.runs.values()):
            if run.stepping is not None and run.stepping is not run.greenlet:
                get_hub().loop.run_callback(_interrupt, run, run.stepping, gevent.GreenletExit)
            if run.greenlet is not None:
                run.greenlet.kill(gevent.GreenletExit, block=True, timeout=1.0)
        deadline = time.monotonic() + 1.0
        while self.runs and time.monotonic() < deadline:
            gevent.sleep(0.02)  # a tail interrupted inside a step saves its run's end

    # Tailing ---------------------------------------------------------------

    def tail(self, message_id: str, load: Callable[[], store.Row | None],
             row: store.Row | None = None) -> Iterator[Update]:
        """Follow a reply: a snapshot first, then increments, then done or error.

        ``load`` re-reads the message row (with the owner check done by the
        caller); ``row``, if given, is the row the caller has just read that way,
        which saves the first read while the reply is being written here. A reply
        generated in this worker is followed in-process; one generated elsewhere
        through the store's checkpoints. Caveat: a tail may advance the run itself
        (see ``Driving``), so iterate it promptly.
        """
        counted = self.runs.get(message_id) if self._pid == os.getpid() else None
        if counted is not None:
            counted.tails += 1
        try:
            updates = self._tail(message_id, load, row)
            del row  # a stream's memory caps how many one worker serves: hold no copy
            yield from updates
        finally:
            if counted is not None:
                counted.tails -= 1
                if counted.undriven():
                    self._take_over(counted)  # it goes on without this tail

    def _tail(self, message_id: str, load: Callable[[], store.Row | None],
              known: store.Row | None) -> Iterator[Update]:
        read_at = time.monotonic()  # a change announced after this is news to this tail
        run = self.runs.get(message_id) if self._pid == os.getpid() else None
        row: store.Row | None
        if known is not None and run is not None:
            row = known  # the run holds the text: the row need only exist, the owner's
        else:
            row = load()
            # Looked up after the read, which may yield (PostgreSQL) while a run ends.
            run = self.runs.get(message_id) if self._pid == os.getpid() else None
        del known
        if row is None:
            return
        renderer = StreamRenderer(keep_blocks=False)
        content, reasoning, queued = _state(run, row)
        seen = run.version if run is not None else -1
        event_id = _event_id(content, reasoning)
        if run is None and row["status"] not in store.ACTIVE:
            # Finished already: its final form, and done (the stream URL is idempotent).
            blocks, tail = renderer.feed(content)
            yield Update("snapshot", "".join(blocks), event_id, tail=tail)
            if reasoning:
                yield Update("think", reasoning, event_id)
            yield Update("error" if row["status"] == "error" else "done", event_id=event_id,
                         message=row)
            return
        snapshot_blocks, snapshot_tail, _ = renderer.feed_growing(content)
        # Hold no copy of the text while waiting (the run has the current one): a
        # stream's memory is what caps how many one worker can serve.
        del row, content
        yield Update("snapshot", "".join(snapshot_blocks), event_id, tail=snapshot_tail or "")
        del snapshot_blocks, snapshot_tail
        if reasoning:
            yield Update("think", reasoning, event_id)
        if queued:
            yield Update("status", "queued", event_id)
        sent_reasoning, sent_queued = reasoning, queued
        last_sent = time.monotonic()  # anything, a keep-alive too: for the next keep-alive
        # The last increment: the next one waits out the coalescing window after it. Not
        # the snapshot: the first token, which comes right after it, would wait a window.
        last_increment = float("-inf")
        while True:
            if run is not None:
                if run.status == "streaming" and run.version == seen:
                    driving = run.undriven()
                    if driving:
                        stepped = time.monotonic()
                        self._step(run)  # nobody else drives it: this tail does
                        if run.stepped_at - stepped > self.ping_seconds / 3:
                            # The model went silent a while: a tail inside a step sends
                            # no keep-alives, so the run's greenlet takes the waits.
                            self._take_over(run)
                    else:
                        run.wait()
                    if run.status == "streaming" and run.version == seen:  # a poke
                        if time.monotonic() - last_sent >= self.ping_seconds:
                            last_sent = time.monotonic()
                            yield Update("ping")
                        continue
                    pause = last_increment + self.coalesce_seconds - time.monotonic()
                    if pause > 0:
                        if driving and pause > self.coalesce_seconds / 2:
                            # Deltas come faster than the window: they are coalesced,
                            # and the run's own greenlet drives while this tail waits.
                            # (A delta only a little early, a late event's jitter, is
                            # held back while this tail keeps driving.)
                            self._take_over(run)
                        gevent.sleep(pause)
                seen = run.version
                if run.status == "streaming":
                    content, reasoning, queued = run.content, run.reasoning, run.queued
                    final = False
                else:
                    # Its end is being saved (a PostgreSQL write yields to this greenlet):
                    # read the row once it is there.
                    while self.runs.get(message_id) is run:
                        run.wait(timeout=1.0)
                    run = None
                    row = load()
                    if row is None:
                        return
                    content, reasoning, queued = _state(None, row)
                    final = True
            else:
                # Another process writes this reply: wait for news of it (PostgreSQL
                # announces each checkpoint; SQLite can only be polled), then re-read.
                changes = store.changes(self.database)
                changes.wait(message_id, REMOTE_WAIT_SECONDS if changes.notifies
                             else REMOTE_POLL_SECONDS, since=read_at)
                read_at = time.monotonic()
                row = self._reload_remote(load)
                if row is None:
                    return
                if row["status"] == "streaming" and row["worker_id"] == self.worker_id:
                    run = self.runs.get(message_id)  # it moved here; follow it in-process
                    seen = -1
                content, reasoning, queued = _state(run, row)
                final = run is None and row["status"] not in store.ACTIVE
            event_id = _event_id(content, reasoning)
            sent_any = False
            if reasoning != sent_reasoning:
                # Reasoning only grows: send what is new, not all of it again
                # (a reasoning model's thinking runs to thousands of tokens).
                if reasoning.startswith(sent_reasoning):
                    yield Update("thought", reasoning[len(sent_reasoning):], event_id)
                else:
                    yield Update("think", reasoning, event_id)
                sent_reasoning, sent_any = reasoning, True
            if queued != sent_queued:
                yield Update("status", "queued" if queued else "generating", event_id)
                sent_queued, sent_any = queued, True
            if final:
                # Bring the body to its final form with one last delta, so that the
                # closing event need not carry the whole reply again.
                last_blocks, last_tail = renderer.feed(content)
                yield Update("delta", "".join(last_blocks), event_id, tail=last_tail)
                yield Update("error" if row["status"] == "error" else "done", event_id=event_id,
                             message=row)
                return
            blocks, tail_html, grown = renderer.feed_growing(content)
            del content
            if tail_html is not None:
                # One event for both, so the page never shows a block twice
                # (appended, and still in the old tail) between two swaps.
                yield Update("delta", "".join(blocks), event_id, tail=tail_html)
                sent_any = True
            elif grown:
                yield Update("text", grown, event_id)
                sent_any = True
            now = time.monotonic()
            if sent_any:
                last_sent = last_increment = now
            elif now - last_sent >= self.ping_seconds:
                yield Update("ping")
                last_sent = now

    def _reload_remote(self, load: Callable[[], store.Row | None]) -> store.Row | None:
        row = load()
        if row is None or row["status"] != "streaming" or row["worker_id"] == self.worker_id:
            return row
        db = store.connect(self.database)
        try:
            if not store.worker_alive(db, row["worker_id"], STALE_AFTER_SECONDS) and (
                    time.time() - row["updated_at"] > STALE_AFTER_SECONDS):
                store.mark_interrupted(db, row["id"], row["worker_id"])
                return load()
        finally:
            db.close()
        return row


def _interrupt(run: Run, greenlet: Any, signal: type[BaseException]) -> None:
    """Raise ``signal`` in ``greenlet`` if it is still inside a step of ``run``.

    Checked when the hub runs this callback: by then the greenlet may have left the
    step (to send an event), and raising there would break its connection instead.
    """
    if run.stepping is greenlet and not greenlet.dead:
        greenlet.throw(signal)


def _state(run: Run | None, row: store.Row) -> tuple[str, str, bool]:
    if run is not None:
        return run.content, run.reasoning, run.queued
    return row["content"], row["reasoning"], False


def _event_id(content: str, reasoning: str) -> str:
    return str(len(content) + len(reasoning))
