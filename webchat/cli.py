"""The ``webchat`` command: serve the site the same way the Procfile does.

``webchat db upgrade|backup|copy`` manages the store instead (see ``webchat db -h``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> None:
    """Serve webchat with gunicorn gevent workers on a local address."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["db"]:
        sys.exit(db_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="webchat", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")))
    args = parser.parse_args(argv)
    os.environ.setdefault("WEBCHAT_DEV", "1")  # a random secret key kept in the instance folder
    try:
        load_config()
    except ConfigError as exc:
        sys.exit(f"webchat: {exc}")
    print(f"webchat: open http://{args.host}:{args.port}/ in your browser (Ctrl+C stops)",
          flush=True)
    os.execvp(sys.executable, [
        sys.executable, "-m", "gunicorn", "-c", "python:webchat.gunicorn_conf",
        "--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
        "webchat:create_app()",
    ])


def db_main(argv: list[str]) -> int:
    """Manage the store: bring its schema up to date, back it up, copy it elsewhere."""
    parser = argparse.ArgumentParser(prog="webchat db", description=db_main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    where = "the store (default: DATABASE_URL, else the instance folder's SQLite file)"
    upgrade = commands.add_parser(
        "upgrade", help="apply the schema migrations the store has not had yet "
                        "(webchat also does this when it starts)")
    upgrade.add_argument("--database", metavar="URL", help=where)
    backup = commands.add_parser(
        "backup", help="copy a SQLite store into a new file, safely while webchat runs "
                       "(PostgreSQL: how to use pg_dump)")
    backup.add_argument("path", help="the new file")
    backup.add_argument("--database", metavar="URL", help=where)
    copy = commands.add_parser(
        "copy", help="copy every conversation from one store into an empty one "
                     "(from SQLite to PostgreSQL)")
    copy.add_argument("--from", dest="source", required=True, metavar="URL",
                      help="the store to read, e.g. sqlite:///instance/webchat.sqlite3")
    copy.add_argument("--to", dest="target", required=True, metavar="URL",
                      help="the empty store to fill, e.g. postgresql://user@host/webchat")
    args = parser.parse_args(argv)

    from . import store
    used: list[str] = []
    try:
        if args.command == "copy":
            source, target = _location(args.source), _location(args.target)
            used += [source, target]
            print(f"webchat db: copying {store.describe(source)} to {store.describe(target)}…",
                  flush=True)
            copied = store.copy_database(source, target)
            print("webchat db: copied " + ", ".join(f"{n} {t}" for t, n in copied.items()))
            return 0
        database = _location(args.database)
        used.append(database)
        if args.command == "backup":
            if store.is_postgres(database):
                print(store.POSTGRES_BACKUP_HELP, file=sys.stderr)
                return 1
            store.backup(database, args.path)
            print(f"webchat db: backed up {store.describe(database)} to {args.path}")
            return 0
        if not store.is_postgres(database) and os.path.dirname(database):
            os.makedirs(os.path.dirname(database), exist_ok=True)
        db = store.connect(database)
        try:
            applied = store.upgrade(db)
            version = store.schema_version(db)
        finally:
            db.close()
        done = f"applied {', '.join(map(str, applied))}" if applied else "already up to date"
        print(f"webchat db: {store.describe(database)} is at schema version {version} ({done})")
        return 0
    except (ValueError, ConfigError) as exc:
        print(f"webchat db: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a driver error: say what failed, without a traceback
        print(f"webchat db: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for location in used:
            if store.is_postgres(location):
                store.close_pool(location)


def _location(url: str | None) -> str:
    """Return the store location for a URL or path, or the configured one (as the app does)."""
    from flask import Flask

    from . import _database_path

    app = Flask("webchat", instance_relative_config=True)
    app.config["DATABASE_URL"] = url or load_config().get("DATABASE_URL")
    if url and "://" not in url:
        return url  # a plain path to a SQLite file
    return _database_path(app)
