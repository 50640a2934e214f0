"""Sessions, conversations, messages and run checkpoints, in plain SQL.

Caveat: sqlite3 is not cooperative under gevent, so a lock wait freezes the
whole worker. Every write is a short ``BEGIN IMMEDIATE`` transaction, never held
across a yield; the journal is WAL so readers never wait for writers; one
connection per unit of work.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

Row = sqlite3.Row

ACTIVE = ("pending", "streaming")
FINAL = ("complete", "stopped", "error", "interrupted")
TITLE_CHARS = 60


def new_id() -> str:
    """Return an unguessable id (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def connect(path: str) -> sqlite3.Connection:
    """Open a connection in autocommit mode with WAL and a small busy timeout."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def init_db(db: sqlite3.Connection) -> None:
    """Create the tables if they do not exist yet."""
    schema = resources.files("webchat").joinpath("schema.sql").read_text(encoding="utf-8")
    db.executescript(schema)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a short write transaction that takes the write lock up front."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class LimitError(Exception):
    """A limit was reached; the message says which, for the user."""


def recent_activity(db: sqlite3.Connection, column: str, value: str,
                    window: float = 60.0) -> tuple[int, float | None, int]:
    """Count messages sent by an owner or address within ``window`` seconds.

    Returns ``(sent, oldest_time, in_flight)``: how many user messages were sent,
    when the oldest of them was, and how many replies are still being written.
    """
    if column not in ("owner", "client_addr"):
        raise ValueError(column)
    since = time.time() - window
    sent, oldest = db.execute(
        f"SELECT COUNT(*), MIN(created_at) FROM messages WHERE {column} = ? AND role = 'user'"
        " AND created_at > ?", (value, since)).fetchone()
    # A reply whose worker died without anyone noticing stops counting after a while.
    in_flight = db.execute(
        f"SELECT COUNT(*) FROM messages WHERE {column} = ? AND role = 'assistant'"
        " AND status IN ('pending', 'streaming') AND updated_at > ?",
        (value, time.time() - 600)).fetchone()[0]
    return int(sent), oldest, int(in_flight)


def make_title(text: str) -> str:
    """Make a conversation title from its first message."""
    words = " ".join(text.split())
    if len(words) <= TITLE_CHARS:
        return words
    return words[: TITLE_CHARS - 1].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


# Sessions -----------------------------------------------------------------

def create_session(db: sqlite3.Connection) -> str:
    """Create a browser session and return its id."""
    now = time.time()
    session_id = new_id()
    db.execute("INSERT INTO sessions (id, created_at, seen_at) VALUES (?, ?, ?)",
               (session_id, now, now))
    return session_id


def session_exists(db: sqlite3.Connection, session_id: str) -> bool:
    """Tell whether a session id is known to the store."""
    row = db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return row is not None


# Conversations ------------------------------------------------------------

def create_conversation(db: sqlite3.Connection, owner: str, *, model: str = "",
                        system_prompt: str = "", temperature: float | None = None) -> str:
    """Create an empty conversation for ``owner`` and return its id."""
    now = time.time()
    conversation_id = new_id()
    db.execute(
        "INSERT INTO conversations (id, owner, model, system_prompt, temperature, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (conversation_id, owner, model, system_prompt, temperature, now, now),
    )
    return conversation_id


def get_conversation(db: sqlite3.Connection, owner: str, conversation_id: str) -> Row | None:
    """Return the conversation if it exists and belongs to ``owner``."""
    row: Row | None = db.execute(
        "SELECT * FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
    ).fetchone()
    return row


def list_conversations(db: sqlite3.Connection, owner: str, limit: int = 200) -> list[Row]:
    """Return the owner's conversations that have messages, newest first."""
    return db.execute(
        "SELECT * FROM conversations WHERE owner = ? AND title != ''"
        " ORDER BY updated_at DESC LIMIT ?",
        (owner, limit),
    ).fetchall()


def delete_conversation(db: sqlite3.Connection, owner: str, conversation_id: str) -> bool:
    """Delete a conversation and its messages; tell whether it existed."""
    with transaction(db):
        db.execute(
            "DELETE FROM messages WHERE conversation_id IN"
            " (SELECT id FROM conversations WHERE id = ? AND owner = ?)",
            (conversation_id, owner),
        )
        cursor = db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                            (conversation_id, owner))
    return cursor.rowcount == 1


# Messages -----------------------------------------------------------------

def list_messages(db: sqlite3.Connection, conversation_id: str, *, limit: int | None = None,
                  before: int | None = None) -> list[Row]:
    """Return a conversation's messages in order: all, or the latest ``limit`` before a position."""
    if limit is None:
        return db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY position",
            (conversation_id,)).fetchall()
    rows = db.execute(
        "SELECT * FROM messages WHERE conversation_id = ? AND position < ?"
        " ORDER BY position DESC LIMIT ?",
        (conversation_id, before if before is not None else 2**62, limit)).fetchall()
    return rows[::-1]


def rename_conversation(db: sqlite3.Connection, owner: str, conversation_id: str,
                        title: str) -> bool:
    """Give a conversation a new title; tell whether it exists and is the owner's."""
    cursor = db.execute("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?",
                        (title, conversation_id, owner))
    return cursor.rowcount == 1


def update_settings(db: sqlite3.Connection, owner: str, conversation_id: str, *, model: str,
                    system_prompt: str, temperature: float | None) -> bool:
    """Save a conversation's model, system prompt and temperature."""
    cursor = db.execute(
        "UPDATE conversations SET model = ?, system_prompt = ?, temperature = ?"
        " WHERE id = ? AND owner = ?",
        (model, system_prompt, temperature, conversation_id, owner))
    return cursor.rowcount == 1


def edit_turn(db: sqlite3.Connection, conversation_id: str, message_id: str, text: str, *,
              model: str) -> tuple[Row, Row]:
    """Change a user message, drop every later turn, and add a pending reply to it.

    Raises ValueError if the message is not a user message of this conversation
    or a reply is still being written.
    """
    now = time.time()
    with transaction(db):
        user = db.execute("SELECT * FROM messages WHERE id = ? AND conversation_id = ?"
                          " AND role = 'user'", (message_id, conversation_id)).fetchone()
        if user is None:
            raise ValueError("not a message of yours in this conversation")
        busy = db.execute("SELECT 1 FROM messages WHERE conversation_id = ?"
                          " AND status IN ('pending', 'streaming')", (conversation_id,)).fetchone()
        if busy is not None:
            raise ValueError("a reply is still being written")
        db.execute("DELETE FROM messages WHERE conversation_id = ? AND position > ?",
                   (conversation_id, user["position"]))
        db.execute("UPDATE messages SET content = ?, request_key = NULL, updated_at = ?"
                   " WHERE id = ?", (text, now, message_id))
        reply_id = new_id()
        db.execute(
            "INSERT INTO messages (id, conversation_id, position, role, status, model, owner,"
            " client_addr, created_at, updated_at)"
            " VALUES (?, ?, ?, 'assistant', 'pending', ?, ?, ?, ?, ?)",
            (reply_id, conversation_id, user["position"] + 1, model, user["owner"],
             user["client_addr"], now, now))
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        user = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        reply = db.execute("SELECT * FROM messages WHERE id = ?", (reply_id,)).fetchone()
    return user, reply


SNIPPET_START, SNIPPET_END = "\x02", "\x03"


def search(db: sqlite3.Connection, owner: str, query: str,
           limit: int = 50) -> list[Row] | list[dict[str, Any]]:
    """Find the owner's messages containing ``query`` (any language), best matches first.

    Each row has the message, its conversation's ``title`` and a ``snippet`` whose
    matches are wrapped in SNIPPET_START/SNIPPET_END. Queries shorter than three
    characters (below the trigram index) fall back to a scan.
    """
    query = query.strip()
    if not query:
        return []
    if len(query) >= 3:
        phrase = '"' + query.replace('"', '""') + '"'
        return db.execute(
            "SELECT m.*, c.title AS title,"
            f" snippet(messages_fts, 0, '{SNIPPET_START}', '{SNIPPET_END}', '…', 48) AS snippet"
            " FROM messages_fts f JOIN messages m ON m.id = f.message_id"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE messages_fts MATCH ? AND c.owner = ? ORDER BY rank LIMIT ?",
            (phrase, owner, limit)).fetchall()
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = db.execute(
        "SELECT m.*, c.title AS title FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE c.owner = ? AND m.content LIKE ? ESCAPE '\\' AND m.status != 'pending'"
        " ORDER BY m.created_at DESC LIMIT ?", (owner, f"%{escaped}%", limit)).fetchall()
    return [_with_snippet(row, query) for row in rows]


def _with_snippet(row: Row, query: str) -> dict[str, Any]:
    content: str = row["content"]
    at = content.lower().find(query.lower())
    start = max(0, at - 60)
    end = min(len(content), at + len(query) + 60)
    snippet = ("…" if start else "") + content[start:at] + SNIPPET_START + \
        content[at:at + len(query)] + SNIPPET_END + content[at + len(query):end] + \
        ("…" if end < len(content) else "")
    return {**dict(row), "snippet": snippet}


def get_message(db: sqlite3.Connection, owner: str, conversation_id: str,
                message_id: str) -> Row | None:
    """Return a message if it is in ``conversation_id`` and that belongs to ``owner``."""
    row: Row | None = db.execute(
        "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.id = ? AND m.conversation_id = ? AND c.owner = ?",
        (message_id, conversation_id, owner),
    ).fetchone()
    return row


def message_by_id(db: sqlite3.Connection, message_id: str) -> Row | None:
    """Return a message by id alone (for runs, which have no owner at hand)."""
    row: Row | None = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
    return row


def add_turn(db: sqlite3.Connection, conversation_id: str, text: str, *, model: str,
             request_key: str | None = None, owner: str = "", client_addr: str = "",
             max_messages: int | None = None) -> tuple[Row, Row, bool]:
    """Store a user message and a pending assistant reply in one transaction.

    Returns ``(user_message, assistant_message, created)``. A POST retried with
    the same ``request_key`` returns the turn it already made, with created False.
    Raises ValueError if the conversation already has a reply in progress, and
    LimitError if it already holds ``max_messages`` messages.
    """
    now = time.time()
    with transaction(db):
        if request_key:
            existing = db.execute(
                "SELECT * FROM messages WHERE conversation_id = ? AND request_key = ?",
                (conversation_id, request_key),
            ).fetchone()
            if existing is not None:
                reply = db.execute(
                    "SELECT * FROM messages WHERE conversation_id = ? AND position = ?",
                    (conversation_id, existing["position"] + 1),
                ).fetchone()
                return existing, reply, False
        busy = db.execute(
            "SELECT 1 FROM messages WHERE conversation_id = ?"
            " AND status IN ('pending', 'streaming')",
            (conversation_id,),
        ).fetchone()
        if busy is not None:
            raise ValueError("a reply is still being written")
        position = db.execute(
            "SELECT COALESCE(MAX(position), -1) + 1 FROM messages WHERE conversation_id = ?",
            (conversation_id,),
        ).fetchone()[0]
        if max_messages is not None and position + 2 > max_messages:
            raise LimitError("This conversation is full. Start a new chat to go on.")
        user_id, reply_id = new_id(), new_id()
        db.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, status,"
            " request_key, owner, client_addr, created_at, updated_at)"
            " VALUES (?, ?, ?, 'user', ?, 'complete', ?, ?, ?, ?, ?)",
            (user_id, conversation_id, position, text, request_key, owner, client_addr, now, now),
        )
        db.execute(
            "INSERT INTO messages (id, conversation_id, position, role, status, model, owner,"
            " client_addr, created_at, updated_at)"
            " VALUES (?, ?, ?, 'assistant', 'pending', ?, ?, ?, ?, ?)",
            (reply_id, conversation_id, position + 1, model, owner, client_addr, now, now),
        )
        db.execute(
            "UPDATE conversations SET updated_at = ?,"
            " title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
            (now, make_title(text), conversation_id),
        )
        user = db.execute("SELECT * FROM messages WHERE id = ?", (user_id,)).fetchone()
        reply = db.execute("SELECT * FROM messages WHERE id = ?", (reply_id,)).fetchone()
    return user, reply, True


def restart_reply(db: sqlite3.Connection, conversation_id: str, message_id: str, *,
                  keep_text: bool) -> bool:
    """Make the conversation's last reply pending again: regenerate it, or continue it.

    Only a finished reply that is the last message can restart; tell whether it did.
    """
    now = time.time()
    with transaction(db):
        last = db.execute(
            "SELECT id, status FROM messages WHERE conversation_id = ? ORDER BY position DESC"
            " LIMIT 1", (conversation_id,)).fetchone()
        if last is None or last["id"] != message_id or last["status"] not in FINAL:
            return False
        content = "content" if keep_text else "''"
        reasoning = "reasoning" if keep_text else "''"
        db.execute(
            f"UPDATE messages SET status = 'pending', content = {content},"
            f" reasoning = {reasoning}, error = '', finish_reason = '', worker_id = NULL,"
            " stop_requested = 0, prompt_tokens = NULL, completion_tokens = NULL,"
            " first_token_ms = NULL, tokens_per_second = NULL, updated_at = ? WHERE id = ?",
            (now, message_id))
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
    return True


def history_before(db: sqlite3.Connection, conversation_id: str, position: int) -> list[Row]:
    """Return the messages before ``position``: the context a reply is written for."""
    return db.execute(
        "SELECT * FROM messages WHERE conversation_id = ? AND position < ? ORDER BY position",
        (conversation_id, position),
    ).fetchall()


# Runs ---------------------------------------------------------------------

def claim_message(db: sqlite3.Connection, message_id: str, worker_id: str) -> bool:
    """Atomically take a pending reply for this worker (pending -> streaming)."""
    cursor = db.execute(
        "UPDATE messages SET status = 'streaming', worker_id = ?, updated_at = ?"
        " WHERE id = ? AND status = 'pending'",
        (worker_id, time.time(), message_id),
    )
    return cursor.rowcount == 1


def checkpoint(db: sqlite3.Connection, worker_id: str,
               replies: Sequence[tuple[str, str, str]]) -> None:
    """Save the text of streaming replies and this worker's heartbeat, in one transaction.

    ``replies`` holds ``(message_id, content, reasoning)``; only replies this
    worker still owns and that are still streaming are written.
    """
    now = time.time()
    with transaction(db):
        db.execute(
            "INSERT INTO workers (id, heartbeat_at) VALUES (?, ?)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (worker_id, now),
        )
        db.executemany(
            "UPDATE messages SET content = ?, reasoning = ?, updated_at = ?"
            " WHERE id = ? AND worker_id = ? AND status = 'streaming'",
            [(content, reasoning, now, mid, worker_id) for mid, content, reasoning in replies],
        )


def finish_message(db: sqlite3.Connection, message_id: str, worker_id: str, *, status: str,
                   content: str, reasoning: str, error: str = "", finish_reason: str = "",
                   model: str = "", stats: dict[str, Any] | None = None) -> None:
    """Write a reply's final state (only if this worker still owns it)."""
    stats = stats or {}
    with transaction(db):
        db.execute(
            "UPDATE messages SET status = ?, content = ?, reasoning = ?, error = ?,"
            " finish_reason = ?, model = CASE WHEN ? != '' THEN ? ELSE model END,"
            " prompt_tokens = ?, completion_tokens = ?, first_token_ms = ?,"
            " tokens_per_second = ?, updated_at = ?"
            " WHERE id = ? AND worker_id = ? AND status = 'streaming'",
            (status, content, reasoning, error, finish_reason, model, model,
             stats.get("prompt_tokens"), stats.get("completion_tokens"),
             stats.get("first_token_ms"), stats.get("tokens_per_second"), time.time(),
             message_id, worker_id),
        )


def fail_pending(db: sqlite3.Connection, message_id: str, error: str) -> None:
    """Mark a reply that could not even start as failed."""
    db.execute(
        "UPDATE messages SET status = 'error', error = ?, updated_at = ?"
        " WHERE id = ? AND status = 'pending'",
        (error, time.time(), message_id),
    )


def request_stop(db: sqlite3.Connection, message_id: str) -> None:
    """Flag a reply to stop; its owner notices at its next checkpoint."""
    now = time.time()
    with transaction(db):
        db.execute("UPDATE messages SET stop_requested = 1, updated_at = ? WHERE id = ?",
                   (now, message_id))
        # A reply nobody has claimed yet stops right here.
        db.execute("UPDATE messages SET status = 'stopped', updated_at = ?"
                   " WHERE id = ? AND status = 'pending'", (now, message_id))


def stop_requested(db: sqlite3.Connection, message_ids: Iterable[str]) -> set[str]:
    """Return which of these replies have been asked to stop."""
    ids = list(message_ids)
    if not ids:
        return set()
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"SELECT id FROM messages WHERE stop_requested = 1 AND id IN ({marks})", ids
    ).fetchall()
    return {row["id"] for row in rows}


def worker_alive(db: sqlite3.Connection, worker_id: str | None, stale_after: float) -> bool:
    """Tell whether a worker has sent a heartbeat within ``stale_after`` seconds."""
    if not worker_id:
        return False
    row = db.execute("SELECT heartbeat_at FROM workers WHERE id = ?", (worker_id,)).fetchone()
    return row is not None and time.time() - row["heartbeat_at"] <= stale_after


def mark_interrupted(db: sqlite3.Connection, message_id: str, worker_id: str | None) -> bool:
    """Mark a reply whose owner died as interrupted, keeping its text."""
    cursor = db.execute(
        "UPDATE messages SET status = 'interrupted', updated_at = ?"
        " WHERE id = ? AND status = 'streaming' AND worker_id IS ?",
        (time.time(), message_id, worker_id),
    )
    return cursor.rowcount == 1
