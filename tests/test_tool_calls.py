"""Tool-call syntaxes: parsing both families' forms, and streaming a call as OpenAI deltas that
reassemble to the call the whole reply parses to, however the text is cut."""

from __future__ import annotations

import json
import random

import pytest

from lagoon.tool_calls import HERMES, SMOLLM2, ToolCallDelta, ToolCallStream, parse_tool_calls

ARGS = {"command": "grep -n '}' a.py | head", "n": [1, {"x": "]</tool_call>"}]}


@pytest.mark.parametrize("syntax", [HERMES, SMOLLM2], ids=lambda s: s.name)
def test_render_then_parse_roundtrips(syntax):
    text = syntax.render([("bash", ARGS), ("submit", {})])
    content, calls = parse_tool_calls("I will look.\n" + text)
    assert content == "I will look."
    assert [(c.name, dict(c.arguments)) for c in calls] == [("bash", ARGS), ("submit", {})]


def test_smollm2_json_list_and_bare_replies_parse():
    _, calls = parse_tool_calls('<tool_call>[{"name": "bash", "arguments": {"command": "ls"}}]</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("bash", {"command": "ls"})]
    _, calls = parse_tool_calls('[{"name": "submit", "arguments": {}}]')
    assert [c.name for c in calls] == ["submit"]
    assert parse_tool_calls("no call here") == ("no call here", [])
    assert parse_tool_calls("<tool_call>{not json}</tool_call>")[1] == []


def _replay(text: str, cuts: list[int]) -> tuple[str, dict[int, dict]]:
    stream, content, calls = ToolCallStream(), [], {}
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    n_arg_deltas = 0
    for i, piece in enumerate(pieces):
        for item in stream.feed(piece, final=i == len(pieces) - 1):
            if isinstance(item, ToolCallDelta):
                c = calls.setdefault(item.index, {"name": None, "id": None, "args": ""})
                if item.id is not None:
                    assert c["name"] is None and c["args"] == ""  # the name comes first, once
                    c["name"], c["id"] = item.name, item.id
                c["args"] += item.arguments
                n_arg_deltas += bool(item.arguments)
            else:
                content.append(item)
    return "".join(content), calls


@pytest.mark.parametrize("syntax", [HERMES, SMOLLM2], ids=lambda s: s.name)
def test_streamed_calls_reassemble_under_any_cutting(syntax):
    text = "Let me check <tool.\n" + syntax.render([("bash", ARGS), ("view", {"path": "a.py"})])
    rng = random.Random(0)
    _, whole = parse_tool_calls(text)
    for trial in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 30))) if trial else list(range(1, len(text)))
        content, calls = _replay(text, cuts)
        assert content.strip() == "Let me check <tool."
        assert [(c["name"], json.loads(c["args"])) for c in calls.values()] == [(w.name, dict(w.arguments)) for w in whole]


def test_arguments_arrive_in_several_fragments():
    text = HERMES.render([("bash", ARGS)])
    stream = ToolCallStream()
    items = [it for ch in text for it in stream.feed(ch)]
    frags = [it for it in items if isinstance(it, ToolCallDelta) and it.arguments]
    assert items[0].name == "bash" and len(frags) > 5
    assert json.loads("".join(f.arguments for f in frags)) == ARGS
