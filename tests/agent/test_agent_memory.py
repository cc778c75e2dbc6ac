"""Memory: the budget is a hard cap for both strategies; what each strategy keeps; file states."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lagoon.agent.memory import Memory
from lagoon.config import TruncationStrategy
from lagoon.errors import ContextWindowExceededError
from lagoon.protocols import ChatMessage, ToolCall
from lagoon.testing import ScriptedChatModel

COUNT = ScriptedChatModel([]).count_tokens


def _turn(mem: Memory, step: int, command: str, output: str, *, ok: bool = True, edit: bool = False,
          path: str | None = None) -> None:
    call = ToolCall(f"c{step}", "edit" if edit else "bash", {"command": command})
    msgs = [ChatMessage("assistant", f"step {step}", tool_calls=(call,)),
            ChatMessage("tool", output, tool_call_id=f"c{step}")]
    mem.add_turn(step, msgs, tool=call.name, arguments=dict(call.arguments), output=output, ok=ok,
                 exit_code=0 if ok else 1, edit=edit, file_path=path, file_state=output if path else None)


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(300, 3000),
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=30),
    fails=st.lists(st.booleans(), min_size=30, max_size=30),
    strategy=st.sampled_from(list(TruncationStrategy)),
    chunks=st.lists(st.integers(1, 200), max_size=5),
)
def test_rendered_prompt_never_exceeds_the_budget(budget, sizes, fails, strategy, chunks):
    mem = Memory(COUNT, budget=budget, strategy=strategy, system="You are a coder.", task="fix the bug")
    context = [" ".join(f"ctx{i}_{j}" for j in range(n)) for i, n in enumerate(chunks)]
    for i, n in enumerate(sizes):
        out = " ".join(f"w{i}_{j}" for j in range(n))
        _turn(mem, i + 1, f"cmd {i}", out, ok=not fails[i], path=f"f{i % 3}.py" if i % 4 == 0 else None)
        messages = mem.render(context)
        assert COUNT(messages) <= budget
        assert messages[0].role == "system" and "fix the bug" in messages[1].content
        # the newest turn is always shown (possibly cut), never evicted
        assert any(m.tool_call_id == f"c{i + 1}" for m in messages)


def test_semantic_importance_keeps_errors_and_edits_fifo_keeps_recent():
    def build(strategy):
        mem = Memory(COUNT, budget=350, strategy=strategy, system="sys", task="task")
        _turn(mem, 1, "pytest -q", "FAILED test_x - AssertionError: 3 != 2", ok=False)
        _turn(mem, 2, "edit", "edited a.py", edit=True)
        for i in range(3, 9):
            _turn(mem, i, "ls", " ".join(f"file{i}_{j}" for j in range(60)))
        return mem, mem.render()

    sem, sem_msgs = build(TruncationStrategy.SEMANTIC_IMPORTANCE)
    fifo, fifo_msgs = build(TruncationStrategy.FIFO)
    sem_ids = {m.tool_call_id for m in sem_msgs if m.tool_call_id}
    fifo_ids = {m.tool_call_id for m in fifo_msgs if m.tool_call_id}
    assert {"c1", "c2"} <= sem_ids, "errors and edits are kept under semantic_importance"
    assert "c1" not in fifo_ids and "c2" not in fifo_ids, "fifo evicts the oldest first"
    assert "c8" in sem_ids and "c8" in fifo_ids
    # evicted turns live on as one-line summaries in long-term memory
    assert sem.evicted > 0 and fifo.evicted > 0
    assert any("step 1: bash" in s and "FAILED" in s for s in fifo.summaries)
    assert "Earlier steps (summarised)" in fifo_msgs[1].content


def test_latest_file_state_replaces_older_and_survives_eviction():
    mem = Memory(COUNT, budget=100000, system="sys", task="task")
    _turn(mem, 1, "view a.py", "a.py: v1 content", path="a.py")
    _turn(mem, 2, "view a.py", "a.py: v2 content", path="a.py")
    msgs = mem.render()
    tool_texts = [m.content for m in msgs if m.role == "tool"]
    assert "v1 content" not in " ".join(tool_texts) and "masked" in tool_texts[0]
    assert tool_texts[1] == "a.py: v2 content"
    mem.budget = COUNT(msgs) - 5  # force the eviction of turn 1 and then turn 2's older copy
    for i in range(3, 6):
        _turn(mem, i, "echo", "ok")
    msgs = mem.render()
    assert COUNT(msgs) <= mem.budget


def test_file_state_shown_in_header_after_its_turn_is_evicted():
    mem = Memory(COUNT, budget=10_000, strategy=TruncationStrategy.FIFO, system="sys", task="task")
    _turn(mem, 1, "view a.py", "a.py: def f(): return 42", path="a.py")
    _turn(mem, 2, "echo", "x " * 50)
    mem.turns.pop(0)  # as if evicted
    assert "Current state of files you touched" in mem.render()[1].content
    assert "return 42" in mem.render()[1].content


def test_task_too_large_for_the_budget_is_a_clear_error():
    mem = Memory(COUNT, budget=300, system="sys", task="word " * 500)
    with pytest.raises(ContextWindowExceededError, match="context_budget"):
        mem.render()
