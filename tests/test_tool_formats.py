"""Per-family tool-call syntaxes beyond Hermes/SmolLM2: Qwen3-Coder's XML and gpt-oss harmony are
rendered (history) and parsed back into the same OpenAI calls; the syntax is chosen from the chat
template; reasoning (`<think>`, harmony's analysis channel) is split out as reasoning_content."""

from __future__ import annotations

import json

import pytest

from lagoon.tool_calls import (
    HARMONY,
    HERMES,
    QWEN3_CODER,
    SMOLLM2,
    ReasoningStream,
    parse_tool_calls,
    split_reasoning,
)

CALLS = [("run_tests", {"path": "tests/test_x.py", "k": 3, "flags": ["-q", "-x"], "verbose": False}),
         ("read_file", {"path": "src/a.py"})]


@pytest.mark.parametrize("syntax", [HERMES, SMOLLM2, QWEN3_CODER, HARMONY], ids=lambda s: s.name)
def test_render_then_parse_round_trips(syntax):
    text = "Let me check.\n" + syntax.render(CALLS)
    content, calls = parse_tool_calls(text)
    assert [(c.name, dict(c.arguments)) for c in calls] == CALLS
    assert content == "Let me check."


def test_qwen3_coder_xml_as_the_model_writes_it():
    text = ("I'll edit it.\n<tool_call>\n<function=write_file>\n<parameter=path>\nsrc/a.py\n</parameter>\n"
            "<parameter=content>\ndef f():\n    return 1\n</parameter>\n</function>\n</tool_call>")
    content, calls = parse_tool_calls(text)
    assert content == "I'll edit it." and calls[0].name == "write_file"
    assert dict(calls[0].arguments) == {"path": "src/a.py", "content": "def f():\n    return 1"}


def test_harmony_reply_splits_reasoning_calls_and_final():
    reply = ("<|channel|>analysis<|message|>The test imports a missing name.<|end|>"
             "<|start|>assistant to=functions.bash<|channel|>commentary json<|message|>{\"cmd\": \"pytest -q\"}<|call|>")
    reasoning, rest = split_reasoning(reply)
    assert reasoning == "The test imports a missing name."
    content, calls = parse_tool_calls(rest)
    assert [(c.name, dict(c.arguments)) for c in calls] == [("bash", {"cmd": "pytest -q"})] and content == ""
    final = "<|channel|>analysis<|message|>easy<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>"
    assert split_reasoning(final) == ("easy", "It is 4.")


@pytest.mark.parametrize(("text", "want"), [
    ("<think>\nplan: read a.py\n</think>\n\nDone.", ("plan: read a.py", "Done.")),
    ("plan first</think>The answer.", ("plan first", "The answer.")),  # the template opened <think>
    ("No reasoning here.", (None, "No reasoning here.")),
    ("Use the tag `<think>` like </think> this.", (None, "Use the tag `<think>` like </think> this.")),
])
def test_think_segments_become_reasoning(text, want):
    assert split_reasoning(text) == want


def test_syntax_is_chosen_from_the_chat_template():
    from lagoon.engine.tokenizer import tool_syntax_for

    qwen3_coder = "{% for tool in tools %}...<function=example_function_name>\n<parameter=example_parameter_1>..."
    harmony = "<|start|>system<|message|>...<|channel|>analysis<|message|>..."
    assert tool_syntax_for(qwen3_coder) is QWEN3_CODER
    assert tool_syntax_for(harmony) is HARMONY
    assert tool_syntax_for("{{ 'SmolLM' }}") is SMOLLM2 and tool_syntax_for("<|im_start|>") is HERMES


@pytest.mark.parametrize("text", ["<think>\nplan: read a.py\n</think>\n\nDone.", "  <think>x</think>y",
                                  "No reasoning here.", "<thin>not a tag</thin>", "<think>never closed"])
@pytest.mark.parametrize("size", [1, 3, 100])
def test_streamed_reasoning_equals_the_split_of_the_whole(text, size):
    s = ReasoningStream()
    got: dict[str, str] = {"reasoning": "", "content": ""}
    for i in range(0, len(text), size):
        for kind, piece in s.feed(text[i : i + size]):
            got[kind] += piece
    for kind, piece in s.feed("", final=True):
        got[kind] += piece
    if text.lstrip().startswith("<think>") and "</think>" not in text:
        assert got == {"reasoning": "never closed", "content": ""}
        return
    reasoning, content = split_reasoning(text)
    assert (got["reasoning"].strip() or None, got["content"]) == (reasoning, content)


@pytest.mark.parametrize("syntax", [QWEN3_CODER, HARMONY], ids=lambda s: s.name)
def test_streamed_xml_and_harmony_calls_join_to_the_rendered_calls(syntax):
    from lagoon.tool_calls import ToolCallDelta, ToolCallStream

    text = syntax.render(CALLS)
    stream = ToolCallStream()
    out = [d for i in range(0, len(text), 7) for d in stream.feed(text[i : i + 7])]
    out += list(stream.feed("", final=True))
    deltas = [d for d in out if isinstance(d, ToolCallDelta)]
    names = [d.name for d in deltas if d.name]
    args = {}
    for d in deltas:
        args[d.index] = args.get(d.index, "") + d.arguments
    assert stream.called and names == [n for n, _ in CALLS]
    assert [json.loads(args[i]) for i in range(len(CALLS))] == [a for _, a in CALLS]
