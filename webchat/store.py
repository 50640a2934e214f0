"""Sessions, conversations, messages and run checkpoints, in plain SQL, on SQLite or PostgreSQL.

One set of functions serves both databases through ``Connection``, a thin
wrapper that gives both drivers the same ``execute(sql, params)`` with ``?``
placeholders, rows addressable by column name, ``rowcount`` and
``transaction()``. ``connect`` picks the driver from the location: a path or
``sqlite:///path`` (the default), or ``postgresql://…``.

Caveats:

- SQLite: sqlite3 is not cooperative under gevent, so a lock wait freezes the
  whole worker. Every write is a short ``BEGIN IMMEDIATE`` transaction, never
  held across a yield; the journal is WAL so readers never wait for writers; one
  connection per unit of work.
- PostgreSQL: psycopg 3 from a per-process pool. Its sync connections wait on
  their socket through ``select``, which gevent patches, so a query yields to the
  other greenlets (``_cooperative_waits`` covers psycopg imported before the
  patching). SQLite's database-wide write lock serialises every check-then-write;
  PostgreSQL gets the same effect per conversation with ``SELECT … FOR UPDATE``
  on the conversation's row. Instances learn of each other's reply text through
  LISTEN/NOTIFY (``changes``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

logger = logging.getLogger(__name__)

SQLITE, POSTGRESQL = "sqlite", "postgresql"
ACTIVE = ("pending", "streaming")
FINAL = ("complete", "stopped", "error", "interrupted")
TITLE_CHARS = 60

# Migrations: version N is the N-th file (in the package, beside this module).
# Append a file to change the schema; never edit one that has been released.
MIGRATIONS: tuple[str, ...] = ("schema.sql", "schema_002_fts_rowid.sql")
_MIGRATION_LOCK = 0x77656263  # PostgreSQL advisory lock: one instance migrates at a time
NOTIFY_CHANNEL = "webchat_messages"  # the schema's trigger notifies it with a reply's id
POOL_SIZE = 10  # most PostgreSQL connections one process keeps (create_app sets it)
POOL_TIMEOUT = 15.0  # seconds to wait for a pooled connection (or the first connection)


class Row(Protocol):
    """A result row: by column name (``row["id"]``) or position, ``keys()``, ``dict(row)``."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...

    def __len__(self) -> int: ...


class Cursor(Protocol):
    """What ``Connection.execute`` returns: the rows of a query, or how many rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def new_id() -> str:
    """Return an unguessable id (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)


# Connections ----------------------------------------------------------------

def is_postgres(database: str) -> bool:
    """Tell whether a store location is a PostgreSQL URL."""
    return database.startswith(("postgresql://", "postgres://"))


def sqlite_path(database: str) -> str:
    """Return the file of a SQLite location (a path, or a ``sqlite:///path`` URL)."""
    if database.startswith("sqlite:///"):
        return database.removeprefix("sqlite:///") or ":memory:"
    return database


def describe(database: str) -> str:
    """Return a store location fit for logs: a PostgreSQL URL without its password."""
    if not is_postgres(database):
        return sqlite_path(database)
    parts = urlsplit(database)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(query=query))


class Connection:
    """One unit of work's connection to the store: the same calls on SQLite and PostgreSQL.

    ``execute`` takes ``?`` placeholders on both (translated for psycopg); rows
    read like ``sqlite3.Row``. ``close`` returns a PostgreSQL connection to its
    pool. ``raw`` is the driver's own connection, for what only one of them has.
    """

    def __init__(self, raw: Any, dialect: str,
                 release: Callable[[Any], None] | None = None) -> None:
        self.raw = raw
        self.dialect = dialect
        self._release = release
        self._closed = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement with ``?`` placeholders and return its cursor."""
        if self.dialect == SQLITE:
            cursor: Cursor = self.raw.execute(sql, params)
            return cursor
        if not params:  # psycopg reads no placeholders (nor %) in a query without them
            return self.raw.execute(sql)  # type: ignore[no-any-return]
        return self.raw.execute(_pyformat(sql), _pg_params(params))  # type: ignore[no-any-return]

    def executemany(self, sql: str, seq_of_params: Iterable[Sequence[Any]]) -> None:
        """Run one statement once for each set of parameters."""
        if self.dialect == SQLITE:
            self.raw.executemany(sql, seq_of_params)
            return
        with self.raw.cursor() as cursor:
            cursor.executemany(_pyformat(sql), [_pg_params(p) for p in seq_of_params])

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Run a short write transaction (SQLite: taking the write lock up front).

        On PostgreSQL, a transaction begun while the (shared, see ``connect``)
        connection is already in one is a savepoint within it.
        """
        if self.dialect == POSTGRESQL and self.raw.info.transaction_status != _IDLE:
            with self.raw.transaction():  # psycopg nests it as a savepoint
                yield self
            return
        self.raw.execute("BEGIN IMMEDIATE" if self.dialect == SQLITE else "BEGIN")
        try:
            yield self
        except BaseException:
            try:
                self.raw.execute("ROLLBACK")
            except Exception:
                # Interrupted mid-query (a killed greenlet): this connection is
                # unusable; closing it makes the pool drop it.
                logger.debug("rollback failed; discarding the connection", exc_info=True)
                if self.dialect == POSTGRESQL:
                    self.raw.close()
            raise
        self.raw.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (PostgreSQL: give it back to the pool)."""
        if self._closed:
            return
        self._closed = True
        if self._release is not None:
            self._release(self.raw)
        else:
            self.raw.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(database: str) -> Connection:
    """Open a connection to the store at ``database``: a SQLite path or URL, or a PostgreSQL URL.

    SQLite: autocommit mode, WAL, a small busy timeout. PostgreSQL: a connection
    from this process's pool, in autocommit mode; ``close`` gives it back. Within
    one greenlet (or thread) nested ``connect`` calls share one PostgreSQL
    connection: a view holding one that calls code which opens another (a run's
    claim, a stop) cannot starve the pool and wait on itself.
    """
    if is_postgres(database):
        return _pooled(database)
    return Connection(_sqlite_connection(sqlite_path(database)), SQLITE, release=_keep_open)


# One SQLite connection per process, OS thread and file, kept open. Why: closing a
# database's last connection checkpoints the WAL with an fsync, which stalls the
# whole gevent worker (measured: 15.8 ms per open-write-close against 1.7 ms with
# the connection kept). Greenlets of one thread may share it because sqlite3 calls
# never yield and no transaction spans a yield. Held in a real (not greenlet) thread
# local: a thread's connections close when it ends.
_SQLITE_KEPT = 8  # files per thread (tests open many; a server one)


def _thread_local_class() -> Any:
    try:
        from gevent.monkey import get_original
    except ImportError:
        return threading.local
    return get_original("_thread", "_local")


_sqlite_local = _thread_local_class()()


def _sqlite_connection(path: str) -> sqlite3.Connection:
    kept: OrderedDict[tuple[int, str], sqlite3.Connection] | None = getattr(
        _sqlite_local, "connections", None)
    if kept is None:
        kept = _sqlite_local.connections = OrderedDict()
    key = (os.getpid(), path)  # a connection inherited through fork is the parent's
    raw = kept.get(key)
    if raw is not None:
        kept.move_to_end(key)
        return raw
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    raw.row_factory = sqlite3.Row
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("PRAGMA synchronous = NORMAL")
    raw.execute("PRAGMA foreign_keys = ON")
    raw.execute("PRAGMA busy_timeout = 5000")
    raw.execute(f"PRAGMA wal_autocheckpoint = {_wal_autocheckpoint_pages}")
    kept[key] = raw
    while len(kept) > _SQLITE_KEPT:
        (pid, _), old = kept.popitem(last=False)
        if pid == os.getpid():
            old.close()
    return raw


# WAL checkpoints. SQLite runs one in the commit that makes the WAL reach 1000 pages,
# and a checkpoint writes the database file and fsyncs it: in a gevent worker that
# stalls every stream for as long as the disk takes (measured: lag p99 of 1,000
# streams 0.25 s with the store on tmpfs, 0.55-0.78 s on disk). A worker therefore
# calls ``defer_wal_checkpoints`` and runs ``checkpoint_wal`` in a real thread.
_wal_autocheckpoint_pages = 1000  # SQLite's default


def defer_wal_checkpoints(pages: int = 25_000) -> None:
    """Let commits in this process checkpoint the WAL only past ``pages`` (a safety net).

    Caveat: whoever calls this must run ``checkpoint_wal`` often, off the event loop.
    """
    global _wal_autocheckpoint_pages
    _wal_autocheckpoint_pages = pages
    for raw in getattr(_sqlite_local, "connections", {}).values():
        raw.execute(f"PRAGMA wal_autocheckpoint = {pages}")


def checkpoint_wal(database: str) -> None:
    """Copy what it can of a SQLite store's WAL into the database file; nothing on PostgreSQL.

    A PASSIVE checkpoint: it never waits for readers or writers. Caveat: it blocks
    on file writes and fsync, so a gevent worker runs it in a real thread (with that
    thread's own connection).
    """
    if not is_postgres(database):
        _sqlite_connection(sqlite_path(database)).execute("PRAGMA wal_checkpoint(PASSIVE)")


def _keep_open(raw: Any) -> None:
    if raw.in_transaction:  # never hand on a connection in a broken state
        raw.execute("ROLLBACK")




def transaction(db: Connection) -> AbstractContextManager[Connection]:
    """Run a short write transaction (see ``Connection.transaction``)."""
    return db.transaction()


@lru_cache(maxsize=1024)
def _pyformat(sql: str) -> str:
    """Translate ``?`` placeholders (outside string literals) to psycopg's ``%s``."""
    out = []
    quoted = False
    for char in sql:
        if char == "'":
            quoted = not quoted
        if char == "?" and not quoted:
            out.append("%s")
        elif char == "%":
            out.append("%%")
        else:
            out.append(char)
    return "".join(out)


def _pg_params(params: Sequence[Any]) -> tuple[Any, ...]:
    # PostgreSQL text cannot hold NUL: one in a model's output must not lose the reply.
    return tuple(p.replace("\x00", "\ufffd") if isinstance(p, str) and "\x00" in p else p
                 for p in params)


class _PgRow:
    """A PostgreSQL row that reads like ``sqlite3.Row``."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str, /) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._names[key]]
            except KeyError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _PgRow):
            return self._names == other._names and tuple(self._values) == tuple(other._values)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._values))

    def __repr__(self) -> str:
        return f"<Row {dict(zip(self._names, self._values, strict=False))!r}>"


def _pg_row_factory(cursor: Any) -> Callable[[Sequence[Any]], _PgRow]:
    names: dict[str, int] = {}
    for index, column in enumerate(cursor.description or ()):
        names.setdefault(column.name, index)  # like sqlite3.Row: the first of a repeated name
    return lambda values: _PgRow(names, values)


_pools: dict[str, ConnectionPool[Any]] = {}
_pools_pid = os.getpid()
_forked_pools: list[ConnectionPool[Any]] = []
_pools_lock = threading.Lock()


def set_pool_size(size: int) -> None:
    """Set how many PostgreSQL connections one process keeps at most (for pools made later)."""
    global POOL_SIZE
    POOL_SIZE = max(1, size)


def _pool(url: str) -> ConnectionPool[Any]:
    """Return this process's pool for ``url``, opening it (and checking the server) once."""
    global _pools_pid
    with _pools_lock:
        if _pools_pid != os.getpid():
            # Forked (gunicorn workers): the parent's connections are not ours to
            # use or close; psycopg leaves sockets of another process alone.
            _forked_pools.extend(_pools.values())
            _pools.clear()
            _held.clear()
            _pools_pid = os.getpid()
        pool = _pools.get(url)
        if pool is not None:
            return pool
        _cooperative_waits()
        from psycopg_pool import ConnectionPool, PoolTimeout

        pool = ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, timeout=POOL_TIMEOUT, name="webchat",
            kwargs={"autocommit": True, "row_factory": _pg_row_factory},
            # A connection the server dropped (restart, failover) is replaced
            # instead of failing the request that drew it.
            check=ConnectionPool.check_connection, open=True)
        try:
            pool.wait(timeout=POOL_TIMEOUT)
        except PoolTimeout:
            pool.close()
            raise _connection_error(url) from None
        if not _pools:
            atexit.register(_close_pools, os.getpid())
        _pools[url] = pool
        return pool


def _close_pools(pid: int) -> None:
    # At exit, while threads (greenlets) can still be joined: a pool left to the
    # garbage collector complains when it is finalized.
    if pid == os.getpid():
        for url in list(_pools):
            close_pool(url)


_held: dict[tuple[int, str], list[Any]] = {}  # (greenlet, url) -> [connection, users, pool]
_held_lock = threading.Lock()
_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE


def _pooled(url: str) -> Connection:
    pool = _pool(url)  # first: it forgets a forked parent's connections
    key = (threading.get_ident(), url)
    with _held_lock:
        held = _held.get(key)
        if held is not None:
            held[1] += 1
            return Connection(held[0], POSTGRESQL, lambda _raw: _release(key))
    raw = pool.getconn()
    with _held_lock:
        _held[key] = [raw, 1, pool]
    return Connection(raw, POSTGRESQL, lambda _raw: _release(key))


def _release(key: tuple[int, str]) -> None:
    with _held_lock:
        held = _held[key]
        held[1] -= 1
        if held[1]:
            return
        del _held[key]
    held[2].putconn(held[0])


def _connection_error(url: str) -> Exception:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        return psycopg.OperationalError(
            f"cannot connect to PostgreSQL at {describe(url)}: {exc}".strip())
    return psycopg.OperationalError(
        f"PostgreSQL at {describe(url)} did not give a connection within {POOL_TIMEOUT:.0f} s")


def close_pool(database: str) -> None:
    """Close this process's pool and change listener for a PostgreSQL store (tests, commands)."""
    with _pools_lock:
        pool = _pools.pop(database, None)
    changes = _changes.pop(database, None)
    if changes is not None:
        changes.close()
    if pool is not None:
        pool.close()


def _cooperative_waits() -> None:
    """Make psycopg wait through gevent's patched ``select`` if gevent patched it after import.

    psycopg picks its wait function when it is imported: its C one (which blocks
    the whole process) unless gevent had already patched ``select``. A server that
    imported psycopg first (gunicorn ``--preload``) gets the ``poll`` one here.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return
    import selectors

    from psycopg import waiting

    if waiting.wait is getattr(waiting, "wait_c", None):
        waiting.wait = waiting.wait_poll
        waiting.DefaultSelector = selectors.DefaultSelector  # type: ignore[attr-defined]
        logger.info("psycopg was imported before gevent patched select: using its poll waits")


# Schema and migrations --------------------------------------------------------

def _migration_sql(name: str, dialect: str) -> str:
    """Return a migration file's SQL for one dialect (see the markers in schema.sql)."""
    text = resources.files("webchat").joinpath(name).read_text(encoding="utf-8")
    keep, lines = True, []
    for line in text.splitlines():
        marker = line.strip()
        if marker in ("-- @sqlite", "-- @postgresql", "-- @both"):
            keep = marker.removeprefix("-- @") in (dialect, "both")
        elif keep:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _sqlite_statements(script: str) -> Iterator[str]:
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if statement.strip():
        yield statement


def schema_version(db: Connection) -> int:
    """Return the store's schema version (0: no schema yet, or made before versions)."""
    if db.dialect == SQLITE:
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                            " AND name = 'schema_version'").fetchone()
    else:
        exists = db.execute("SELECT to_regclass('schema_version')").fetchone()[0]
    if not exists:
        return 0
    return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def upgrade(db: Connection) -> list[int]:
    """Bring the schema up to date; return the versions applied (none if it already was).

    Safe to run from many workers and instances at once: one applies, the others
    wait (SQLite's write lock, a PostgreSQL advisory lock) and then find it done.
    """
    applied = []
    with db.transaction():
        if db.dialect == POSTGRESQL:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                   " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        current = schema_version(db)
        for version, name in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            script = _migration_sql(name, db.dialect)
            if db.dialect == SQLITE:
                for statement in _sqlite_statements(script):
                    db.execute(statement)
            else:
                db.execute(script)  # several statements: psycopg sends them as one query
            db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                       (version, time.time()))
            applied.append(version)
    if current > len(MIGRATIONS):
        logger.warning("the store's schema is version %d, newer than this webchat's %d",
                       current, len(MIGRATIONS))
    elif applied:
        logger.info("store schema upgraded to version %d", applied[-1])
    return applied


def init_db(db: Connection) -> None:
    """Create the tables if they do not exist yet, and apply any newer migration."""
    upgrade(db)


# Changes: instances telling each other of new reply text ----------------------

class Changes:
    """News of replies being written, for tails of a reply generated in another process.

    SQLite has no way to announce a change: ``wait`` sleeps for its timeout and
    the tail re-reads the store (``notifies`` is False). PostgreSQL: one listener
    per process on a dedicated connection (LISTEN, a thread: a greenlet under
    gevent) wakes every ``wait`` for a reply as soon as a change of it commits.
    """

    def __init__(self, url: str | None = None) -> None:
        self.notifies = url is not None
        self._url = url
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, int]] = {}
        self._heard: dict[str, float] = {}  # message id -> when its last change was heard
        self._closed = False
        self.listening = threading.Event()
        if url is not None:
            threading.Thread(target=self._listen, name="webchat-changes", daemon=True).start()

    def wait(self, message_id: str, timeout: float, since: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for a change of a reply; tell whether one came.

        ``since`` (a ``time.monotonic()`` taken before the caller last read the
        reply) makes a change heard after that time count at once, so none is
        missed between a read and the next wait.
        """
        if self._url is None:
            time.sleep(timeout)
            return False
        with self._lock:
            if since is not None and self._heard.get(message_id, -math.inf) > since:
                return True
            event, count = self._waiting.get(message_id, (threading.Event(), 0))
            self._waiting[message_id] = (event, count + 1)
        try:
            return event.wait(timeout)
        finally:
            with self._lock:
                current = self._waiting.get(message_id)
                if current is not None and current[0] is event:
                    if current[1] <= 1:
                        del self._waiting[message_id]
                    else:
                        self._waiting[message_id] = (event, current[1] - 1)

    def close(self) -> None:
        """Stop listening (the listener ends within a second)."""
        self._closed = True

    def _heard_change(self, message_id: str) -> None:
        with self._lock:
            self._heard[message_id] = time.monotonic()
            entry = self._waiting.pop(message_id, None)
        if entry is not None:
            entry[0].set()

    def _wake_everyone(self) -> None:
        """Changes may have gone unheard (no listener for a while): everyone re-reads."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            now = time.monotonic()
            for message_id in waiting:
                self._heard[message_id] = now
        for event, _count in waiting.values():
            event.set()

    def _forget_old(self) -> None:
        # ``since`` covers a tail's read and its next wait: moments, not minutes.
        cutoff = time.monotonic() - 10
        with self._lock:
            self._heard = {mid: at for mid, at in self._heard.items() if at > cutoff}

    def _listen(self) -> None:
        import psycopg

        assert self._url is not None
        while not self._closed:
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.listening.set()
                    self._wake_everyone()
                    while not self._closed:
                        for note in conn.notifies(timeout=1.0):
                            self._heard_change(note.payload)
                        self._forget_old()
            except Exception:
                self.listening.clear()
                if self._closed:
                    return
                logger.warning("listening for reply changes failed; retrying in 1 s",
                               exc_info=True)
                self._wake_everyone()
                time.sleep(1.0)
        self.listening.clear()


_changes: dict[str, Changes] = {}
_changes_pid = os.getpid()


def changes(database: str) -> Changes:
    """Return this process's ``Changes`` for the store at ``database`` (made on first use)."""
    global _changes_pid
    with _pools_lock:
        if _changes_pid != os.getpid():
            _changes.clear()  # a forked child has none of its parent's threads
            _changes_pid = os.getpid()
        found = _changes.get(database)
        if found is None:
            found = _changes[database] = Changes(database if is_postgres(database) else None)
        return found


# Backup and copy --------------------------------------------------------------

POSTGRES_BACKUP_HELP = """\
A PostgreSQL store is backed up with PostgreSQL's own tools, while webchat runs:

    pg_dump --format=custom --file=webchat.dump "$DATABASE_URL"

and restored into an empty database with:

    pg_restore --no-owner --dbname="$DATABASE_URL" webchat.dump

(Hosted PostgreSQL services also keep their own snapshots and point-in-time backups.)"""

COPIED_TABLES = ("sessions", "conversations", "messages")


def backup(database: str, target: str) -> None:
    """Copy a SQLite store into a new file with SQLite's online backup API (safe while serving).

    Raises ValueError for a PostgreSQL store (see POSTGRES_BACKUP_HELP) or an
    existing target file.
    """
    if is_postgres(database):
        raise ValueError(POSTGRES_BACKUP_HELP)
    if not os.path.exists(sqlite_path(database)):
        raise ValueError(f"the store {sqlite_path(database)} does not exist")
    if os.path.exists(target):
        raise ValueError(f"{target} already exists: choose a new file for the backup.")
    source = sqlite3.connect(sqlite_path(database))
    try:
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()


def _columns(db: Connection, table: str) -> list[str]:
    cursor: Any = db.execute(f"SELECT * FROM {table} LIMIT 0")
    cursor.fetchall()
    return [column[0] for column in cursor.description]


def count_rows(db: Connection) -> dict[str, int]:
    """Count the rows of the tables that hold users' data."""
    return {table: int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in COPIED_TABLES}


def copy_database(source: str, target: str, batch: int = 500) -> dict[str, int]:
    """Copy every session, conversation and message of one store into another, empty one.

    For moving from SQLite to PostgreSQL (any pair works). The target's schema is
    made or upgraded first; everything is copied in one transaction, so a failure
    leaves the target empty. Returns the rows copied per table. Raises ValueError,
    with a message for the user, when the source is missing or the target
    already holds data.
    """
    if not is_postgres(source) and not os.path.exists(sqlite_path(source)):
        raise ValueError(f"the source store {describe(source)} does not exist")
    if source == target:
        raise ValueError("the source and the target are the same store")
    src = connect(source)
    try:
        missing = [t for t in COPIED_TABLES if not _has_table(src, t)]
        if missing:
            raise ValueError(f"{describe(source)} is not a webchat store (no {missing[0]} table)")
        dst = connect(target)
        try:
            upgrade(dst)
            held = {t: n for t, n in count_rows(dst).items() if n}
            if held:
                what = ", ".join(f"{t}: {n}" for t, n in held.items())
                raise ValueError(
                    f"the target {describe(target)} is not empty (it holds {what}). Copy into "
                    "a new, empty database, or empty this one first; nothing was copied.")
            copied = {}
            with dst.transaction():
                for table in COPIED_TABLES:
                    target_columns = set(_columns(dst, table))
                    columns = [c for c in _columns(src, table) if c in target_columns]
                    names = ", ".join(columns)
                    insert = (f"INSERT INTO {table} ({names})"
                              f" VALUES ({', '.join('?' * len(columns))})")
                    order = " ORDER BY conversation_id, position" if table == "messages" else ""
                    rows = iter(src.raw.execute(f"SELECT {names} FROM {table}{order}"))
                    copied[table] = 0
                    while chunk := [tuple(row) for row in itertools.islice(rows, batch)]:
                        dst.executemany(insert, chunk)
                        copied[table] += len(chunk)
            if dst.dialect == POSTGRESQL:
                dst.execute("ANALYZE")  # fresh statistics for the planner after a bulk load
            return copied
        finally:
            dst.close()
    finally:
        src.close()


def _has_table(db: Connection, table: str) -> bool:
    if db.dialect == SQLITE:
        found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (table,)).fetchone()
        return found is not None
    return bool(db.execute("SELECT to_regclass(?)", (table,)).fetchone()[0])


# Limits -----------------------------------------------------------------------

class LimitError(Exception):
    """A limit was reached; the message says which, for the user."""


@dataclass(frozen=True)
class RateLimits:
    """How much one session (owner) and one client address may send and have in flight."""

    owner_per_minute: int
    owner_in_flight: int
    address_per_minute: int
    address_in_flight: int


class RateLimitError(Exception):
    """Too many messages: ``kind`` is "per_minute" or "in_flight"; retry after seconds."""

    def __init__(self, kind: str, retry_after: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


def check_rate(db: Connection, owner: str, address: str, limits: RateLimits) -> None:
    """Raise RateLimitError if the owner or the address is over a limit.

    Inside ``add_turn``'s transaction the count and the insert are one step, so
    workers taking messages at the same moment cannot all slip under a limit.
    """
    checks = (("owner", owner, limits.owner_per_minute, limits.owner_in_flight),
              ("client_addr", address, limits.address_per_minute, limits.address_in_flight))
    for column, value, per_minute, in_flight_limit in checks:
        sent, oldest, in_flight = recent_activity(db, column, value)
        if sent >= per_minute:
            wait = max(1, int(60 - (time.time() - (oldest or time.time()))) + 1)
            raise RateLimitError("per_minute", wait)
        if in_flight >= in_flight_limit:
            raise RateLimitError("in_flight", 5)


def _lock_conversation(db: Connection, conversation_id: str) -> None:
    """Serialise the writers of one conversation within a transaction.

    SQLite's ``BEGIN IMMEDIATE`` already serialises every writer; PostgreSQL
    locks the conversation's row, so two instances cannot both pass a "no reply
    in progress" check or take the same position.
    """
    if db.dialect == POSTGRESQL:
        db.execute("SELECT id FROM conversations WHERE id = ? FOR UPDATE", (conversation_id,))


def recent_activity(db: Connection, column: str, value: str,
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

def create_session(db: Connection) -> str:
    """Create a browser session and return its id."""
    now = time.time()
    session_id = new_id()
    db.execute("INSERT INTO sessions (id, created_at, seen_at) VALUES (?, ?, ?)",
               (session_id, now, now))
    return session_id


def ensure_session(db: Connection, session_id: str) -> None:
    """Record a browser session (its id was made when its first page was served)."""
    now = time.time()
    db.execute("INSERT INTO sessions (id, created_at, seen_at) VALUES (?, ?, ?)"
               " ON CONFLICT (id) DO NOTHING", (session_id, now, now))


def session_exists(db: Connection, session_id: str) -> bool:
    """Tell whether a session id is known to the store."""
    row = db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return row is not None


# Conversations ------------------------------------------------------------

def create_conversation(db: Connection, owner: str, *, model: str = "",
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


def get_conversation(db: Connection, owner: str, conversation_id: str) -> Row | None:
    """Return the conversation if it exists and belongs to ``owner``."""
    row: Row | None = db.execute(
        "SELECT * FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
    ).fetchone()
    return row


def list_conversations(db: Connection, owner: str, limit: int = 200) -> list[Row]:
    """Return the owner's conversations that have messages, newest first."""
    return db.execute(
        "SELECT * FROM conversations WHERE owner = ? AND title != ''"
        " ORDER BY updated_at DESC LIMIT ?",
        (owner, limit),
    ).fetchall()


def delete_conversation(db: Connection, owner: str, conversation_id: str) -> bool:
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

def list_messages(db: Connection, conversation_id: str, *, limit: int | None = None,
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


def rename_conversation(db: Connection, owner: str, conversation_id: str,
                        title: str) -> bool:
    """Give a conversation a new title; tell whether it exists and is the owner's."""
    cursor = db.execute("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?",
                        (title, conversation_id, owner))
    return cursor.rowcount == 1


def update_settings(db: Connection, owner: str, conversation_id: str, *, model: str,
                    system_prompt: str, temperature: float | None) -> bool:
    """Save a conversation's model, system prompt and temperature."""
    cursor = db.execute(
        "UPDATE conversations SET model = ?, system_prompt = ?, temperature = ?"
        " WHERE id = ? AND owner = ?",
        (model, system_prompt, temperature, conversation_id, owner))
    return cursor.rowcount == 1


def edit_turn(db: Connection, conversation_id: str, message_id: str, text: str, *,
              model: str) -> tuple[Row, Row]:
    """Change a user message, drop every later turn, and add a pending reply to it.

    Raises ValueError if the message is not a user message of this conversation
    or a reply is still being written.
    """
    now = time.time()
    with transaction(db):
        _lock_conversation(db, conversation_id)
        user = db.execute("SELECT * FROM messages WHERE id = ? AND conversation_id = ?"
                          " AND role = 'user'", (message_id, conversation_id)).fetchone()
        if user is None:
            raise LookupError("not a message of yours in this conversation")
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


def search(db: Connection, owner: str, query: str,
           limit: int = 50) -> list[Row] | list[dict[str, Any]]:
    """Find the owner's messages containing ``query`` (any language), best matches first.

    Each row has the message, its conversation's ``title`` and a ``snippet`` whose
    matches are wrapped in SNIPPET_START/SNIPPET_END. Searched: user messages and
    finished replies, through a trigram index (SQLite FTS5, PostgreSQL pg_trgm);
    queries shorter than three characters (below the trigram index) scan instead.
    """
    query = query.strip()
    if not query:
        return []
    pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    if len(query) < 3:
        like = "LIKE" if db.dialect == SQLITE else "ILIKE"  # SQLite's LIKE ignores case
        rows = db.execute(
            "SELECT m.*, c.title AS title FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE c.owner = ? AND m.content {like} ? ESCAPE '\\' AND m.status != 'pending'"
            " ORDER BY m.created_at DESC LIMIT ?", (owner, pattern, limit)).fetchall()
        return [_with_snippet(row, query) for row in rows]
    if db.dialect == SQLITE:
        phrase = '"' + query.replace('"', '""') + '"'
        return db.execute(
            "SELECT m.*, c.title AS title,"
            f" snippet(messages_fts, 0, '{SNIPPET_START}', '{SNIPPET_END}', '…', 48) AS snippet"
            " FROM messages_fts f JOIN messages m ON m.rowid = f.rowid"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE messages_fts MATCH ? AND c.owner = ? ORDER BY rank LIMIT ?",
            (phrase, owner, limit)).fetchall()
    rows = db.execute(
        "SELECT m.*, c.title AS title FROM messages_search s"
        " JOIN messages m ON m.id = s.message_id"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE c.owner = ? AND s.content ILIKE ? ESCAPE '\\'"
        " ORDER BY similarity(s.content, ?) DESC, m.created_at DESC LIMIT ?",
        (owner, pattern, query, limit)).fetchall()
    return [_with_snippet(row, query) for row in rows]


def _with_snippet(row: Row, query: str, context: int = 60) -> dict[str, Any]:
    """Add a ``snippet``: the text around the first match, every match in it marked."""
    content: str = row["content"]
    matches = list(re.finditer(re.escape(query), content, re.IGNORECASE))
    if not matches:
        snippet = content[:2 * context] + ("…" if len(content) > 2 * context else "")
        return {**dict(row), "snippet": snippet}
    start = max(0, matches[0].start() - context)
    end = min(len(content), matches[0].end() + context)
    parts = ["…" if start else ""]
    at = start
    for match in matches:
        if match.start() >= end:
            break
        parts += [content[at:match.start()], SNIPPET_START, match.group(), SNIPPET_END]
        at = match.end()
    end = max(at, end)
    parts += [content[at:end], "…" if end < len(content) else ""]
    return {**dict(row), "snippet": "".join(parts)}


def get_message(db: Connection, owner: str, conversation_id: str,
                message_id: str) -> Row | None:
    """Return a message if it is in ``conversation_id`` and that belongs to ``owner``."""
    row: Row | None = db.execute(
        "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.id = ? AND m.conversation_id = ? AND c.owner = ?",
        (message_id, conversation_id, owner),
    ).fetchone()
    return row


def message_by_id(db: Connection, message_id: str) -> Row | None:
    """Return a message by id alone (for runs, which have no owner at hand)."""
    row: Row | None = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
    return row


def add_turn(db: Connection, conversation_id: str, text: str, *, model: str,
             request_key: str | None = None, owner: str = "", client_addr: str = "",
             max_messages: int | None = None,
             limits: RateLimits | None = None) -> tuple[Row, Row, bool]:
    """Store a user message and a pending assistant reply in one transaction.

    Returns ``(user_message, assistant_message, created)``. A POST retried with
    the same ``request_key`` returns the turn it already made, with created False.
    Raises ValueError if the conversation already has a reply in progress,
    LimitError if it already holds ``max_messages`` messages, and RateLimitError
    past ``limits``.
    """
    now = time.time()
    with transaction(db):
        _lock_conversation(db, conversation_id)
        if limits is not None and db.dialect == POSTGRESQL:
            # SQLite's write lock already serialises this; PostgreSQL locks the
            # owner and the address, so concurrent counts cannot both pass.
            for key in (f"owner:{owner}", f"addr:{client_addr}"):
                db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))
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
        if limits is not None:
            check_rate(db, owner, client_addr, limits)
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


def restart_reply(db: Connection, conversation_id: str, message_id: str, *,
                  keep_text: bool) -> bool:
    """Make the conversation's last reply pending again: regenerate it, or continue it.

    Only a finished reply that is the last message can restart; tell whether it did.
    """
    now = time.time()
    with transaction(db):
        _lock_conversation(db, conversation_id)
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


def history_before(db: Connection, conversation_id: str, position: int) -> list[Row]:
    """Return the messages before ``position``: the context a reply is written for."""
    return db.execute(
        "SELECT * FROM messages WHERE conversation_id = ? AND position < ? ORDER BY position",
        (conversation_id, position),
    ).fetchall()


# Runs ---------------------------------------------------------------------

def claim_message(db: Connection, message_id: str, worker_id: str) -> bool:
    """Atomically take a pending reply for this worker (pending -> streaming)."""
    cursor = db.execute(
        "UPDATE messages SET status = 'streaming', worker_id = ?, updated_at = ?"
        " WHERE id = ? AND status = 'pending'",
        (worker_id, time.time(), message_id),
    )
    return cursor.rowcount == 1


def checkpoint(db: Connection, worker_id: str,
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
            # In id order: two transactions never wait for each other's rows crosswise.
            [(content, reasoning, now, mid, worker_id)
             for mid, content, reasoning in sorted(replies)],
        )


def finish_message(db: Connection, message_id: str, worker_id: str, *, status: str,
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


def fail_pending(db: Connection, message_id: str, error: str) -> None:
    """Mark a reply that could not even start as failed."""
    db.execute(
        "UPDATE messages SET status = 'error', error = ?, updated_at = ?"
        " WHERE id = ? AND status = 'pending'",
        (error, time.time(), message_id),
    )


def request_stop(db: Connection, message_id: str) -> None:
    """Flag a reply to stop; its owner notices at its next checkpoint."""
    now = time.time()
    with transaction(db):
        db.execute("UPDATE messages SET stop_requested = 1, updated_at = ? WHERE id = ?",
                   (now, message_id))
        # A reply nobody has claimed yet stops right here.
        db.execute("UPDATE messages SET status = 'stopped', updated_at = ?"
                   " WHERE id = ? AND status = 'pending'", (now, message_id))


def stop_requested(db: Connection, message_ids: Iterable[str]) -> set[str]:
    """Return which of these replies have been asked to stop."""
    ids = list(message_ids)
    if not ids:
        return set()
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"SELECT id FROM messages WHERE stop_requested = 1 AND id IN ({marks})", ids
    ).fetchall()
    return {row["id"] for row in rows}


def worker_alive(db: Connection, worker_id: str | None, stale_after: float) -> bool:
    """Tell whether a worker has sent a heartbeat within ``stale_after`` seconds."""
    if not worker_id:
        return False
    row = db.execute("SELECT heartbeat_at FROM workers WHERE id = ?", (worker_id,)).fetchone()
    return row is not None and time.time() - row["heartbeat_at"] <= stale_after


def mark_interrupted(db: Connection, message_id: str, worker_id: str | None) -> bool:
    """Mark a reply whose owner died as interrupted, keeping its text."""
    if worker_id is None:
        cursor = db.execute(
            "UPDATE messages SET status = 'interrupted', updated_at = ?"
            " WHERE id = ? AND status = 'streaming' AND worker_id IS NULL",
            (time.time(), message_id))
    else:
        cursor = db.execute(
            "UPDATE messages SET status = 'interrupted', updated_at = ?"
            " WHERE id = ? AND status = 'streaming' AND worker_id = ?",
            (time.time(), message_id, worker_id))
    return cursor.rowcount == 1
