"""Long-term memory summaries written by the model: used when they arrive, capped in tokens,
extractive on failure, empty reply or timeout; recorded in the event log; reused on resume."""

from __future__ import annotations

import time

import pytest

from lagoon.agent import run_task
from lagoon.agent.memory import Memory, Turn
from lagoon.agent.summarizer import ModelSummarizer
from lagoon.agent.trajectory import Trajectory
from lagoon.config import TruncationStrategy, load_config
from lagoon.protocols import ChatMessage, ToolCall
from lagoon.testing import ReplayChatModel, ScriptedChatModel, ScriptStep, WholeFileRetriever

COUNT = ScriptedChatModel([]).count_tokens


def _turn(step: int, output: str, *, ok: bool = True) -> Turn:
    call = ToolCall(f"c{step}", "bash", {"command": f"cmd {step}"})
    return Turn(step=step, summary=f"step {step}: bash cmd {step} → exit {0 if ok else 1}",
                messages=[ChatMessage("assistant", "", tool_calls=(call,)),
                          ChatMessage("tool", output, tool_call_id=call.id)])


def test_model_summary_is_used_and_the_request_shows_the_turn():
    model = ScriptedChatModel(["  ran cmd 3:\n pytest failed in test_median_even  "])
    s = ModelSummarizer(model, max_tokens=40).summarize(_turn(3, "FAILED test_median_even - assert 2 == 2.5"))
    assert s.source == "model" and s.asked_model and not s.error
    assert s.text == "step 3: ran cmd 3: pytest failed in test_median_even"
    (request,) = model.requests
    assert request[0].role == "system" and "40 tokens" in request[0].content
    assert "cmd 3" in request[1].content and "test_median_even - assert 2 == 2.5" in request[1].content
    assert s.usage["output_tokens"] > 0


@pytest.mark.parametrize("cap", [8, 20, 64])
def test_a_long_reply_is_cut_to_the_token_cap(cap):
    words = " ".join(f"word{i} ," for i in range(400))
    summarizer = ModelSummarizer(ScriptedChatModel([words]), max_tokens=cap)
    s = summarizer.summarize(_turn(2, "output"))
    assert s.source == "model" and s.text.startswith("step 2: word0") and s.text.endswith("…")
    assert summarizer.tokens(s.text) <= cap
    # nearly as long as the cap allows: one more word would not fit
    assert summarizer.tokens(s.text) > cap - 4


def _raise(messages):
    raise ConnectionError("backend unreachable")


def _slow(messages):
    time.sleep(2.0)
    return "too late"


@pytest.mark.parametrize(("reply", "error"), [(_raise, "backend unreachable"), ("   ", "empty summary"),
                                              (_slow, "no summary within")])
def test_failure_empty_reply_and_timeout_fall_back_to_the_extractive_line(reply, error):
    turn = _turn(5, "Traceback: boom", ok=False)
    s = ModelSummarizer(ScriptedChatModel([reply]), timeout_s=0.3).summarize(turn)
    assert s.source == "extractive" and s.text == turn.summary and error in s.error and s.asked_model
    assert s.latency_s >= (0.3 if reply is _slow else 0.0)  # the wait is model time, not loop overhead


class NotesModel:
    """Writes summaries of `words` words each; counts like ScriptedChatModel."""

    def __init__(self, words: int, *, fail_every: int = 0) -> None:
        self.inner = ScriptedChatModel([lambda m: " ".join(f"note{i}" for i in range(words))], repeat_last=True)
        self.fail_every, self.calls = fail_every, 0

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)

    def chat(self, messages, **kw):
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise TimeoutError("upstream timed out")
        return self.inner.chat(messages, **kw)


@pytest.mark.parametrize("strategy", list(TruncationStrategy))
def test_budget_stays_a_hard_cap_with_model_summaries(strategy):
    model = NotesModel(words=200, fail_every=3)
    summarizer = ModelSummarizer(model, max_tokens=30)
    mem = Memory(COUNT, budget=700, strategy=strategy, system="You are a coder.", task="fix it",
                 summarizer=summarizer)
    context = [" ".join(f"ctx{i}_{j}" for j in range(60)) for i in range(3)]
    sources = []
    for step in range(1, 30):
        out = " ".join(f"w{step}_{j}" for j in range(20 + 13 * (step % 7)))
        turn = _turn(step, out, ok=step % 4 != 0)
        mem.add_turn(step, turn.messages, tool="bash", arguments={"command": f"cmd {step}"}, output=out,
                     ok=step % 4 != 0, exit_code=0)
        messages = mem.render(context)
        assert COUNT(messages) <= 700
        sources += [s.source for s in mem.take_evictions()]
    assert mem.evicted == len(sources) > 5
    assert {"model", "extractive"} <= set(sources), "every third summary call fails and falls back"
    assert all(summarizer.tokens(t) <= 30 for t in mem.known_summaries.values() if t.startswith("step") and "note" in t)


def test_replayed_summaries_are_reused_not_asked_again():
    model = NotesModel(words=5)
    mem = Memory(COUNT, budget=110, system="sys", task="task", summarizer=ModelSummarizer(model))
    traj = Trajectory(memory=mem)
    traj.apply("memory", {"step": 1, "summary": "step 1: written before the crash", "source": "model",
                          "error": "", "asked_model": True, "usage": {"input_tokens": 50, "output_tokens": 7}})
    for step in (1, 2, 3):
        out = " ".join(f"x{step}_{j}" for j in range(60))
        mem.add_turn(step, _turn(step, out).messages, tool="bash", output=out)
    mem.render()
    evictions = mem.take_evictions()
    assert "step 1: written before the crash" in mem.summaries
    assert all(e.step != 1 for e in evictions), "a replayed summary is not recorded twice"
    assert model.calls == len(evictions) >= 1 and evictions[0].source == "model"
    assert traj.summary_calls == 1 and traj.input_tokens == 50 and traj.summaries["model"] == 1


class SplitModel:
    """The agent's turns go to `agent` (they come with tools); summary requests (no tools) to `notes`."""

    def __init__(self, agent, notes) -> None:
        self.agent, self.notes, self.name = agent, notes, "split"

    @property
    def context_window(self) -> int:
        return self.agent.context_window

    def count_tokens(self, messages):
        return self.agent.count_tokens(messages)

    def chat(self, messages, *, tools=(), **kw):
        return (self.agent if tools else self.notes).chat(messages, tools=tools, **kw)


@pytest.mark.parametrize("fail", [False, True])
def test_run_records_which_summary_each_evicted_turn_got(tmp_path, fail):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("hello\n")
    steps = [ScriptStep(tool=("bash", {"command": f"seq {i} {i + 120}"})) for i in range(8)]
    agent = ReplayChatModel([*steps, ScriptStep(tool=("submit", {"summary": "done"}))])
    notes = ScriptedChatModel([_raise if fail else "listed numbers; exit 0"], repeat_last=True)
    cfg = load_config({"agent": {"summary_max_tokens": 16},
                       "model_deployment": {"memory": {"context_budget": 800}}})
    r = run_task("count", repo, cfg, model=SplitModel(agent, notes), retriever=WholeFileRetriever(repo))
    assert r.submitted
    from lagoon.agent.session import SessionStore

    store = SessionStore.for_workspace(repo)
    events = [e["payload"] for e in store.events(r.session_id) if e["kind"] == "memory"]
    store.close()
    assert events and len(notes.requests) == len(events) == sum(r.summaries.values())
    assert all(COUNT(req) <= 800 for req in agent.requests)
    header = agent.requests[-1][1].content
    if fail:
        assert r.summaries == {"extractive": len(events)}
        assert all("backend unreachable" in e["error"] and e["asked_model"] for e in events)
        assert "Earlier steps (summarised):\nstep 1: bash" in header
    else:
        assert r.summaries == {"model": len(events)}
        assert all(e["summary"].startswith(f"step {e['step']}: listed numbers") for e in events)
        assert "listed numbers; exit 0" in header
        assert r.output_tokens > sum(1 for _ in agent.requests)  # the summaries' tokens are counted
