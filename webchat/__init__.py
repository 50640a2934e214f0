"""webchat: a self-hostable, server-rendered chat website for language models."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from flask import Flask

from .config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Create the webchat application: the only place that wires things together.

    Settings come from the environment (see ``webchat.config``); ``test_config``
    overrides them (keys as in ``load_config``'s result).
    """
    app = Flask(__name__, instance_relative_config=True,
                template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    app.config.update(load_config())
    if test_config:
        app.config.update(test_config)
    _configure_logging(app.config["LOG_LEVEL"])
    from . import ops
    ops.init_app(app)  # JSON logs from here on; ProxyFix, request ids, /metrics
    os.makedirs(app.instance_path, exist_ok=True)
    app.config["SECRET_KEY"] = _secret_key(app)
    app.config["DATABASE"] = _database_path(app)
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=60 * 60 * 24 * 365,
        SESSION_REFRESH_EACH_REQUEST=False,  # no Set-Cookie on every stream
        MAX_CONTENT_LENGTH=app.config["MAX_MESSAGE_CHARS"] * 4 + 64 * 1024,
    )

    from . import store
    store.set_pool_size(app.config["DATABASE_POOL_SIZE"])
    db = store.connect(app.config["DATABASE"])
    try:
        store.init_db(db)
    finally:
        db.close()

    from .backends import make_backend
    from .runs import Runner
    backend = make_backend(app.config)
    app.extensions["webchat.backend"] = backend
    app.extensions["webchat.runner"] = Runner(
        database=app.config["DATABASE"], backend=backend,
        checkpoint_seconds=app.config["CHECKPOINT_SECONDS"],
        coalesce_seconds=app.config["COALESCE_MS"] / 1000,
        ping_seconds=app.config["PING_SECONDS"],
    )

    from . import views
    views.init_app(app)
    from . import embed, i18n, identity
    i18n.init_app(app)  # Flask-Babel: the templates' _() and ngettext(), numbers, times
    identity.init_app(app)
    embed.init_app(app)
    logger.info("webchat ready: backend %s, models %s, store %s", backend.name,
                ", ".join(backend.models()), store.describe(app.config["DATABASE"]))
    return app


def _configure_logging(level: str) -> None:
    log = logging.getLogger("webchat")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def _secret_key(app: Flask) -> str:
    key = app.config.get("SECRET_KEY")
    if key:
        if len(key) < 16:
            raise ConfigError("SECRET_KEY is too short: use at least 16 random characters.")
        return str(key)
    if not (app.config["DEV"] or app.testing):
        raise ConfigError(
            "SECRET_KEY is not set. Set it to a long random string (for example the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), "
            "or set WEBCHAT_DEV=1 on your own machine."
        )
    path = Path(app.instance_path) / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32), encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def _database_path(app: Flask) -> str:
    url = app.config.get("DATABASE_URL")
    if not url:
        return str(Path(app.instance_path) / "webchat.sqlite3")
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///") or ":memory:"
    if url.startswith(("postgresql://", "postgres://")):
        return str(url)  # store.connect picks the driver from the URL
    raise ConfigError(f"DATABASE_URL={url.split(':', 1)[0]}:… is not supported: use "
                      "sqlite:///path or postgresql://user:password@host/database.")
