"""Model backends: ``demo`` (offline), ``local`` (llama.cpp in-process), ``openai`` (any
OpenAI-compatible API). ``make_backend`` picks one from the settings."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import ConfigError
from .base import Backend, BackendError

__all__ = ["Backend", "BackendError", "make_backend"]
logger = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def make_backend(config: Mapping[str, Any]) -> Backend:
    """Build the backend the settings ask for (``auto`` picks the best one available)."""
    choice = config["BACKEND"]
    if choice == "auto":
        if config.get("OPENAI_API_KEY") or config.get("OPENAI_BASE_URL"):
            choice = "openai"
        else:
            from .local import default_model_path
            has_local = bool(config.get("LOCAL_MODEL")) or default_model_path() is not None
            choice = "local" if has_local and _llama_available() else "demo"
    if choice == "openai":
        from .openai import OpenAIBackend, OpenAIConfig
        models = list(config.get("MODELS") or []) or ["gpt-4o-mini"]
        base_url = config.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"OPENAI_BASE_URL={base_url!r} is invalid: it must be an http(s) URL")
        return OpenAIBackend(OpenAIConfig(
            base_url=base_url, api_key=config.get("OPENAI_API_KEY"), models=models,
            connect_timeout=config["CONNECT_TIMEOUT"],
            first_token_timeout=config["FIRST_TOKEN_TIMEOUT"],
            read_timeout=config["READ_TIMEOUT"], total_timeout=config["TOTAL_TIMEOUT"],
            max_retries=config["MAX_RETRIES"]))
    if choice == "local":
        from pathlib import Path

        from .local import LocalBackend
        path = config.get("LOCAL_MODEL")
        return LocalBackend(model_path=Path(path) if path else None,
                            n_ctx=config["LOCAL_CONTEXT"], max_tokens=config["LOCAL_MAX_TOKENS"])
    from .demo import DemoBackend
    return DemoBackend(tokens_per_second=config["DEMO_TOKENS_PER_SECOND"])


def _llama_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None
