"""TokenCounter: each message is tokenized once; additivity is probed, never assumed; Memory keeps
the budget a hard cap under counters that are not additive (chat templates), even one that changes
mid-run."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lagoon.agent.memory import Memory
from lagoon.agent.token_counter import TokenCounter
from lagoon.config import TruncationStrategy
from lagoon.protocols import ChatMessage, ToolCall
from lagoon.testing import approx_token_count


class Counting:
    """An additive counter (words + 4 per message) that records what it was asked to count."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.chars = 0  # characters tokenized, over all calls

    def __call__(self, messages) -> int:
        self.calls.append(len(messages))
        self.chars += sum(len(m.content) for m in messages)
        return sum(approx_token_count(m.content) + 4 for m in messages)


class Templated(Counting):
    """Like a chat template: a fixed preamble per prompt (BOS, default system text) and a
    generation prompt, on top of the per-message cost — so the sum of single counts overshoots
    and no per-message number is the truth. `templated=False` counts like `Counting` (as a local
    backend does before its engine loads)."""

    def __init__(self, preamble: int = 12, templated: bool = True) -> None:
        super().__init__()
        self.preamble, self.templated = preamble, templated

    def truth(self, messages) -> int:
        base = sum(approx_token_count(m.content) + 4 for m in messages)
        return base + (self.preamble if self.templated else 0)

    def __call__(self, messages) -> int:
        self.calls.append(len(messages))
        return self.truth(messages)


def _msgs(n: int, words: int = 30) -> list[ChatMessage]:
    return [ChatMessage("user" if i % 2 else "assistant", " ".join(f"m{i}w{j}" for j in range(words)),
                        tool_calls=(ToolCall(f"c{i}", "bash", {"command": f"ls {i}"}),) if i % 2 == 0 else ())
            for i in range(n)]


def test_each_message_is_counted_once_and_an_additive_counter_is_never_asked_for_the_whole():
    count = Counting()
    counter = TokenCounter(count)
    msgs = _msgs(20)
    assert counter.probe(msgs[:2]) is True
    for k in range(1, 21):
        assert counter.whole(msgs[:k]) == count(msgs[:k])
        count.calls.pop()  # the check's own call
    assert sorted(count.calls) == [1] * 20 + [2], "20 single counts and the probe; no whole-list count"
    # a changed message is a new key; the same content in a new object is not
    assert counter.one(ChatMessage("user", msgs[1].content)) == counter.one(msgs[1])
    assert len(count.calls) == 21


def test_a_non_additive_counter_is_caught_by_the_probe_and_counted_whole():
    count = Templated()
    counter = TokenCounter(count)
    msgs = _msgs(6)
    assert counter.probe(msgs[:2]) is False and not counter.additive
    assert counter.whole(msgs) == count(msgs)
    before = len(count.calls)
    assert counter.whole(list(msgs)) == counter.whole(msgs)
    assert len(count.calls) == before, "the same list is not counted again"


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(250, 2500), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=25),
       strategy=st.sampled_from(list(TruncationStrategy)), preamble=st.integers(1, 40),
       switch_at=st.sampled_from([0, 3, 100]))
def test_budget_is_a_hard_cap_under_a_templated_counter(budget, sizes, strategy, preamble, switch_at):
    count = Templated(preamble, templated=switch_at == 0)
    mem = Memory(count, budget=budget, strategy=strategy, system="You are a coder.", task="fix the bug")
    context = [" ".join(f"ctx{i}_{j}" for j in range(40)) for i in range(3)]
    for i, n in enumerate(sizes):
        if i == switch_at:
            count.templated = True  # the counter changes mid-run; cached single counts are now off
        out = " ".join(f"w{i}_{j}" for j in range(n))
        call = ToolCall(f"c{i}", "bash", {"command": f"cmd {i}"})
        mem.add_turn(i + 1, [ChatMessage("assistant", "", tool_calls=(call,)),
                             ChatMessage("tool", out, tool_call_id=call.id)], tool="bash", output=out)
        messages = mem.render(context)
        assert count.truth(messages) <= budget
        assert mem.counter.additive == (not count.templated)


def test_memory_render_tokenizes_each_text_about_once_across_steps():
    count = Counting()
    truth = Counting()
    mem = Memory(count, budget=8_000, system="sys", task="task")
    context = [" ".join(f"c{j}" for j in range(500))]
    seen = len(context[0])
    for step in range(1, 81):
        out = " ".join(f"o{step}_{j}" for j in range(200))
        seen += len(out)
        call = ToolCall(f"c{step}", "bash", {"command": "ls"})
        mem.add_turn(step, [ChatMessage("assistant", "", tool_calls=(call,)),
                            ChatMessage("tool", out, tool_call_id=call.id)], tool="bash", output=out)
        assert truth(mem.render(context)) <= 8_000
    assert mem.evicted > 20, "the budget forced evictions (each adds a summary line to the header)"
    # each output, the code and each summary line is tokenized about once, plus small probes — not
    # the whole growing prompt every step, nor the header again at every eviction
    summaries = sum(len(t) for t in mem.known_summaries.values())
    assert count.chars <= 1.2 * (seen + summaries) + 80 * 100, (count.chars, seen, summaries)
    assert truth.chars > 10 * count.chars, "re-counting every prompt whole would cost this much"


def char_count(messages) -> int:
    """Additive over messages, not over lines (a rounded characters-per-token estimate)."""
    return sum(-(-len(m.content) // 4) + 4 for m in messages)


@settings(max_examples=30, deadline=None)
@given(budget=st.integers(250, 2500), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=25),
       strategy=st.sampled_from(list(TruncationStrategy)))
def test_budget_is_a_hard_cap_when_lines_are_not_additive(budget, sizes, strategy):
    mem = Memory(char_count, budget=budget, strategy=strategy, system="You are a coder.", task="fix the bug")
    context = [" ".join(f"ctx{i}_{j}" for j in range(40)) for i in range(3)]
    for i, n in enumerate(sizes):
        out = " ".join(f"w{i}_{j}" for j in range(n))
        call = ToolCall(f"c{i}", "bash", {"command": f"cmd {i}"})
        mem.add_turn(i + 1, [ChatMessage("assistant", "", tool_calls=(call,)),
                             ChatMessage("tool", out, tool_call_id=call.id)], tool="bash", output=out)
        assert char_count(mem.render(context)) <= budget
    assert mem.counter.additive and mem.counter.text_additive is False


def test_word_estimates_are_line_additive():
    counter = TokenCounter(Counting())
    assert counter.probe_text("user", ["Task:", "fix it"]) is True
    pieces = ["Task:", "fix", "", "Relevant code:", "def f(x):\n    return x", "", "  indented  ", "日本語"]
    assert counter.joined("user", pieces) == Counting()([ChatMessage("user", "\n".join(pieces))])
