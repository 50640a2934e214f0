"""The ``webchat`` command: serve the site the same way the Procfile does."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> None:
    """Serve webchat with gunicorn gevent workers on a local address."""
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
