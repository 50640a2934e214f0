"""Fixtures: an app on a temporary SQLite file, a live gunicorn gevent server, a browser."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from webchat import create_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("WEBCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture
def app(tmp_path: Path) -> Any:
    """An app on a fresh SQLite file with the demo backend at a fast pace."""
    return create_app({
        "TESTING": True,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'webchat.sqlite3'}",
        "BACKEND": "demo",
        "DEMO_TOKENS_PER_SECOND": 5000.0,
        "COALESCE_MS": 1,
    })


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def csrf_of(html: str) -> str:
    """Return the CSRF token a page carries."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A gunicorn gevent server running webchat in a subprocess."""

    url: str
    process: subprocess.Popen[bytes]
    database: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    database_url: str | None = None  # PostgreSQL: the store is here, not in ``database``

    @property
    def store_location(self) -> str:
        """The store this server uses, as ``webchat.store.connect`` takes it."""
        return self.database_url or str(self.database)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run a query (``?`` placeholders) on this server's store, SQLite or PostgreSQL."""
        from webchat import store

        db = store.connect(self.store_location)
        try:
            return [dict(row) for row in db.execute(sql, params).fetchall()]
        finally:
            db.close()

    def row(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        """The first row of a query on this server's store, or None."""
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Run one statement (``?`` placeholders) on this server's store, committed at once."""
        from webchat import store

        db = store.connect(self.store_location)
        try:
            db.execute(sql, params)
        finally:
            db.close()

    def integrity(self) -> str:
        """Check the store hangs together: ``"ok"``, or what is wrong.

        SQLite: ``PRAGMA integrity_check`` and ``foreign_key_check``. On both: no
        message without its conversation, no two messages at one position of a
        conversation, no message in an unknown status.
        """
        from webchat import store

        problems: list[str] = []
        if not self.database_url:
            db = store.connect(self.store_location)
            try:
                result = str(db.execute("PRAGMA integrity_check").fetchone()[0])
                if result != "ok":
                    problems.append(f"integrity_check: {result}")
                if db.execute("PRAGMA foreign_key_check").fetchall():
                    problems.append("foreign_key_check found rows pointing nowhere")
            finally:
                db.close()
        checks = {
            "messages without their conversation":
                "SELECT m.id FROM messages m LEFT JOIN conversations c"
                " ON c.id = m.conversation_id WHERE c.id IS NULL",
            "two messages at one position":
                "SELECT conversation_id, position FROM messages"
                " GROUP BY conversation_id, position HAVING COUNT(*) > 1",
            "messages in an unknown status":
                "SELECT id, status FROM messages WHERE status NOT IN"
                " ('pending', 'streaming', 'complete', 'stopped', 'error', 'interrupted')",
        }
        for what, sql in checks.items():
            found = self.rows(sql)
            if found:
                problems.append(f"{what}: {found[:5]}")
        return "; ".join(problems) or "ok"

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, *, workers: int = 1, env: dict[str, str] | None = None,
                 database: Path | None = None, database_url: str | None = None) -> Server:
    """Start gunicorn (-k gevent) on a free 127.0.0.1 port and wait until it answers.

    The store is the SQLite file ``database`` (default: one in ``tmp``), or the
    PostgreSQL database at ``database_url``. With neither given and
    WEBCHAT_TEST_STORE=postgres, it is a fresh PostgreSQL database (dropped at the
    end of the session). Another instance on the same store: ``first.share(tmp)``.
    """
    if database is None and database_url is None and TEST_STORE == "postgres":
        database_url = _session_postgres_database()
    port = free_port()
    database = database or tmp / "webchat.sqlite3"
    log = tmp / f"gunicorn-{port}.log"
    full_env = {
        **os.environ,
        "SECRET_KEY": "test-secret-key-0123456789abcdef",
        "DATABASE_URL": database_url or f"sqlite:///{database}",
        "WEBCHAT_BACKEND": "demo",
        "WEBCHAT_DEMO_TOKENS_PER_SECOND": "25",
        # Every test client comes from 127.0.0.1: per-address limits are tested apart.
        "WEBCHAT_ADDRESS_MESSAGES_PER_MINUTE": "10000",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:webchat.gunicorn_conf",
         "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--graceful-timeout", "5",
         "webchat:create_app()"],
        cwd=ROOT, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError(f"gunicorn did not start:\n{log.read_text(errors='replace')}")
    # Every worker must be up, or a test may land on one still booting.
    while len(Server(url, process, database, log).worker_pids()) < workers:
        time.sleep(0.05)
    return Server(url, process, database, log, full_env, database_url)


def share(first: Server, tmp: Path, **kwargs: Any) -> Server:
    """Start another instance on ``first``'s store (its SQLite file or PostgreSQL database)."""
    return start_server(tmp, database=first.database, database_url=first.database_url, **kwargs)


# PostgreSQL ---------------------------------------------------------------------

POSTGRES_URL = os.environ.get("WEBCHAT_TEST_POSTGRES_URL", "")
POSTGRES_SKIP = ("PostgreSQL tests skipped: set WEBCHAT_TEST_POSTGRES_URL (e.g. "
                 "postgresql://postgres@127.0.0.1:5432/test); tests/run.sh sets it when a local "
                 "PostgreSQL server answers")


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty database on the test server; yield its URL; drop it afterwards."""
    import psycopg

    from webchat import store

    name = f"webchat_test_{secrets.token_hex(6)}"
    parts = urlsplit(POSTGRES_URL)
    url = urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield url
    finally:
        store.close_pool(url)
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# WEBCHAT_TEST_STORE=postgres: servers started without an explicit store get a fresh
# PostgreSQL database each (tests/run.sh runs the stream end-to-end tests so, too).
TEST_STORE = os.environ.get("WEBCHAT_TEST_STORE", "sqlite").strip().lower() or "sqlite"
if TEST_STORE not in ("sqlite", "postgres"):
    raise RuntimeError(f"WEBCHAT_TEST_STORE must be sqlite or postgres, not {TEST_STORE!r}")
_session_databases = ExitStack()  # the fresh databases servers got; dropped at session end


def _session_postgres_database() -> str:
    if not POSTGRES_URL:
        pytest.fail("WEBCHAT_TEST_STORE=postgres needs WEBCHAT_TEST_POSTGRES_URL")
    return _session_databases.enter_context(fresh_postgres_database())


@pytest.fixture(scope="session", autouse=True)
def _drop_session_databases() -> Iterator[None]:
    """Drop the PostgreSQL databases servers got (set up first, so torn down last)."""
    yield
    _session_databases.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database (skipped without a test server)."""
    if not POSTGRES_URL:
        pytest.skip(POSTGRES_SKIP)
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn gevent worker with the demo backend at 25 tokens/s."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start extra servers for one test; all are stopped at its end."""
    servers: list[Server] = []

    def factory(**kwargs: Any) -> Server:
        server = start_server(tmp_path, **kwargs)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session of tests (per xdist worker)."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it (apt-get install chromium)")
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (context) and page; console errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(f"{msg.text} at {msg.location}")
            if msg.type == "error" else None)
    page.console_errors = errors
    yield page
    context.close()


def screenshot(page: Any, name: str) -> Path:
    """Save a screenshot under tests/artifacts/ for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
