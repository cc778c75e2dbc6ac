"""Structured outputs over HTTP with the official `openai` client against `lagoon serve` on
127.0.0.1 (a random tiny model, so only the constraint makes the replies valid): `parse` with a
pydantic model, `tool_choice` required / named, streamed tool-call deltas, and 400s that name
what the server does not implement."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from lagoon.engine import load_model
from lagoon.engine.server import start_test_server
from lagoon.engine.tiny import save_tiny_model

pytestmark = pytest.mark.network

BASH = {"type": "object", "properties": {"command": {"type": "string", "pattern": "^[a-z ./-]{1,16}$"}},
        "required": ["command"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": BASH}},
         {"type": "function", "function": {"name": "submit", "parameters": {"type": "object", "properties": {}}}}]
MSGS = [{"role": "user", "content": "act"}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(pattern="^[a-z]{1,8}$")
    age: int = pydantic.Field(ge=0, le=99)
    admin: bool


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("so") / "m", "llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def live(folder):
    engine = load_model(folder, precision="float32")
    base, stop = start_test_server(engine)
    yield engine, openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    stop()
    engine.close()


def test_openai_parse_returns_the_pydantic_model(live):
    engine, client = live
    for seed in range(3):
        r = client.chat.completions.parse(model=engine.name, messages=MSGS, response_format=Person,
                                          max_tokens=80, temperature=1.0, seed=seed)
        assert isinstance(r.choices[0].message.parsed, Person)


def test_required_tool_choice_never_returns_text(live):
    engine, client = live
    for seed in range(8):
        r = client.chat.completions.create(model=engine.name, messages=MSGS, tools=TOOLS, tool_choice="required",
                                           max_tokens=80, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        call = choice.message.tool_calls[0].function
        schema = BASH if call.name == "bash" else TOOLS[1]["function"]["parameters"]
        jsonschema.validate(json.loads(call.arguments), schema)


def test_named_tool_call_streams_in_deltas_that_reassemble(live):
    engine, client = live
    kw = {"model": engine.name, "messages": MSGS, "tools": TOOLS, "max_tokens": 80, "temperature": 1.0, "seed": 11,
          "tool_choice": {"type": "function", "function": {"name": "bash"}}}
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function
    deltas, finish = [], None
    for ch in client.chat.completions.create(**kw, stream=True):
        for c in ch.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].function.name == "bash" and deltas[0].id
    frags = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(frags) >= 2
    assert json.loads("".join(frags)) == json.loads(whole.arguments)


def test_completions_take_json_and_the_lagoon_extension(live):
    engine, client = live
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}
    r = client.completions.create(model=engine.name, prompt="x", max_tokens=60, temperature=1.0,
                                  extra_body={"response_format": fmt})
    Person.model_validate_json(r.choices[0].text)
    # any object: a random model's free-text keys may not close within max_tokens, but it opens one
    r = client.completions.create(model=engine.name, prompt="x", max_tokens=8, temperature=1.0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")
    r = client.completions.create(model=engine.name, prompt="x", max_tokens=20, temperature=1.0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert r.choices[0].text[:3].isdigit() and len(r.choices[0].text) == 6
    r = client.chat.completions.create(model=engine.name, messages=MSGS, max_tokens=20, temperature=1.0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")


def test_unsupported_and_invalid_requests_are_named_400s(live):
    engine, client = live
    with pytest.raises(openai.BadRequestError, match="logit_bias") as e:
        client.chat.completions.create(model=engine.name, messages=MSGS, logit_bias={"5": 3}, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="non-streamed"):
        client.chat.completions.create(model=engine.name, messages=MSGS, logprobs=True, max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model=engine.name, prompt="x", frequency_penalty=0.5, max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        client.completions.create(model=engine.name, prompt="x", max_tokens=4, extra_body={"guided_regex": "[0-9"})
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=engine.name, messages=MSGS, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.chat.completions.create(model=engine.name, messages=MSGS, max_tokens=4, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a+"})
    assert e.value.status_code == 400


def test_logprobs_are_the_models_own(live, folder):
    import torch
    from transformers import AutoModelForCausalLM

    engine, client = live
    r = client.chat.completions.create(model=engine.name, messages=MSGS, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    for item in content:  # greedy: the chosen token is the likeliest, alternatives best first
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6) and item.logprob <= 0
    # the reference: transformers' forward over the same prompt, log-softmax of the last position
    ids = engine.chat_prompt(MSGS)
    ref_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0, -1].float(), -1)
    top = torch.topk(ref, 3)
    assert content[0].logprob == pytest.approx(float(top.values[0]), abs=1e-4)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    c = client.completions.create(model=engine.name, prompt="abc", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    # (single byte tokens of a random model's output need not decode alone, so no text equality)
    assert len(lp.tokens) == len(lp.token_logprobs) == c.usage.completion_tokens
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0  # keyed by text: "\ufffd" twice is one key
