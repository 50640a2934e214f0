"""The demo backend's pacing, on a fake clock."""

from __future__ import annotations

import types

import pytest

from webchat.backends import demo
from webchat.backends.base import ChatMessage, Settings

MESSAGES = [ChatMessage("user", "hello there")]


class FakeClock:
    """A monotonic clock that only moves when the demo sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def stream_on(clock: FakeClock, backend: demo.DemoBackend) -> list[tuple[float, str]]:
    """Return (time, text) of each delta the demo yields."""
    return [(clock.now, d.text) for d in backend.stream(MESSAGES, Settings()) if d.text]


def tokens_of(deltas: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Return (time, token) of each token in the deltas."""
    return [(t, token) for t, text in deltas for token in demo.tokenize(text)]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(monotonic=fake.monotonic,
                                                             sleep=fake.sleep))
    return fake


def test_slow_rates_yield_each_token_on_its_own_schedule(clock: FakeClock) -> None:
    tokens = stream_on(clock, demo.DemoBackend(tokens_per_second=20))
    start = tokens[0][0]
    assert [round(t - start, 6) for t, _ in tokens] == [i / 20 for i in range(len(tokens))]
    assert len(clock.sleeps) == len(tokens) - 1  # one wake per token
    assert "".join(text for _, text in tokens) == demo.demo_reply(MESSAGES)


def test_fast_rates_come_in_batches_never_early_and_late_by_under_a_batch(
        clock: FakeClock) -> None:
    rate, batch = 1000.0, 0.02
    deltas = stream_on(clock, demo.DemoBackend(tokens_per_second=rate, batch_seconds=batch))
    tokens = tokens_of(deltas)
    assert [token for _, token in tokens] == list(demo.demo_tokens(MESSAGES))
    start = tokens[0][0]
    lateness = [t - (start + i / rate) for i, (t, _) in enumerate(tokens)]
    assert min(lateness) >= -1e-9, "a token came before it was due"
    assert max(lateness) < batch
    # About one wake and one delta per batch, not one per token.
    assert len(clock.sleeps) <= len(tokens) / rate / batch + 2
    assert len(deltas) <= len(clock.sleeps) + 1 < len(tokens) / 10
    assert "".join(text for _, text in tokens) == demo.demo_reply(MESSAGES)


def test_error_message_fails_half_way(clock: FakeClock) -> None:
    backend = demo.DemoBackend(tokens_per_second=50)
    texts = []
    with pytest.raises(demo.BackendError, match="on purpose"):
        for delta in backend.stream([ChatMessage("user", "/error")], Settings()):
            texts.append(delta.text)
    expected = list(demo.demo_tokens([ChatMessage("user", "/error")]))
    assert "".join(texts) == "".join(expected[: len(expected) // 2])


@pytest.mark.parametrize("text", ["", "w", " ".join(["w"] * 100), "“quoted”", "a\tb  c\n\nd",
                                  "x" * 300, "你好 👋", "end with space ", "   ", "/long 3",
                                  "/long 0", " /long 12 "])
def test_tokens_are_those_of_the_whole_reply(text: str) -> None:
    messages = [ChatMessage("user", text)]
    assert list(demo.demo_tokens(messages)) == demo.tokenize(demo.demo_reply(messages))


def test_long_repeats_the_reply() -> None:
    messages = [ChatMessage("user", "/long 40")]
    reply = demo.demo_reply(messages)
    assert reply == "\n\n".join([demo.TEMPLATE.format(quote="/long 40")] * 40)
    assert sum(1 for _ in demo.demo_tokens(messages)) == len(demo.tokenize(reply))
    assert sum(1 for _ in demo.demo_tokens(messages)) > 40 * 90
    # Not a command: the text is only quoted, once.
    assert demo.demo_reply([ChatMessage("user", "/long story")]).count("demo model") == 1
    huge = demo.demo_reply([ChatMessage("user", "/long 999999")])
    assert huge.count("demo model") == demo.MAX_REPEATS
