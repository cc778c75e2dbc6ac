"""Forced tool calls (tool_choice required / named) in each family's *own* syntax: a random tiny
model sampling at temperature 1.0 under `Constraint.tool_call(tools, syntax)` writes Qwen3-Coder XML,
GLM / Laguna `<arg_key>` calls, gpt-oss harmony or DeepSeek calls, and every reply parses back into
one call of an offered (or the named) tool whose arguments validate against its schema."""

from __future__ import annotations

import jsonschema
import pytest

from lagoon.engine import Constraint, load_model
from lagoon.engine.grammar import GrammarCompiler
from lagoon.engine.tiny import byte_tokenizer, save_tiny_model
from lagoon.tool_calls import parse_tool_calls
from lagoon.tool_syntax import DEEPSEEK_V3, DEEPSEEK_V31, GLM45, HARMONY, HERMES, LAGUNA_V8, QWEN3_CODER

TOOLS = [
    {"type": "function", "function": {"name": "edit", "parameters": {
        "type": "object", "required": ["path", "flags"],
        "properties": {"path": {"type": "string", "maxLength": 4}, "mode": {"type": "string", "enum": ["a", "w"]},
                       "flags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                 "maxItems": 3},
                       "force": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "submit", "parameters": {
        "type": "object", "properties": {"note": {"type": "string", "maxLength": 3}}}}},
]
OPENERS = {"qwen3_coder": "<tool_call>\n<function=", "glm45": "<tool_call>", "laguna": "<tool_call>",
           "laguna_v8": "<tool_call>", "harmony": " to=functions.", "deepseek_v31": "<｜tool▁calls▁begin｜>",
           "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = load_model(save_tiny_model(tmp_path_factory.mktemp("tg") / "m", "llama"), precision="float32")
    yield e
    e.close()


# LAGUNA writes calls as GLM45 does (same grammar); LAGUNA_V8 without the newlines
SYNTAXES = [QWEN3_CODER, GLM45, LAGUNA_V8, HARMONY, DEEPSEEK_V31, DEEPSEEK_V3]


def test_forced_calls_are_written_natively_and_parse_back(engine):
    # every family's requests decode in one batch (cheaper than a batch per family)
    jobs = []
    for k, syntax in enumerate(SYNTAXES):
        for i, forced in enumerate([TOOLS, TOOLS[:1]]):  # required, named ("edit")
            params = engine.params(max_new_tokens=300, temperature=1.0, seed=10 * k + i)
            jobs.append((syntax, forced, engine.submit(engine.encode(f"call {i}:"), params, None,
                                                      Constraint.tool_call(forced, syntax))[1]))
    for syntax, forced, stream in jobs:
        text = "".join(stream)
        assert stream.finish_reason == "stop", (syntax.name, text)
        assert text.startswith(OPENERS[syntax.name]), (syntax.name, text)
        content, calls = parse_tool_calls(text, TOOLS)
        assert content == "" and len(calls) == 1, (syntax.name, text)
        assert calls[0].name in [t["function"]["name"] for t in forced]
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].name)
        jsonschema.validate(dict(calls[0].arguments), {**schema, "additionalProperties": False})


def test_a_native_form_is_the_only_form(engine):
    """Qwen3-Coder forced: after `<tool_call>\n` only `<function=` may follow, not a Hermes JSON object."""
    m = engine.grammars.matcher(Constraint.tool_call(TOOLS, QWEN3_CODER))
    for tok in engine.encode("<tool_call>\n"):
        m.accept(tok)
    allowed = m.allowed(engine.args.vocab_size)
    assert allowed[engine.encode("<")[0]] and not allowed[engine.encode("{")[0]]


@pytest.mark.parametrize(("syntax", "tokens"), [
    (HERMES, ["<tool_call>", "</tool_call>"]),  # as Qwen2.5's vocabulary has them
    (GLM45, ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]),
], ids=lambda v: getattr(v, "name", ""))
def test_syntax_tokens_of_the_vocabulary_are_accepted_as_those_tokens(syntax, tokens):
    """llguidance matches an added `<…>` token only as itself: a forced call must accept the
    family's own `<tool_call>` / `</arg_value>` tokens, not only their spelling in bytes."""
    tok = byte_tokenizer()
    tok.add_tokens(tokens)
    text = syntax.render([("edit", {"path": "a.py", "flags": [1, 2]})])
    ids = tok.encode(text, add_special_tokens=False)
    assert set(tok.convert_tokens_to_ids(tokens)) <= set(ids)
    m = GrammarCompiler(tok).matcher(Constraint.tool_call(TOOLS, syntax))
    for t in ids:
        m.accept(t)
    assert m.accepting


def test_a_forced_call_after_an_opened_think_closes_the_reasoning_first():
    """The prompt opened `<think>` (enable_thinking): free reasoning, `</think>` (the vocabulary's
    token or its bytes), then the call; the call alone is refused until the reasoning is closed."""
    tok = byte_tokenizer()
    tok.add_tokens(["</think>"])
    compiler = GrammarCompiler(tok)
    call = LAGUNA_V8.render([("edit", {"path": "a.py", "flags": [3]})])
    for reply in ["plan: edit a.py</think>" + call, "</think>" + call]:
        m = compiler.matcher(Constraint.tool_call(TOOLS, LAGUNA_V8, think=True))
        for t in tok.encode(reply, add_special_tokens=False):
            m.accept(t)
        assert m.accepting
    m = compiler.matcher(Constraint.tool_call(TOOLS, LAGUNA_V8, think=True))
    for t in tok.encode("<tool_call>edit<arg_key>path</arg_key><arg_value>a.py</arg_value>", add_special_tokens=False):
        m.accept(t)  # still reasoning text: the call is not open yet
    assert not m.accepting
