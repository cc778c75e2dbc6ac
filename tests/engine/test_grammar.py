"""Constrained decoding: the token mask, the compiled-grammar cache, and 50 generations at
temperature 1.0 from a random tiny model that all validate against their JSON schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lagoon.engine import Constraint, load_model
from lagoon.engine.sampling import SamplingParams, sample, unpack_bitmask
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import BadRequestError
from lagoon.tool_calls import HERMES, SMOLLM2, parse_tool_calls

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = load_model(save_tiny_model(tmp_path_factory.mktemp("g") / "m", "llama"), precision="float32")
    yield e
    e.close()


def test_unpack_bitmask_matches_a_per_token_reference():
    words = torch.randint(-(2**31), 2**31 - 1, (7,), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    got = unpack_bitmask(words, 7 * 32 + 5)  # a padded vocabulary: the tail is never allowed
    ref = [bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(7 * 32)] + [False] * 5
    assert got.tolist() == ref


def test_sample_never_leaves_the_mask():
    g = torch.Generator().manual_seed(0)
    allowed = torch.zeros(500, dtype=torch.bool)
    allowed[[3, 77, 401]] = True
    for _ in range(200):
        logits = torch.randn(500, generator=g) * 5
        assert sample(logits, SamplingParams(temperature=1.0, top_p=0.9), g, allowed) in (3, 77, 401)
    assert sample(logits, SamplingParams(temperature=0), None, allowed) == max((3, 77, 401), key=lambda t: logits[t])
    with pytest.raises(BadRequestError, match="allows no token"):
        sample(logits, SamplingParams(), None, torch.zeros(500, dtype=torch.bool))


def test_fifty_generations_at_temperature_one_all_validate(engine):
    c = Constraint.json_schema(SCHEMA)
    reqs = [engine.submit(engine.encode(f"user {i}:"), engine.params(max_new_tokens=200, temperature=1.0, seed=i),
                          None, c) for i in range(50)]
    texts = []
    for _, stream in reqs:
        texts.append("".join(stream))
        assert stream.finish_reason == "stop"
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10  # sampled, not one forced string
    assert engine.grammars.compiled >= 1


def test_compiled_grammars_are_cached_and_bad_ones_named(engine):
    before = engine.grammars.compiled
    for _ in range(3):
        engine.complete("x", engine.params(max_new_tokens=20), constraint=Constraint.regex("(yes|no)"))
    assert engine.grammars.compiled == before + 1
    with pytest.raises(BadRequestError, match="invalid regex"):
        engine.complete("x", engine.params(max_new_tokens=4), constraint=Constraint.regex("[0-9"))


def test_constrained_and_free_requests_share_a_batch(engine):
    free_alone = engine.complete("free text", engine.params(max_new_tokens=24)).text
    c = Constraint.choice(["alpha", "beta", "gamma"])
    pairs = [engine.submit(engine.encode("free text"), engine.params(max_new_tokens=24)),
             engine.submit(engine.encode("pick"), engine.params(max_new_tokens=24, temperature=1.0, seed=5), None, c)]
    free, chosen = ("".join(s) for _, s in pairs)
    assert free == free_alone
    assert chosen in ("alpha", "beta", "gamma")


@pytest.mark.parametrize("syntax", [HERMES, SMOLLM2], ids=lambda s: s.name)
def test_forced_tool_call_in_the_family_syntax_validates(engine, syntax):
    tools = [
        {"type": "function", "function": {"name": "bash", "parameters": {
            "type": "object", "properties": {"command": {"type": "string", "pattern": "^[a-z ]{1,12}$"}},
            "required": ["command"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "submit", "parameters": {"type": "object", "properties": {},
                                                                            "additionalProperties": False}}},
    ]
    c = Constraint.tool_call(tools, syntax)
    for seed in range(6):
        text = engine.complete("act:", engine.params(max_new_tokens=120, temperature=1.0, seed=seed), constraint=c).text
        assert text.startswith(syntax.open_constraint) and text.endswith(syntax.close_constraint)
        content, calls = parse_tool_calls(text)
        assert content == "" and len(calls) == 1
        schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == calls[0].name)
        jsonschema.validate(dict(calls[0].arguments), schema)


def test_tool_arguments_are_strict_so_prompt_examples_cannot_be_copied(engine):
    from lagoon.engine.grammar import strict_schema

    loose = {"type": "object", "properties": {"name": {"type": "string"}, "opts": {
        "type": "object", "properties": {"k": {"type": "integer"}}}}, "required": []}
    strict = strict_schema(loose)
    assert strict["additionalProperties"] is False and strict["properties"]["opts"]["additionalProperties"] is False
    assert "additionalProperties" not in loose  # a copy
    c = Constraint.tool_call([{"type": "function", "function": {"name": "verify", "parameters": loose}}], HERMES)
    m = engine.grammars.matcher(c)
    for tok in engine.encode('<tool_call>\n{"name": "verify", "arguments": {"'):
        m.accept(tok)
    allowed = m.allowed(engine.args.vocab_size)
    first = {engine.decode([t]) for t in torch.nonzero(allowed).flatten().tolist()}
    assert first and all(t and ("name".startswith(t) or "opts".startswith(t)) for t in first)  # only declared keys
